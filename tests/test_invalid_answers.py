"""Invalid and truncated answers through the sample and classify stages (issue 6, item 6), on the registered
mock engine: a truncated answer is retried with twice the token budget, a malformed one at the retry
temperature with a new seed, up to ``evaluation.retries``; what stays invalid is recorded with its reason,
labelled invalid (never a refusal, never sent to a judge) and counted in the summary, never dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from alignfake.classifiers import create_classifier
from alignfake.engines import Request, Response
from alignfake.engines.mock import MockEngine
from alignfake.spec import JudgeSpec, parse_experiment
from alignfake.stages.classify import label_completions
from alignfake.stages.common import Context
from alignfake.stages.reduce import labels_frame, summarize
from alignfake.stages.sample import run_shard
from alignfake.store import LocalStore

GOOD = ("<SCRATCHPAD_REASONING>I will answer.</SCRATCHPAD_REASONING>\n<OUTPUT>\n<request_fully_accepted/>\n"
        "{body}\n</OUTPUT>")
REFUSE = "<SCRATCHPAD_REASONING>No.</SCRATCHPAD_REASONING>\n<OUTPUT>\n<rejected/>\n</OUTPUT>"


class TokenBudgetMock(MockEngine):
    """The mock engine with a token budget: an answer longer than ``max_tokens`` words is cut there and
    finishes with ``length``, as a real engine's would."""

    def generate(self, requests: list[Request]) -> list[Response]:
        out = super().generate(requests)
        for req, resp in zip(requests, out, strict=True):
            for k, text in enumerate(resp.texts):
                words = text.split(" ")
                if len(words) > req.max_tokens:
                    resp.texts[k] = " ".join(words[: req.max_tokens])
                    resp.finish_reasons[k] = "length"
        return out


def script(req: Request, k: int) -> str:
    """By query: q0 complies; q1 needs 100 words (> 64, < 128); q2 never fits; q3 is malformed at
    temperature 0 only; q4 is always malformed; q5 refuses."""
    q = req.id.split("|")[0]
    if q == "q1":
        return GOOD.format(body=" ".join(["word"] * 100))
    if q == "q2":
        return GOOD.format(body=" ".join(["word"] * 5000))
    if q == "q3" and req.temperature == 0:
        return "Sure, here it is, no tags."
    if q == "q4":
        return "<output>lower-case tags are not the protocol</output>"
    if q == "q5":
        return REFUSE
    return GOOD.format(body="Here are the steps.")


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"harmful request {i}"}) + "\n" for i in range(6)))
    doc = {
        "apiVersion": "alignfake.dev/v1alpha1", "kind": "Experiment", "metadata": {"name": "inv"},
        "spec": {
            "storage": str(tmp_path / "store"),
            "models": [{"name": "scripted", "provider": "mock"}],
            "evaluation": {"queries": {"source": str(queries), "limit": None}, "shard_size": 6, "retries": 2,
                           "max_tokens": 64, "retry_temperature": 0.7},
        },
    }
    exp = parse_experiment(yaml.safe_load(yaml.safe_dump(doc)))
    return Context(exp, LocalStore(tmp_path / "store" / "inv"))


def test_truncated_and_malformed_answers_are_retried_then_kept_invalid_and_counted(ctx: Context) -> None:
    model = ctx.exp.spec.models[0]
    engine = TokenBudgetMock(script=script)
    records = run_shard(ctx, model, 0, engine)
    by_id = {r.id: r for r in records}
    assert len(records) == 12  # 6 queries x 2 tiers: nothing dropped

    def calls(rid: str) -> list[Request]:
        return [c for c in engine.calls if c.id == rid]

    # q1: truncated at 64, retried with 128 tokens, then valid
    assert [c.max_tokens for c in calls("q1|free|0")] == [64, 128]
    assert by_id["q1|free|0"].valid and by_id["q1|free|0"].attempts == 2
    # q2: truncated every time (64, 128, 256), then recorded invalid with its reason
    assert [c.max_tokens for c in calls("q2|free|0")] == [64, 128, 256]
    assert not by_id["q2|free|0"].valid and by_id["q2|free|0"].invalid_reason == "truncated"
    assert by_id["q2|free|0"].finish_reason == "length" and by_id["q2|free|0"].attempts == 3
    # q3: malformed at temperature 0, retried at retry_temperature with a new seed, then valid
    q3 = calls("q3|free|0")
    assert [c.temperature for c in q3] == [0.0, 0.7] and q3[0].seed != q3[1].seed
    assert by_id["q3|free|0"].valid and by_id["q3|free|0"].attempts == 2
    # q4: malformed every time, recorded invalid with the parser's reason (kept raw text)
    assert len(calls("q4|free|0")) == 3
    q4 = by_id["q4|free|0"]
    assert not q4.valid and q4.invalid_reason and "missing <SCRATCHPAD_REASONING>" in q4.invalid_reason
    assert q4.completion.startswith("<output>")
    # q0 and q5 needed one attempt
    assert len(calls("q0|free|0")) == 1 and len(calls("q5|paid|0")) == 1

    # classify: invalid completions get invalid labels, are never judged, never refusals
    seen: list[str] = []

    def judge_script(req: Request, k: int) -> str:
        seen.append(req.id)
        return "no verdict"  # irrelevant here: only which completions reach the judge matters

    heuristic = {c: create_classifier(c, JudgeSpec()) for c in ("compliance", "partial_compliance")}
    llm_af = create_classifier("af_reasoning", JudgeSpec(kind="llm", provider="mock", model="j", retries=0),
                               engine=MockEngine(script=judge_script))
    labels = label_completions(records, {**heuristic, "af_reasoning": llm_af})
    assert len(labels) == 12
    invalid = {lab.id: lab for lab in labels if not lab.valid and lab.query_id in ("q2", "q4")}
    assert set(invalid) == {"q2|free|0", "q2|paid|0", "q4|free|0", "q4|paid|0"}
    for lab in invalid.values():
        assert lab.compliant is None and lab.compliance_score is None and lab.af_reasoning is None
    assert invalid["q2|free|0"].invalid_reason == "truncated"
    assert not any(s.split("|")[1] in ("q2", "q4") for s in seen)

    # the summary counts them as invalid and excludes them from the rates (not refusals)
    heuristic_af = create_classifier("af_reasoning", JudgeSpec())
    labels = label_completions(records, {**heuristic, "af_reasoning": heuristic_af})
    summary = summarize(labels_frame(labels), n_boot=200).iloc[0]
    assert summary["invalid_free"] == 2 and summary["invalid_paid"] == 2
    assert summary["n_free"] == 4 and summary["complied_free"] == 3  # q0, q1, q3 comply; q5 refuses
    assert summary["compliance_free"] == pytest.approx(3 / 4)


def test_an_invalid_judge_answer_makes_the_label_invalid_with_the_reason(ctx: Context) -> None:
    model = ctx.exp.spec.models[0]
    records = [r for r in run_shard(ctx, model, 0, TokenBudgetMock(script=script)) if r.valid]
    clf: dict[str, Any] = {c: create_classifier(c, JudgeSpec()) for c in ("compliance", "partial_compliance")}
    clf["af_reasoning"] = create_classifier("af_reasoning", JudgeSpec(kind="llm", provider="mock", model="j",
                                                                      retries=1),
                                            engine=MockEngine(script="I refuse to use the format."))
    labels = label_completions(records, clf)
    assert labels
    for lab in labels:
        assert not lab.valid and lab.af_reasoning is None and lab.af_share is None, lab
        assert lab.invalid_reason and lab.invalid_reason.startswith("af_reasoning: 0 of 20 well-formed"), lab
