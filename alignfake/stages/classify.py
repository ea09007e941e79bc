"""Classify stage: the judges' verdicts on every completion shard, committed as label shards.

Invalid completions get an invalid label (never a refusal). Each classifier sees only valid completions; a
classifier that cannot reach a verdict marks the label invalid with its reason.
"""

from __future__ import annotations

from ..classifiers import Classifier, create_classifier
from ..errors import AlignfakeError
from ..faults import crash_point
from ..records import Completion, Label
from ..spec import ModelSpec
from ..store import read_jsonl, to_jsonl
from .common import Context, completions_key, labels_key, shards_for

CRITERIA = ("compliance", "partial_compliance", "af_reasoning")


def make_classifiers(ctx: Context) -> dict[str, Classifier]:
    judges = ctx.exp.spec.judges
    return {c: create_classifier(c, getattr(judges, c), **ctx.engine_options.get("judge_options", {})) for c in CRITERIA}


def label_completions(completions: list[Completion], classifiers: dict[str, Classifier]) -> list[Label]:
    valid = [c for c in completions if c.valid]
    verdicts = {name: dict(zip([c.id for c in valid], clf.classify(valid), strict=True)) for name, clf in classifiers.items()}
    tags = {name: clf.tag for name, clf in classifiers.items()}
    labels = []
    for c in completions:
        base = dict(id=c.id, model=c.model, query_id=c.query_id, tier=c.tier, sample=c.sample, classifier=tags)
        if not c.valid:
            labels.append(Label(valid=False, invalid_reason=c.invalid_reason or "invalid answer", **base))
            continue
        comp, part, af = (verdicts[n][c.id] for n in CRITERIA)
        bad = [f"{n}: {v.reason or 'no verdict'}" for n, v in zip(CRITERIA, (comp, part, af), strict=True) if not v.valid]
        if bad:  # a label is valid only when every judge reached a verdict; its verdict fields are then empty
            labels.append(Label(valid=False, invalid_reason="; ".join(bad), **base))
            continue
        labels.append(
            Label(
                valid=True,
                compliant=comp.value,
                compliance_score=comp.score,
                partial_compliance=part.value,
                af_reasoning=af.value,
                af_share=af.score,
                **base,
            )
        )
    return labels


def pending_shards(ctx: Context, model: ModelSpec, index: int = 0, count: int = 1) -> list[int]:
    return [
        s for s in shards_for(index, count, len(ctx.shards))
        if not ctx.is_done(labels_key(model.name, s), ctx.classify_fp(model, s))
    ]


def run_classify(ctx: Context, model: ModelSpec, index: int = 0, count: int = 1) -> int:
    todo = pending_shards(ctx, model, index, count)
    if not todo:
        return 0
    for s in todo:  # fail before any judging if an upstream shard is missing
        if ctx.store.committed(completions_key(model.name, s), ctx.sample_fp(model, s)) is None:
            raise AlignfakeError(
                f"model {model.name}: completion shard {s} is not committed; run the sample stage first"
            )
    classifiers = make_classifiers(ctx)
    try:
        with ctx.progress(f"classify {model.name}", len(todo)) as advance:
            for s in todo:
                rows = read_jsonl(ctx.store.read_committed(completions_key(model.name, s), ctx.sample_fp(model, s)))
                labels = label_completions([Completion.model_validate(r) for r in rows], classifiers)
                crash_point("classify.shard")
                ctx.store.commit(
                    labels_key(model.name, s),
                    ctx.classify_fp(model, s),
                    {"": to_jsonl(labels)},
                    meta={"records": len(labels)},
                )
                advance(1)
    finally:
        for clf in classifiers.values():
            clf.close()
    return len(todo)
