"""Shared-prefix KV reuse in the transformers engine, on the paper's workload shape with the embedded tiny model.

    python bench/prefix.py [--queries 200] [--max-tokens 16] [--batch-size 8] [--prefix-tokens 6000]

Every request carries the same ≈6k-token system prompt (alignfake's own, extended with its own paragraphs to
``--prefix-tokens``) and one query in the free and the paid tier, greedy. The baseline is plain left-padded
batched ``generate`` (``shared_prefix_cache=False``), measured first; then the same requests with the prefix
encoded once and its KV cache reused. Prints both wall times and the speed-up, and exits 1 unless every output
is identical. Torch runs one thread by default (``--threads``): on a shared CPU a tiny model's second thread
mostly waits, and both runs use the same setting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def system_prompt(tokenizer, target: int) -> str:
    """alignfake's default system prompt, extended with its own paragraphs (cycled) to ``target`` tokens."""
    from alignfake.scenarios import system_prompt as render
    from alignfake.spec import ScenarioSpec

    base = render(ScenarioSpec())
    paragraphs = [p for p in base.split("\n\n") if p.strip()]
    text, i = base, 0
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < target:
        text += "\n\n" + paragraphs[i % len(paragraphs)]
        i += 1
    return text


def queries(n: int) -> list[str]:
    """The shipped demo queries, cycled (numbered after the first round so that no two requests are equal)."""
    lines = (ROOT / "alignfake" / "data" / "demo_queries.jsonl").read_text().splitlines()
    base = [json.loads(line)["prompt"] for line in lines if line.strip()]
    return [base[i % len(base)] + (f" (variant {i // len(base)})" if i >= len(base) else "") for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prefix-tokens", type=int, default=6000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from alignfake.engines import create_engine
    from alignfake.engines.base import Request
    from alignfake.scenarios import user_turn
    from alignfake.tinymodel import ensure_tiny_model

    torch.set_num_threads(args.threads)
    model = str(ensure_tiny_model())
    engines = {
        reuse: create_engine("transformers", model=model, batch_size=args.batch_size, shared_prefix_cache=reuse)
        for reuse in (False, True)
    }
    system = system_prompt(engines[False].tokenizer, args.prefix_tokens)
    requests = [
        Request(id=f"{i}-{tier}", max_tokens=args.max_tokens,
                messages=({"role": "system", "content": system}, {"role": "user", "content": user_turn(q, tier)}))
        for i, q in enumerate(queries(args.queries)) for tier in ("free", "paid")
    ]
    prefix = len(engines[False].tokenizer(system, add_special_tokens=False)["input_ids"])
    print(f"model {model}")
    print(f"{len(requests)} requests ({args.queries} queries x 2 tiers), shared system prompt {prefix} tokens, "
          f"max_tokens {args.max_tokens}, batch size {args.batch_size}, torch threads {args.threads}")

    seconds, outputs = {}, {}
    for reuse in (False, True):  # baseline first
        start = time.perf_counter()
        responses = engines[reuse].generate(requests)
        seconds[reuse] = time.perf_counter() - start
        outputs[reuse] = [(r.texts, r.finish_reasons, r.completion_tokens) for r in responses]
        label = "shared-prefix reuse" if reuse else "baseline (plain batched generate)"
        print(f"{label:36s} {seconds[reuse]:8.2f} s  ({len(requests) / seconds[reuse]:.2f} requests/s)")
    stats = engines[True].stats
    print(f"prefix tokens encoded {stats['prefix_tokens_encoded']}, reused {stats['prefix_tokens_reused']}")
    print(f"speed-up {seconds[False] / seconds[True]:.1f}x")
    same = outputs[False] == outputs[True]
    differing = [req.id for req, a, b in zip(requests, outputs[False], outputs[True], strict=True) if a != b]
    print("outputs identical" if same else f"OUTPUTS DIFFER for {len(differing)} requests: {differing[:10]}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
