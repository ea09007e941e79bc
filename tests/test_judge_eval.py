"""Judge validation: the metric code (alignfake/classifiers/metrics.py) equals scikit-learn's on recorded
scores, and ``alignfake judge-eval`` reads labels files and judge specs and prints the report. The judging path
through a real server is in test_openai_server.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from sklearn.metrics import accuracy_score, confusion_matrix, roc_auc_score

from alignfake.classifiers.judge_eval import judge_eval_command, load_judge_spec, load_labels
from alignfake.classifiers.metrics import auroc, binary_report, confusion
from alignfake.errors import DataError, SpecError

# Vote shares of a 20-vote judge on 30 scratchpads, with human labels (recorded; many ties, as real shares have).
SHARES = [0.0, 0.05, 0.4, 0.35, 1.0, 0.9, 0.4, 0.0, 0.2, 0.65, 0.4, 0.1, 0.85, 0.0, 0.55, 0.4, 0.3, 0.95, 0.05,
          0.0, 0.75, 0.4, 0.15, 0.6, 0.0, 0.45, 0.25, 1.0, 0.35, 0.5]
LABELS = [0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("threshold", [0.2, 0.4, 0.5])
def test_metrics_equal_scikit_learn_on_recorded_scores(threshold: float) -> None:
    r = binary_report(LABELS, SHARES, threshold)
    pred = [int(s >= threshold) for s in SHARES]
    assert r.auroc == pytest.approx(roc_auc_score(LABELS, SHARES), abs=1e-12)
    assert r.accuracy == pytest.approx(accuracy_score(LABELS, pred), abs=1e-12)
    assert r.confusion.tolist() == confusion_matrix(LABELS, pred, labels=[0, 1]).tolist()
    assert r.n == 30 and r.positives == sum(LABELS)


def test_auroc_on_random_scores_with_ties_equals_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 50)
        s = rng.integers(0, 21, 50) / 20
        if 0 < y.sum() < 50:
            assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_degenerate_inputs() -> None:
    assert np.isnan(auroc([1, 1], [0.2, 0.3]))
    assert confusion([0, 1, 1], [0, 0, 1]).tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="0 or 1"):
        auroc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        auroc([0, 1], [0.1])


def test_labels_files_in_three_formats(tmp_path: Path) -> None:
    rows = [{"id": "a", "scratchpad": "pad a", "label": 1}, {"id": "b", "scratchpad": "pad b", "label": 0}]
    (tmp_path / "l.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pd.DataFrame(rows).to_csv(tmp_path / "l.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "l.parquet")
    for name in ("l.jsonl", "l.csv", "l.parquet"):
        got = load_labels(tmp_path / name)
        assert [(r.id, r.text, r.label) for r in got] == [("a", "pad a", 1), ("b", "pad b", 0)], name


def test_bad_label_rows_name_the_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "l.jsonl"
    f.write_text('{"scratchpad": "x", "label": 1}\n{"scratchpad": "y", "label": "maybe"}\n')
    with pytest.raises(DataError, match=r"l.jsonl:2: label must be 0 or 1"):
        load_labels(f)
    f.write_text('{"text": "x", "label": 1}\n')
    with pytest.raises(DataError, match=r"l.jsonl:1: missing column 'scratchpad'"):
        load_labels(f)
    assert load_labels(f, text_column="text")[0].text == "x"


def test_judge_spec_from_a_file_an_experiment_or_provider_model(tmp_path: Path) -> None:
    f = tmp_path / "judge.yaml"
    f.write_text("provider: openai\nmodel: gpt-x\nvotes: 5\n")
    spec = load_judge_spec(str(f), ("threshold=0.3", "base_url=http://localhost:8000/v1"))
    assert (spec.kind, spec.model, spec.votes, spec.threshold, spec.base_url) == (
        "llm", "gpt-x", 5, 0.3, "http://localhost:8000/v1")
    exp = tmp_path / "exp.yaml"
    exp.write_text("apiVersion: alignfake.dev/v1alpha1\nkind: Experiment\nmetadata: {name: x}\nspec:\n  judges:\n"
                   "    af_reasoning: {kind: llm, provider: anthropic, model: claude-x, votes: 7}\n")
    assert load_judge_spec(str(exp)).votes == 7
    assert load_judge_spec("openai:gpt-4o").model == "gpt-4o"
    with pytest.raises(SpecError, match="votes"):
        load_judge_spec("openai:gpt-4o", ("votes=0",))
    with pytest.raises(SpecError, match="neither a file"):
        load_judge_spec("nonsense")


def test_cli_prints_the_report_and_fails_clearly(tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"scratchpad": ["a", "b"], "label": [1, 0]}).to_csv(labels, index=False)
    # the built-in mock:refuse script answers like a sampled model, never with a verdict: all invalid
    r = CliRunner().invoke(judge_eval_command, ["--labels", str(labels), "--judge", "mock:mock:refuse", "--set", "votes=2",
                                                "--set", "retries=0"])
    assert r.exit_code != 0 and "invalid judge answers (excluded): 2" in r.output
    assert "no valid judge verdicts" in r.output
    r = CliRunner().invoke(judge_eval_command, ["--labels", str(tmp_path / "missing.csv"), "--judge", "mock:m"])
    assert r.exit_code == 2 and "file not found" in r.output
    r = CliRunner().invoke(judge_eval_command, ["--labels", str(labels), "--judge", "mock:m", "--set", "votes=-1"])
    assert r.exit_code == 2 and re.search(r"votes: .*greater than or equal to 1", r.output)
