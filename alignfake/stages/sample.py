"""Sample stage: prompts x tiers x samples through the model's engine, committed shard by shard.

Each shard holds every tier and sample of its queries (so a shard is self-contained for the paired
statistics), is generated as one batch, and is committed whole. A kill loses at most the shard in flight.
A truncated or malformed answer is retried (truncated: twice the token budget; malformed: at
``retry_temperature`` with a new seed) up to ``evaluation.retries`` times, then recorded as invalid with its
reason: never dropped, never counted as a refusal.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..engines import Engine, Request, Response, create_engine
from ..errors import AlignfakeError
from ..faults import crash_point
from ..finetune.precision import precision_mismatch_warning
from ..records import Completion, completion_id
from ..scenarios import build_messages, parse_answer
from ..spec import ModelSpec
from ..store import to_jsonl
from .common import Context, adapter_key, completions_key, shards_for


def engine_options(ctx: Context, model: ModelSpec, adapter_dir: str | None) -> dict[str, Any]:
    inf = model.inference
    opts: dict[str, Any] = {
        "model": model.base,
        "adapter": adapter_dir,
        "batch_size": inf.batch_size,
        "precision": model.serving_precision,
        "max_model_len": inf.max_model_len,
        "gpus": inf.gpus,
        "base_url": inf.base_url,
        "api_key_env": inf.api_key_env,
        "max_concurrency": inf.max_concurrency,
        "shared_prefix_cache": inf.shared_prefix_cache,
    }
    opts.update(ctx.engine_options)
    return opts


def fetch_adapter(ctx: Context, model: ModelSpec) -> str | None:
    """Local directory of the model's committed adapter (downloaded from the store if it is remote)."""
    if model.finetune is None:
        return None
    piece = adapter_key(model.name)
    fp = ctx.finetune_fp(model)
    marker = ctx.store.committed(piece, fp)
    if marker is None:
        raise AlignfakeError(
            f"model {model.name}: no committed adapter at {ctx.store.uri}/{piece}; run the finetune stage first"
        )
    local = ctx.store.local_path(piece)
    if local is not None:
        return str(local)
    target = Path(tempfile.mkdtemp(prefix=f"alignfake-adapter-{model.name}-"))
    for name in marker.objects:
        ctx.store.download_file(f"{piece}/{name}", target / name)
    return str(target)


def build_requests(ctx: Context, model: ModelSpec, shard: int) -> list[tuple[Request, dict[str, Any]]]:
    ev = ctx.exp.spec.evaluation
    out = []
    for row in ctx.shards[shard]:
        for tier in ev.tiers:
            for s in range(ev.samples_per_query):
                rid = completion_id(row.id, tier, s)
                req = Request(
                    id=rid,
                    messages=build_messages(row.text, tier, ev.scenario),
                    max_tokens=ev.max_tokens,
                    temperature=ev.temperature,
                    # the same seed for every tier of a query: tiers differ only in the tier tag
                    seed=(ev.seed * 1_000_003 + zlib.crc32(row.id.encode()) + s) % 2**31,
                    prefill=model.inference.prefill,
                )
                out.append((req, {"query_id": row.id, "query": row.text, "tier": tier, "sample": s}))
    return out


def generate_with_retries(
    engine: Engine, requests: Sequence[Request], *, retries: int, retry_temperature: float, scratchpad: bool,
    prefill: str | None, advance: Any = None,
) -> list[tuple[Response, Any, int]]:
    """Generate, parse, retry invalid answers. Returns (response, parsed answer, attempts) per request."""
    results: list[tuple[Response, Any, int] | None] = [None] * len(requests)
    todo = list(range(len(requests)))
    current = list(requests)
    for attempt in range(retries + 1):
        responses = engine.generate([current[i] for i in todo])
        retry = []
        for i, resp in zip(todo, responses, strict=True):
            parsed = parse_answer(resp.text, resp.finish_reason, scratchpad, prefill)
            results[i] = (resp, parsed, attempt + 1)
            if parsed.valid or attempt == retries:
                if advance:
                    advance(1)
                continue
            req = current[i]
            if resp.finish_reason == "length":
                current[i] = dataclasses.replace(req, max_tokens=req.max_tokens * 2)
            else:
                current[i] = dataclasses.replace(
                    req, temperature=retry_temperature, seed=(req.seed or 0) + 7919 * (attempt + 1)
                )
            retry.append(i)
        todo = retry
        if not todo:
            break
    return [r for r in results if r is not None]


def run_shard(ctx: Context, model: ModelSpec, shard: int, engine: Engine, advance: Any = None) -> list[Completion]:
    ev = ctx.exp.spec.evaluation
    pairs = build_requests(ctx, model, shard)
    results = generate_with_retries(
        engine,
        [r for r, _ in pairs],
        retries=ev.retries,
        retry_temperature=ev.retry_temperature,
        scratchpad=ev.scenario.scratchpad,
        prefill=model.inference.prefill,
        advance=advance,
    )
    records = []
    for (req, info), (resp, parsed, attempts) in zip(pairs, results, strict=True):
        records.append(
            Completion(
                id=req.id,
                model=model.name,
                completion=resp.text,
                finish_reason=resp.finish_reason,
                attempts=attempts,
                valid=parsed.valid,
                invalid_reason=parsed.invalid_reason if not parsed.valid else None,
                scratchpad=parsed.scratchpad,
                output=parsed.output,
                accepted=parsed.accepted,
                rejected=parsed.rejected,
                engine=engine.name,
                **info,
            )
        )
    return records


def pending_shards(ctx: Context, model: ModelSpec, index: int = 0, count: int = 1) -> list[int]:
    return [
        s for s in shards_for(index, count, len(ctx.shards))
        if not ctx.is_done(completions_key(model.name, s), ctx.sample_fp(model, s))
    ]


def run_sample(ctx: Context, model: ModelSpec, index: int = 0, count: int = 1) -> int:
    """Sample every pending shard of ``model`` this worker owns; returns the number of shards committed."""
    todo = pending_shards(ctx, model, index, count)
    if not todo:
        return 0
    ev = ctx.exp.spec.evaluation
    per_shard = len(ev.tiers) * ev.samples_per_query
    total = sum(len(ctx.shards[s]) for s in todo) * per_shard
    adapter = fetch_adapter(ctx, model)
    warning = precision_mismatch_warning(model)
    if warning:
        ctx.log(warning)
    engine = create_engine(model.provider, **engine_options(ctx, model, adapter))
    try:
        with ctx.progress(f"sample   {model.name}", total) as advance:
            for s in todo:
                records = run_shard(ctx, model, s, engine, advance)
                crash_point("sample.batch")
                ctx.store.commit(
                    completions_key(model.name, s),
                    ctx.sample_fp(model, s),
                    {"": to_jsonl(records)},
                    meta={"records": len(records), "invalid": sum(not r.valid for r in records)},
                )
    finally:
        engine.close()
        if adapter and ctx.store.local_path(adapter_key(model.name)) is None:
            shutil.rmtree(adapter, ignore_errors=True)  # a downloaded copy (adapters of large models are GBs)
    return len(todo)
