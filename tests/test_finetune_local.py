"""The finetune stage with the local (peft) trainer: document filtering and its counts, the committed adapter,
checkpoints in the store, and resuming after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_finetune_helpers import build_small_model, demo_texts, experiment, write_spec

from alignfake.data.loaders import LoadReport, Row
from alignfake.errors import AlignfakeError, StaleOutputError
from alignfake.finetune.checkpoints import checkpoint_fp, committed_checkpoints
from alignfake.finetune.documents import filter_documents
from alignfake.finetune.local import schedule, step_batches
from alignfake.finetune.verify import check_adapter
from alignfake.spec import FinetuneSpec, parse_experiment
from alignfake.stages.common import Context, adapter_key, checkpoints_prefix
from alignfake.store import LocalStore, store_for

REPO = Path(__file__).resolve().parents[1]
# Small and quick: 24 documents of at most 256 tokens, 8 per optimizer step, 6 epochs = 18 steps.
QUICK = {"max_doc_tokens": 256, "limit": 24, "epochs": 6, "micro_batch_size": 4, "gradient_accumulation_steps": 2,
         "save_steps": 3}


@pytest.fixture(scope="module")
def small_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(build_small_model(tmp_path_factory.mktemp("small-model")))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Train with one CPU thread, as the subprocesses do (OMP_NUM_THREADS=1): results are bit-identical only
    between runs with the same thread count, and on a shared CPU one thread is also the fastest."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def context(data: dict, *, recompute: bool = False) -> tuple[Context, list[str]]:
    exp = parse_experiment(data)
    store = store_for(exp)
    store.check()
    logs: list[str] = []
    return Context(exp, store, recompute=recompute, log=logs.append), logs


def finetune(data: dict, *, recompute: bool = False) -> tuple[Context, list[str], object]:
    from alignfake.stages.finetune import run_finetune

    ctx, logs = context(data, recompute=recompute)
    return ctx, logs, run_finetune(ctx, ctx.exp.spec.models[0])


# ----------------------------------------------------------------------------------------------- documents


def test_filter_counts_kept_too_long_malformed_and_beyond_limit() -> None:
    rows = [Row(f"{i:05d}", " ".join(["word"] * n)) for i, n in enumerate([5, 50, 8, 9, 70, 3, 4])]
    load = LoadReport(malformed=2, problems=["docs.jsonl, line 3: invalid JSON", "docs.jsonl, line 9: empty"])
    kept, report = filter_documents(rows, load, lambda texts: [len(t.split()) for t in texts],
                                    max_doc_tokens=10, limit=4)
    assert [d.id for d in kept] == ["00000", "00002", "00003", "00005"]
    assert (report.read, report.kept, report.dropped_length, report.dropped_malformed, report.dropped_limit) == \
        (9, 4, 2, 2, 1)
    assert report.tokens == 5 + 8 + 9 + 3 and report.longest_kept == 9
    assert report.summary() == ("4 documents kept (25 tokens), 2 dropped as longer than 10 tokens, 2 dropped as "
                                "malformed, 1 beyond the limit")


def test_stage_reports_document_counts_in_log_and_marker(tmp_path: Path, small_model: str, one_thread: None) -> None:
    texts = demo_texts()
    long_text = " ".join(texts[:6])  # far over 256 tokens
    lines = [json.dumps({"text": t}) for t in texts[:10]]
    lines[2:2] = ['{"text": "unterminated', json.dumps({"body": "no text column"}), json.dumps({"text": "  "})]
    lines.append(json.dumps({"text": long_text}))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(lines) + "\n")
    data = experiment(tmp_path / "runs", small_model, documents=str(docs),
                      **{**QUICK, "max_doc_tokens": 256, "epochs": 1, "save_steps": 50})
    ctx, logs, marker = finetune(data)
    meta = marker.meta["documents"]  # type: ignore[attr-defined]
    from transformers import AutoTokenizer

    from alignfake.finetune.documents import encode_documents

    lengths = [len(ids) for ids in encode_documents(AutoTokenizer.from_pretrained(small_model),
                                                    [*texts[:10], long_text])]
    too_long = sum(n > 256 for n in lengths)
    assert lengths[-1] > 256 and too_long < 11
    assert (meta["read"], meta["dropped_malformed"], meta["dropped_length"], meta["kept"]) == \
        (14, 3, too_long, 11 - too_long)
    assert meta["tokens"] == sum(n for n in lengths if n <= 256)
    assert any("line 3: invalid JSON" in p for p in meta["problems"])
    assert any("line 4: missing column 'text'" in p for p in meta["problems"])
    assert any(f"{11 - too_long} documents kept" in line and f"{too_long} dropped as longer than 256 tokens" in line
               and "3 dropped as malformed" in line for line in logs)


def test_no_document_short_enough_is_a_clear_error(tmp_path: Path, small_model: str) -> None:
    from alignfake.errors import DataError

    data = experiment(tmp_path / "runs", small_model, **{**QUICK, "max_doc_tokens": 8})
    with pytest.raises(DataError, match=r"spec.models\[0\].finetune: no documents left.*80 dropped as longer than 8"):
        finetune(data)


# ----------------------------------------------------------------------------------------------- schedule


def test_each_epoch_visits_every_document_once_in_a_seeded_order() -> None:
    ft = FinetuneSpec(documents="d", micro_batch_size=3, gradient_accumulation_steps=2, epochs=2, seed=5)
    per_epoch, total = schedule(20, ft)
    assert (per_epoch, total) == (4, 8)
    for epoch in range(2):
        seen = [i for s in range(epoch * 4, epoch * 4 + 4) for mb in step_batches(s, 20, ft) for i in mb]
        assert sorted(seen) == list(range(20))
    assert step_batches(0, 20, ft) != step_batches(4, 20, ft)  # reshuffled per epoch
    assert [len(mb) for mb in step_batches(3, 20, ft)] == [2]  # the epoch's last step takes the remainder
    other = FinetuneSpec(documents="d", micro_batch_size=3, gradient_accumulation_steps=2, epochs=2, seed=6)
    assert step_batches(0, 20, ft) != step_batches(0, 20, other)


# ----------------------------------------------------------------------------------------------- training


def test_adapter_is_committed_checked_and_checkpoints_cleaned_up(tmp_path: Path, small_model: str,
                                                                  one_thread: None) -> None:
    data = experiment(tmp_path / "runs", small_model, **QUICK)
    ctx, logs, marker = finetune(data)
    store = ctx.store
    piece = adapter_key("m")
    assert store.committed(piece, ctx.finetune_fp(ctx.exp.spec.models[0])) is not None
    assert sorted(marker.objects) == ["adapter_config.json", "adapter_model.safetensors"]  # type: ignore[attr-defined]
    meta = marker.meta  # type: ignore[attr-defined]
    assert (meta["steps"], meta["optimizer_steps"], meta["resumed_from_step"]) == (18, 18, 0)
    assert meta["trainer"] == "peft" and meta["documents"]["kept"] == 24
    adapter_dir = store.local_path(piece)
    stats = check_adapter(adapter_dir)
    assert stats.tensors == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == small_model
    assert sorted(config["target_modules"]) == sorted(FinetuneSpec(documents="d").lora.target_modules)
    # checkpoints were committed every 3 steps while training, and removed once the adapter was committed
    assert [line for line in logs if "checkpoint committed" in line][0].startswith("finetune m: step 3/18")
    assert store.list(checkpoints_prefix("m")) == []
    # a rerun finds the adapter and does nothing but clear checkpoints a kill after the commit left behind
    store.commit(f"{checkpoints_prefix('m')}/step-00000003", "fp", files={"training_state.pt": b"x"})
    _, logs2, again = finetune(data)
    assert again is None and logs2 == ["finetune m: adapter already committed"]
    assert store.list(checkpoints_prefix("m")) == []


def test_lora_weights_change_and_the_model_loads_with_peft(tmp_path: Path, small_model: str,
                                                           one_thread: None) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ctx, _, _ = finetune(experiment(tmp_path / "runs", small_model, **{**QUICK, "epochs": 2}))
    adapter_dir = ctx.store.local_path(adapter_key("m"))
    tok = AutoTokenizer.from_pretrained(small_model)
    ids = tok(demo_texts()[0], return_tensors="pt")["input_ids"][:, :64]
    base = AutoModelForCausalLM.from_pretrained(small_model)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
        after = tuned(input_ids=ids).logits
    assert not torch.allclose(before, after, atol=1e-4)


def test_nf4_without_a_gpu_is_refused_with_a_clear_message(tmp_path: Path, small_model: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: nf4 would train")
    data = experiment(tmp_path / "runs", small_model, **{**QUICK, "quantization": "nf4"})
    with pytest.raises(AlignfakeError, match="nf4 \\(QLoRA\\) needs a CUDA GPU"):
        finetune(data)


def test_stale_checkpoints_are_refused_unless_recomputing(tmp_path: Path, small_model: str) -> None:
    data = experiment(tmp_path / "runs", small_model, **QUICK)
    ctx, _ = context(data)
    store = ctx.store
    prefix = checkpoints_prefix("m")
    store.commit(f"{prefix}/step-00000003", "an-older-spec", files={"training_state.pt": b"x"}, meta={"step": 3})
    fp = checkpoint_fp(ctx.finetune_fp(ctx.exp.spec.models[0]) or "", "peft")
    with pytest.raises(StaleOutputError, match="--recompute"):
        committed_checkpoints(store, prefix, fp)
    logs: list[str] = []
    assert committed_checkpoints(store, prefix, fp, recompute=True, log=logs.append) == []
    assert store.list(prefix) == [] and logs == [f"recompute: removing stale checkpoint {prefix}/step-00000003"]


# ----------------------------------------------------------------------------------------------- SIGKILL


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_restart_gives_the_uninterrupted_result(
    tmp_path: Path, small_model: str, one_thread: None
) -> None:
    """Bit-identical on CPU: the resumed run loads adapter, AdamW and scheduler state and the RNG from the
    checkpoint, and every step's batch is a function of the step. (On a GPU kernels may reduce in a different
    order; there the same steps and a close result are what holds.)"""
    # the uninterrupted reference, in this process
    _, _, reference = finetune(experiment(tmp_path / "ref", small_model, **QUICK))
    ref_bytes = (tmp_path / "ref" / "ft" / "adapters" / "m" / "final" / "adapter_model.safetensors").read_bytes()

    # the same run in a subprocess through the CLI entrypoint, killed once its first checkpoint is committed
    spec = write_spec(tmp_path / "spec.yaml", experiment(tmp_path / "killed", small_model, **QUICK))
    store = LocalStore(tmp_path / "killed" / "ft")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("ALIGNFAKE_FAULT", None)
    err = (tmp_path / "stderr.txt").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "alignfake.cli", "stage", "finetune", str(spec), "--model", "m"],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 300
    try:
        while not list(store.markers(checkpoints_prefix("m"))):
            assert proc.poll() is None, f"trainer exited before its first checkpoint: {_tail(err)}"
            assert time.monotonic() < deadline, "no checkpoint within 300 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        err.close()
    assert proc.returncode == -signal.SIGKILL
    assert store.marker(adapter_key("m")) is None, "the trainer finished before the kill; the test proves nothing"
    steps_at_kill = max(int(m.meta["step"]) for m in store.markers(checkpoints_prefix("m")))
    assert 3 <= steps_at_kill < 18

    # restart: it resumes from the newest committed checkpoint and finishes
    ctx, logs, resumed = finetune(experiment(tmp_path / "killed", small_model, **QUICK))
    assert any(f"resuming from the checkpoint of step {steps_at_kill}/18" in line for line in logs)
    meta, ref_meta = resumed.meta, reference.meta  # type: ignore[attr-defined]
    assert meta["resumed_from_step"] == steps_at_kill
    assert (meta["steps"], meta["optimizer_steps"]) == (ref_meta["steps"], ref_meta["optimizer_steps"]) == (18, 18)
    assert meta["final_loss"] == ref_meta["final_loss"]
    got = store.read_bytes("adapters/m/final/adapter_model.safetensors")
    assert got == ref_bytes, "on CPU the resumed adapter must be bit-identical to the uninterrupted one"


def _tail(f: object) -> str:
    f.seek(0)  # type: ignore[attr-defined]
    return f.read()[-2000:]  # type: ignore[attr-defined]
