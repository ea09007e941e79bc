"""Issue acceptance: SIGKILL `alignfake run` at ten points spread over sample, classify and reduce, and at the
fine-tuning points of the quickstart, rerun each to completion, and compare with an uninterrupted run: no
completion lost or duplicated, the same summary. The ten use the deterministic mock engine so each run takes
about a second; the fine-tuning ones use the quickstart itself (the tiny model, LoRA on CPU) on fewer queries.
tests/crash.py runs the same trials on any spec (an s3:// store, --points all) by hand."""

from __future__ import annotations

from pathlib import Path

import crash  # tests/crash.py
import pytest

SPEC = Path(__file__).parent / "specs" / "crash-mock.yaml"
QUICKSTART = Path(__file__).resolve().parents[1] / "manifests" / "examples" / "quickstart.yaml"


@pytest.mark.slow
def test_killed_runs_resume_to_the_same_result(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = crash.main([str(SPEC), "--store", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if "killed=" in ln]
    assert len(lines) >= 10
    assert all("killed=True" in ln and ln.endswith("ok") for ln in lines), out


@pytest.mark.slow
def test_killed_fine_tuning_resumes_to_the_same_result(tmp_path: Path, tiny_model_cache: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc = crash.main([str(QUICKSTART), "--store", str(tmp_path), "--points", "finetune",
                     "--set", "spec.evaluation.queries.limit=4", "--env", f"ALIGNFAKE_CACHE={tiny_model_cache}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [ln for ln in out.splitlines() if "killed=" in ln]
    assert [ln.split()[0] for ln in lines] == ["finetune.step:1", "finetune.step:3", "store.marker:1"]
    assert all("killed=True" in ln and ln.endswith("ok") for ln in lines), out
