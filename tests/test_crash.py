"""Issue acceptance: SIGKILL `alignfake run` at ten points spread over sample, classify and reduce (and
finetune where the spec has it), rerun each to completion, and compare with an uninterrupted run: no completion
lost or duplicated, the same summary. Uses the deterministic mock engine so each run takes about a second;
tests/crash.py runs the same trials on any spec (the tiny model, an s3:// store) by hand."""

from __future__ import annotations

from pathlib import Path

import crash  # tests/crash.py
import pytest

SPEC = Path(__file__).parent / "specs" / "crash-mock.yaml"


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = crash.main([str(SPEC), "--store", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if "killed=" in ln]
    assert len(lines) >= 10
    assert all("killed=True" in ln and ln.endswith("ok") for ln in lines), out
