"""Whole experiments against a real S3-compatible server on loopback (`rclone serve s3`, which checks request
signatures): the quickstart end to end on an s3:// store, the server killed and restarted in the middle of a
stage, and the same results as a local run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from crash import snapshot  # tests/crash.py
from s3server import RcloneS3Server

ROOT = Path(__file__).resolve().parents[1]
MOCK_SPEC = ROOT / "tests" / "specs" / "crash-mock.yaml"
QUICKSTART = ROOT / "manifests" / "examples" / "quickstart.yaml"


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    server = RcloneS3Server(tmp_path / "s3root")
    ep = server.start()
    env = {**ep.env(), "AWS_ENDPOINT_URL": ep.endpoint_url, "AWS_CONFIG_FILE": str(tmp_path / "none"),
           "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    yield server, ep, env
    server.stop()


def alignfake(spec: Path, store: str, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "alignfake.cli", "run", str(spec), "--no-progress", "-o", "json",
           "--set", f"spec.storage={store}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, **env})


@pytest.mark.slow
def test_quickstart_on_s3_matches_a_local_run(s3, tmp_path: Path, tiny_model_cache: Path) -> None:
    server, ep, env = s3
    env = {**env, "ALIGNFAKE_CACHE": str(tiny_model_cache)}
    local = alignfake(QUICKSTART, str(tmp_path / "local"), env)
    remote = alignfake(QUICKSTART, f"s3://{ep.bucket}/runs", env)
    (lout, lerr), (rout, rerr) = local.communicate(timeout=600), remote.communicate(timeout=600)
    assert local.returncode == 0, lerr
    assert remote.returncode == 0, rerr
    assert json.loads(rout) == json.loads(lout)
    keys = sorted(p.relative_to(server.root / ep.bucket / "runs" / "quickstart").as_posix()
                  for p in (server.root / ep.bucket / "runs" / "quickstart").rglob("*") if p.is_file())
    assert "results/summary.parquet.commit.json" not in keys and "results.commit.json" in keys
    assert {"spec.yaml", "results/report.md", "completions/tiny/shard-00000.jsonl"} <= set(keys)
    assert snapshot(str(tmp_path / "local"), "quickstart") == snapshot(f"s3://{ep.bucket}/runs", "quickstart")


@pytest.mark.slow
def test_server_killed_mid_stage_then_rerun_loses_nothing(s3, tmp_path: Path) -> None:
    server, ep, env = s3
    store = f"s3://{ep.bucket}/runs"
    # throttle the run so that the outage lands inside the sample stage: 10 shards, one committed at a time
    run = alignfake(MOCK_SPEC, store, env, "--set", "spec.evaluation.shard_size=2")
    shard_dir = server.root / ep.bucket / "runs" / "crash" / "completions" / "scripted"
    deadline = time.time() + 120
    while time.time() < deadline and not list(shard_dir.glob("*.commit.json")):
        time.sleep(0.05)
    assert list(shard_dir.glob("*.commit.json")), "the run never committed a shard"
    server.kill()
    time.sleep(1.5)
    server.start()
    out, err = run.communicate(timeout=600)
    if run.returncode != 0:  # it may fail, but only with a clear message naming the store
        assert "error:" in err and "s3://" in err, err
        assert "Traceback" not in err, err
    rerun = alignfake(MOCK_SPEC, store, env, "--set", "spec.evaluation.shard_size=2")
    _, rerr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, rerr
    # shard size changes the shard layout, not the completions: compare with a local run of the same layout
    local2 = alignfake(MOCK_SPEC, str(tmp_path / "local2"), env, "--set", "spec.evaluation.shard_size=2")
    assert local2.wait(timeout=300) == 0
    assert snapshot(store, "crash") == snapshot(str(tmp_path / "local2"), "crash")
