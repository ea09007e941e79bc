"""Two workers on the same shard by mistake: the last complete writer wins with identical content, and a torn
piece (object replaced by a writer that died before its marker) is detected and uncommitted, never trusted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from alignfake.errors import StoreError
from alignfake.store import LocalStore

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "specs" / "crash-mock.yaml"


def stage(name: str, store: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "alignfake.cli", "stage", name, str(SPEC), "--set", f"spec.storage={store}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ),
    )


@pytest.mark.slow
def test_two_workers_on_the_same_shards_commit_identical_content(tmp_path: Path) -> None:
    a, b = stage("sample", tmp_path / "both"), stage("sample", tmp_path / "both")
    for p in (a, b):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    single = stage("sample", tmp_path / "single")
    assert single.wait(timeout=300) == 0
    both, one = LocalStore(tmp_path / "both" / "crash"), LocalStore(tmp_path / "single" / "crash")
    shards = [k for k in one.list("completions") if k.endswith(".jsonl")]
    assert shards and [k for k in both.list("completions") if k.endswith(".jsonl")] == shards
    for key in shards:
        m = both.committed(key)
        assert m is not None
        assert both.read_committed(key, m.fingerprint) == one.read_bytes(key)
    # and the next stage runs on them
    c = stage("classify", tmp_path / "both")
    assert c.wait(timeout=300) == 0


def test_a_torn_piece_is_detected_and_uncommitted(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    store.commit("completions/m/shard-00000.jsonl", "fp1", {"": b'{"a": 1}\n'})
    # writer B replaces the object with other bytes of the same size, then dies before its marker
    store.write_bytes("completions/m/shard-00000.jsonl", b'{"a": 2}\n')
    assert store.committed("completions/m/shard-00000.jsonl", "fp1") is not None  # sizes alone agree
    with pytest.raises(StoreError, match="did not match its commit marker.*rerun"):
        store.read_committed("completions/m/shard-00000.jsonl", "fp1")
    assert store.committed("completions/m/shard-00000.jsonl", "fp1") is None  # now pending: a rerun redoes it
    assert store.exists("completions/m/shard-00000.jsonl")  # the data itself is left for inspection
