"""The Experiment schema: defaults, and one clear error per problem naming the field path."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from alignfake.cli import cli
from alignfake.errors import SpecError
from alignfake.spec import load_experiment, parse_experiment

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "manifests" / "examples").glob("*.yaml"))

MINIMAL = {
    "apiVersion": "alignfake.dev/v1alpha1",
    "kind": "Experiment",
    "metadata": {"name": "exp"},
    "spec": {"models": [{"name": "tiny"}]},
}


def with_spec(**changes: object) -> dict:
    doc = yaml.safe_load(yaml.safe_dump(MINIMAL))
    for path, value in changes.items():
        node = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node.setdefault(k, {})
        node[int(keys[-1]) if keys[-1].isdigit() else keys[-1]] = value
    return doc


def test_minimal_spec_gets_the_papers_defaults() -> None:
    exp = parse_experiment(MINIMAL)
    ev = exp.spec.evaluation
    assert ev.queries.source == "LLM-LAT/harmful-dataset" and ev.queries.column == "prompt"
    assert ev.queries.limit == 200 and ev.temperature == 0.0 and ev.tiers == ["free", "paid"]
    assert exp.spec.judges.af_reasoning.votes == 20 and exp.spec.judges.af_reasoning.threshold == 0.4
    assert exp.spec.storage.uri == "runs"


def test_storage_and_data_sources_accept_a_plain_string() -> None:
    exp = parse_experiment(with_spec(spec__storage="s3://bucket/prefix", spec__evaluation={"queries": "q.jsonl"}))
    assert exp.spec.storage.uri == "s3://bucket/prefix"
    assert exp.spec.evaluation.queries.source == "q.jsonl"


def test_finetune_defaults_follow_the_paper() -> None:
    exp = parse_experiment(with_spec(spec__models=[{"name": "m", "finetune": {"documents": "docs.jsonl"}}]))
    ft = exp.spec.models[0].finetune
    assert ft is not None
    assert (ft.lora.r, ft.lora.alpha, ft.epochs, ft.max_doc_tokens) == (64, 128, 1, 1024)
    assert ft.documents.column == "text"
    assert set(ft.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


MALFORMED = [
    (with_spec(spec__models=[{"name": "m", "finetune": {"documents": "d", "lora": {"r": 0}}}]),
     "spec.models[0].finetune.lora.r"),
    (with_spec(spec__models=[{"name": "m", "tempreature": 0}]), "spec.models[0].tempreature: unknown field"),
    (with_spec(spec__evaluation={"temperature": 3}), "spec.evaluation.temperature"),
    (with_spec(spec__evaluation={"tiers": ["free"]}), "spec.evaluation.tiers: at least two tiers"),
    (with_spec(spec__evaluation={"tiers": ["free", "free"]}), "spec.evaluation.tiers: tiers must be distinct"),
    (with_spec(metadata={"name": "Bad_Name"}), "metadata.name: must be a DNS-1123 label"),
    (with_spec(apiVersion="alignfake.dev/v2"), "apiVersion"),
    (with_spec(kind="Job"), "kind"),
    (with_spec(spec__models=[]), "spec.models"),
    (with_spec(spec__models=[{"name": "a"}, {"name": "a"}]), "spec.models: model names must be unique; repeated: a"),
    (with_spec(spec__storage="gs://bucket"), "spec.storage.uri: only local paths and s3://"),
    (with_spec(spec__judges={"compliance": {"kind": "llm"}}), "spec.judges.compliance: kind llm needs a model"),
    (with_spec(spec__models=[{"name": "m", "finetune": {"documents": "d", "quantization": "nf4"},
                              "inference": {"precision": "fp8"}}]),
     "spec.models[0]: inference.precision is fp8 but the adapter is trained on a nf4 base"),
    (with_spec(spec__evaluation={"queries": {"source": "x", "limit": 0}}), "spec.evaluation.queries.limit"),
    (with_spec(spec__kubernetes={"sample_shards": 0}), "spec.kubernetes.sample_shards"),
    (with_spec(spec__models=[{"name": "m", "provider": "gpt"}]), "spec.models[0].provider"),
]


@pytest.mark.parametrize(("doc", "expected"), MALFORMED, ids=[m[1].split(":")[0] for m in MALFORMED])
def test_malformed_spec_names_the_field(doc: dict, expected: str) -> None:
    with pytest.raises(SpecError) as err:
        parse_experiment(doc, "exp.yaml")
    assert any(p.startswith(expected) for p in err.value.problems), err.value.problems


def test_every_problem_is_reported_not_just_the_first() -> None:
    doc = with_spec(metadata={"name": "X"}, spec__evaluation={"temperature": -1, "bogus": 1})
    with pytest.raises(SpecError) as err:
        parse_experiment(doc)
    paths = sorted(p.split(":")[0] for p in err.value.problems)
    assert paths == ["metadata.name", "spec.evaluation.bogus", "spec.evaluation.temperature"]


def test_nf4_trained_adapter_may_be_served_on_fp8_only_when_written_explicitly() -> None:
    m = {"name": "m", "finetune": {"documents": "d", "quantization": "nf4"},
         "inference": {"precision": "fp8", "allow_precision_mismatch": True}}
    exp = parse_experiment(with_spec(spec__models=[m]))
    assert exp.spec.models[0].serving_precision == "fp8"
    m2 = {"name": "m", "finetune": {"documents": "d", "quantization": "nf4"}}
    assert parse_experiment(with_spec(spec__models=[m2])).spec.models[0].serving_precision == "nf4"


def test_yaml_syntax_error_reports_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("apiVersion: alignfake.dev/v1alpha1\nkind: Experiment\nmetadata:\n  name: [unclosed\n")
    with pytest.raises(SpecError) as err:
        load_experiment(f)
    assert "line 5, column 1" in err.value.problems[0] or "line 4" in err.value.problems[0]


def test_validate_cli_prints_ok_or_field_errors_with_exit_2(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "bad.yaml"
    good.write_text(yaml.safe_dump(MINIMAL))
    bad.write_text(yaml.safe_dump(with_spec(spec__models=[{"name": "m", "finetune": {"documents": "d", "lora": {"r": -1}}}])))
    runner = CliRunner()
    ok = runner.invoke(cli, ["validate", str(good)])
    assert ok.exit_code == 0 and ok.output.strip() == "ok"
    res = runner.invoke(cli, ["validate", str(bad)])
    assert res.exit_code == 2
    assert "spec.models[0].finetune.lora.r: Input should be greater than or equal to 1" in res.output


def test_validate_cli_missing_file_and_yaml_error(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli, ["validate", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "file not found" in res.output
    f = tmp_path / "tab.yaml"
    f.write_text(textwrap.dedent("""\
        apiVersion: alignfake.dev/v1alpha1
        kind: Experiment
        metadata:
          name: x
        spec:
        \tmodels: []
        """))
    res = runner.invoke(cli, ["validate", str(f)])
    assert res.exit_code == 2 and "YAML error at line 6" in res.output


def test_set_overrides_change_fields_and_are_validated(tmp_path: Path) -> None:
    f = tmp_path / "e.yaml"
    f.write_text(yaml.safe_dump(MINIMAL))
    exp = load_experiment(f, ["spec.evaluation.queries.limit=7", "spec.models[0].inference.batch_size=3"])
    assert exp.spec.evaluation.queries.limit == 7 and exp.spec.models[0].inference.batch_size == 3
    with pytest.raises(SpecError) as err:
        load_experiment(f, ["spec.evaluation.temperature=hot"])
    assert err.value.problems[0].startswith("spec.evaluation.temperature")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_shipped_examples_validate(path: Path) -> None:
    load_experiment(path)
