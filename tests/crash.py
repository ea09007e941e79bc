"""Crash test: SIGKILL ``alignfake run`` at many points spread over every stage, rerun to completion each time,
and check that the final summary and the set of completions equal an uninterrupted run's.

The kills are real SIGKILLs, delivered by the process to itself at deterministic points
(``ALIGNFAKE_FAULT=point:N``, see alignfake/faults.py): between an object and its marker, after a marker,
after a generated batch, mid-classification, mid-training, while writing results.

    python tests/crash.py SPEC [--store DIR_OR_S3_URI] [--points all|short] [--env KEY=VALUE ...]

Exit 0 when every trial matches the baseline. tests/test_crash.py runs the short form in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (point, N): the N-th time the process reaches the point, it kills itself.
SHORT = [
    ("store.write", 1),  # first completion shard written, marker not yet
    ("store.marker", 1),  # first completion shard committed
    ("sample.batch", 2),  # second shard generated, not committed
    ("store.write", 3),
    ("store.marker", 4),
    ("classify.shard", 1),
    ("classify.shard", 3),
    ("store.marker", 6),
    ("reduce.write", 1),  # results written to a temp dir, not committed
    ("store.write", 9),  # inside the results commit (several objects, one marker)
]
FINETUNE = [("finetune.step", 1), ("finetune.step", 3), ("store.marker", 1)]


def alignfake(spec: Path, store: str, fault: str | None, env: dict[str, str],
              overrides: list[str] = ()) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, **env}
    e.pop("ALIGNFAKE_FAULT", None)
    if fault:
        e["ALIGNFAKE_FAULT"] = fault
    cmd = [sys.executable, "-m", "alignfake.cli", "run", str(spec), "--no-progress", "-o", "json",
           "--set", f"spec.storage={store}", *(x for o in overrides for x in ("--set", o))]
    return subprocess.run(cmd, capture_output=True, text=True, env=e, timeout=600)


def snapshot(store: str, name: str) -> tuple[list[dict], str]:
    """(sorted completion records, summary CSV) from a finished run."""
    from alignfake.spec import StorageSpec
    from alignfake.store import open_store, read_jsonl

    s = StorageSpec.model_validate(store)
    st = open_store(s.uri, name, endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    records = []
    for key in st.list("completions"):
        if key.endswith(".jsonl"):
            records.extend(read_jsonl(st.read_bytes(key)))
    return sorted(records, key=lambda r: (r["model"], r["id"])), st.read_text("results/summary.csv")


def fresh_store(base: str, i: int) -> str:
    return f"{base.rstrip('/')}/trial-{i:02d}" if base.startswith("s3://") else str(Path(base) / f"trial-{i:02d}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("spec", type=Path)
    ap.add_argument("--store", default=None, help="base store URI (default: a temp dir)")
    ap.add_argument("--points", choices=["short", "all", "finetune"], default="short",
                    help="short: ten points over sample, classify and reduce (+ finetune ones if the spec fine-tunes); "
                         "all: more; finetune: only the fine-tuning ones")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="spec override for every run")
    ap.add_argument("--env", action="append", default=[], help="KEY=VALUE for the runs")
    args = ap.parse_args(argv)
    env = dict(kv.split("=", 1) for kv in args.env)
    tmp = None
    if args.store is None:
        tmp = tempfile.mkdtemp(prefix="alignfake-crash-")
        args.store = tmp
    import yaml

    name = yaml.safe_load(args.spec.read_text())["metadata"]["name"]
    has_finetune = any("finetune" in m for m in yaml.safe_load(args.spec.read_text())["spec"]["models"])
    points = SHORT + (FINETUNE if has_finetune else [])
    if args.points == "finetune":
        if not has_finetune:
            ap.error("--points finetune needs a spec with a finetune section")
        points = FINETUNE
    if args.points == "all":
        points += [("store.write", n) for n in (2, 4, 6, 8)] + [("sample.batch", n) for n in (1, 3)]

    t0 = time.time()
    base_store = fresh_store(args.store, 0)
    res = alignfake(args.spec, base_store, None, env, args.overrides)
    if res.returncode != 0:
        print(f"baseline run failed:\n{res.stderr}", file=sys.stderr)
        return 2
    expected = snapshot(base_store, name)
    print(f"baseline: {len(expected[0])} completions ({time.time() - t0:.1f}s)")

    failures = 0
    for i, (point, n) in enumerate(points, start=1):
        store = fresh_store(args.store, i)
        fault = f"{point}:{n}"
        killed = alignfake(args.spec, store, fault, env, args.overrides)
        was_killed = killed.returncode == -signal.SIGKILL
        reruns = 0
        while True:
            reruns += 1
            done = alignfake(args.spec, store, None, env, args.overrides)
            if done.returncode == 0 or reruns == 3:
                break
        ok = done.returncode == 0 and snapshot(store, name) == expected
        failures += not ok
        status = "ok" if ok else "MISMATCH" if done.returncode == 0 else f"rerun failed: {done.stderr.strip()[-300:]}"
        print(f"{fault:20s} killed={was_killed!s:5s} reruns={reruns} {status}")
        if not was_killed:
            print(f"  note: the run finished before reaching {fault} (rc={killed.returncode})")
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"trials": len(points), "failures": failures, "seconds": round(time.time() - t0, 1)}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
