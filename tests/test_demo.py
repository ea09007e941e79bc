"""The quickstart, as `make demo` runs it: the embedded tiny model, every stage real, offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "manifests" / "examples" / "quickstart.yaml"


def alignfake(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "alignfake.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


@pytest.mark.slow
def test_quickstart_runs_end_to_end_and_a_rerun_does_no_sampling(tmp_path: Path, tiny_model_cache: Path) -> None:
    env = {"ALIGNFAKE_CACHE": str(tiny_model_cache), "COLUMNS": "200"}
    store = tmp_path / "runs"
    first = alignfake("run", str(QUICKSTART), "--set", f"spec.storage={store}", "--no-progress", env=env)
    assert first.returncode == 0, first.stderr
    assert "numbers mean nothing" in first.stdout
    root = store / "quickstart"
    for rel in ("spec.yaml", "results/summary.csv", "results/summary.parquet", "results/report.md",
                "results/compliance_gap.png", "completions/tiny/shard-00000.jsonl", "labels/tiny/shard-00000.jsonl"):
        assert (root / rel).is_file() and (root / rel).stat().st_size > 0, rel
    completions = [json.loads(line) for p in sorted((root / "completions/tiny").glob("*.jsonl"))
                   for line in p.read_text().splitlines()]
    assert len(completions) == 20 * 2 and {c["tier"] for c in completions} == {"free", "paid"}
    markers = {p: p.read_bytes() for p in root.rglob("*.commit.json")}

    # the second run, in a process that reports afterwards whether a model stack was ever imported
    code = (
        "import sys, atexit\n"
        "atexit.register(lambda: print('LOADED_TORCH' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr))\n"
        "from alignfake.cli import main\n"
        "sys.argv = ['alignfake'] + sys.argv[1:]\n"
        "main()\n"
    )
    second = subprocess.run([sys.executable, "-c", code, "run", str(QUICKSTART), "--set", f"spec.storage={store}",
                             "--no-progress"], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env},
                            timeout=600)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout
    assert {p: p.read_bytes() for p in root.rglob("*.commit.json")} == markers  # nothing recommitted
    assert "NO_TORCH" in second.stderr  # no model was loaded: nothing was pending

    status = alignfake("status", str(QUICKSTART), "--set", f"spec.storage={store}", "-o", "json", env=env)
    assert {r["state"] for r in json.loads(status.stdout)["store"]} == {"done"}
