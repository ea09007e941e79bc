"""GPU smoke test of alignfake's vLLM engine (not run in CI: CI has no GPU).

Runs the paper's workload shape (the scenario's shared system prompt, demo queries x both tiers) through
``VLLMEngine`` with tensor parallelism over the visible GPUs, once per precision (bf16 and fp8 by default), with
a random LoRA adapter and prefix caching, and checks:

* every request gets a non-empty answer with a finish reason of ``stop`` or ``length``;
* prefix caching hits: every request after the first of each LoRA setting reuses the system prompt's KV blocks;
* LoRA routing in a mixed batch: base and adapter requests sent in one ``generate`` call give what they give
  when each kind is sent alone (GPU kernels skip the "no adapter" slot; vLLM's CPU ops do not, see
  ``alignfake/engines/vllm.py``). Greedy decoding in bf16 is not bit-stable across batch compositions, so the
  check counts only requests whose base and adapter outputs differ and requires most of them to route right;
* the adapter changes the output of at least one request;
* the engine ran with the requested tensor-parallel size and quantization.

Usage (in the vLLM image or any venv with vllm, torch, transformers, peft and alignfake):

    python tests/gpu/vllm_smoke.py                                  # tiny model, bf16 and fp8
    python tests/gpu/vllm_smoke.py --model /models/Llama-3.1-8B-Instruct --precisions bf16 fp8
    ALIGNFAKE_SMOKE_MODEL=/models/Qwen2.5-0.5B-Instruct python tests/gpu/vllm_smoke.py

``--model`` (or ``ALIGNFAKE_SMOKE_MODEL``) is a local model directory; without it the embedded tiny model is
built locally (about a minute on CPU). Each precision runs in its own child process, so GPU memory is fully
released between runs. The last line is ``vllm_smoke: PASS`` or ``vllm_smoke: FAIL (...)``; the exit status
is 0 or 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIN_ROUTED = 0.8


def log(msg: str) -> None:
    print(f"[vllm_smoke] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------- setup


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def tensor_parallel_size(model_dir: str, gpus: int) -> int:
    """The largest TP size <= gpus that the model's heads split into (vLLM requires heads % tp == 0 and KV
    heads either divisible by tp or replicated evenly)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads)
    for tp in range(gpus, 0, -1):
        if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0):
            return tp
    return 1


def make_adapter(model_dir: str, out: Path, scale: float) -> str:
    """A random peft LoRA adapter (r=8 on every projection) with nonzero B, built on CPU."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # On CPU in bf16: only the adapter's weights are needed, and they are saved from here.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [t for t in TARGETS if t in present] or ["q_proj", "v_proj"]
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    peft_model.save_pretrained(out)
    return str(out)


def build_requests(n_queries: int, max_tokens: int) -> list[Any]:
    from alignfake.engines import Request
    from alignfake.scenarios import build_messages
    from alignfake.spec import ScenarioSpec

    queries_file = REPO / "alignfake" / "data" / "demo_queries.jsonl"
    queries = [json.loads(line)["prompt"] for line in queries_file.read_text().splitlines() if line.strip()]
    queries = (queries * (n_queries // max(len(queries), 1) + 1))[:n_queries]
    scenario = ScenarioSpec()
    return [
        Request(id=f"{i:04d}|{tier}", messages=build_messages(q, tier, scenario), max_tokens=max_tokens)
        for i, q in enumerate(queries)
        for tier in ("free", "paid")
    ]


# ----------------------------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> None:
    """One precision: load once with LoRA, run base-only, adapter-only and mixed batches; write JSON."""
    from alignfake.engines import create_engine

    job = json.loads(Path(args.job).read_text())
    base = build_requests(job["queries"], job["max_tokens"])
    lora = [dataclasses.replace(r, id=f"lora:{r.id}", adapter=job["adapter"]) for r in base]
    t0 = time.perf_counter()
    engine = create_engine(
        "vllm", model=job["model"], gpus=job["tp"], precision=job["precision"], enable_lora=True,
        max_lora_rank=8, max_model_len=job["max_model_len"], enable_prefix_caching=True,
    )
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"precision": job["precision"], "load_s": load_s, "runs": {}}
    try:
        cfg = engine._llm.llm_engine.vllm_config
        out["tp"] = cfg.parallel_config.tensor_parallel_size
        out["quantization"] = cfg.model_config.quantization
        out["dtype"] = str(cfg.model_config.dtype)
        # base alone first: it is also the cold run for the prefix cache
        for name, reqs in (("base", base), ("lora", lora), ("mixed", [x for pair in zip(base, lora, strict=True) for x in pair])):
            t0 = time.perf_counter()
            responses = engine.generate(reqs)
            seconds = time.perf_counter() - t0
            out["runs"][name] = {
                "seconds": seconds,
                "completion_tokens": sum(r.completion_tokens for r in responses),
                "responses": {
                    r.id: {
                        "tokens": r.meta["token_ids"][0],
                        "text": r.text,
                        "finish": r.finish_reason,
                        "cached": r.meta["cached_tokens"],
                        "prompt_tokens": r.prompt_tokens,
                    }
                    for r in responses
                },
            }
            log(f"{job['precision']}: {name:5s} {len(reqs)} requests in {seconds:.1f} s")
    finally:
        engine.close()
    Path(args.out).write_text(json.dumps(out))


# ----------------------------------------------------------------------------------------------- checks


def check(result: dict[str, Any], tp: int, precision: str) -> list[str]:
    problems: list[str] = []
    runs = result["runs"]
    if result["tp"] != max(tp, 1):
        problems.append(f"tensor_parallel_size {result['tp']} != {max(tp, 1)}")
    if precision == "fp8" and result["quantization"] != "fp8":
        problems.append(f"quantization {result['quantization']!r}, expected fp8")
    if precision == "bf16" and "bfloat16" not in result["dtype"]:
        problems.append(f"dtype {result['dtype']}, expected bfloat16")
    for name, run in runs.items():
        for rid, r in run["responses"].items():
            if not r["tokens"] or r["finish"] not in ("stop", "length"):
                problems.append(f"{name}/{rid}: empty or finish={r['finish']}")
    # Prefix cache: in the first (cold) run only the first request may miss; the later runs hit throughout.
    base = runs["base"]["responses"]
    misses = [rid for rid, r in base.items() if r["cached"] == 0]
    if len(misses) > 1:
        problems.append(f"prefix cache: {len(misses)} of {len(base)} base requests missed")
    shared = min(r["prompt_tokens"] for r in base.values())
    hits = [r["cached"] for r in base.values() if r["cached"] > 0]
    if hits and min(hits) < shared // 2:
        problems.append(f"prefix cache: a hit covered only {min(hits)} of >= {shared} prompt tokens")
    # LoRA routing
    lora = runs["lora"]["responses"]
    mixed = runs["mixed"]["responses"]
    informative = [rid for rid in base if base[rid]["tokens"] != lora[f"lora:{rid}"]["tokens"]]
    if not informative:
        problems.append("the adapter never changed the output: LoRA routing cannot be checked")
    else:
        base_ok = sum(mixed[rid]["tokens"] == base[rid]["tokens"] for rid in informative)
        lora_ok = sum(mixed[f"lora:{rid}"]["tokens"] == lora[f"lora:{rid}"]["tokens"] for rid in informative)
        crossed = sum(mixed[rid]["tokens"] == lora[f"lora:{rid}"]["tokens"] for rid in informative)
        log(f"{precision}: LoRA routing over {len(informative)} requests the adapter changes: "
            f"base kept {base_ok}, adapter kept {lora_ok}, base got the adapter's answer {crossed}")
        for what, ok in (("base", base_ok), ("adapter", lora_ok)):
            if ok < MIN_ROUTED * len(informative):
                problems.append(f"mixed batch: only {ok}/{len(informative)} {what} requests kept their output")
        if crossed > (1 - MIN_ROUTED) * len(informative):
            problems.append(f"mixed batch: {crossed} base requests generated the adapter's answer")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=os.environ.get("ALIGNFAKE_SMOKE_MODEL"),
                        help="local model directory (default: the embedded tiny model)")
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp8"])
    parser.add_argument("--queries", type=int, default=32, help="queries (x 2 tiers, x 2 for the adapter)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--lora-scale", type=float, default=0.1)
    parser.add_argument("--cpu", action="store_true",
                        help="run on vLLM's CPU backend instead (checks this script itself; fp8 does not run on CPU)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0

    gpus = 0 if args.cpu else visible_gpus()
    if gpus == 0 and not args.cpu:
        print("vllm_smoke: FAIL (no GPU visible)")
        return 1
    from alignfake.tinymodel import resolve_model_path

    t0 = time.perf_counter()
    model = args.model or resolve_model_path("alignfake:tiny")
    tp = tensor_parallel_size(model, gpus) if gpus else 0  # the engine's gpus=0 means CPU (one worker)
    log(f"model {model}, {gpus} GPU(s), tensor parallel {max(tp, 1)} (prepared in {time.perf_counter() - t0:.0f} s)")
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="vllm-smoke-") as tmp:
        adapter = make_adapter(model, Path(tmp) / "adapter", args.lora_scale)
        for precision in args.precisions:
            job = {"model": model, "adapter": adapter, "tp": tp, "precision": precision, "queries": args.queries,
                   "max_tokens": args.max_tokens, "max_model_len": args.max_model_len}
            job_path, out_path = Path(tmp) / f"{precision}.job.json", Path(tmp) / f"{precision}.out.json"
            job_path.write_text(json.dumps(job))
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, "--child", "--job", str(job_path), "--out", str(out_path)],
                env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
            )
            wall = time.perf_counter() - t0
            if proc.returncode != 0 or not out_path.exists():
                problems.append(f"{precision}: child failed with exit {proc.returncode}")
                continue
            result = json.loads(out_path.read_text())
            runs = result["runs"]
            toks = sum(r["completion_tokens"] for r in runs.values())
            secs = sum(r["seconds"] for r in runs.values())
            log(f"{precision}: load {result['load_s']:.1f} s, generate {secs:.1f} s ({toks / secs:.0f} tok/s), "
                f"process {wall:.0f} s, dtype {result['dtype']}, quantization {result['quantization']}")
            problems += [f"{precision}: {p}" for p in check(result, tp, precision)]
    if problems:
        for p in problems:
            log(f"problem: {p}")
        print(f"vllm_smoke: FAIL ({len(problems)} problem(s))")
        return 1
    print(f"vllm_smoke: PASS ({'cpu' if args.cpu else f'tp={tp}'}, precisions={' '.join(args.precisions)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
