"""Fine-tuning with Axolotl on the cluster: the config generated from the spec, the launch, and the checkpoint
sync that makes a killed pod resumable.

The config (:func:`axolotl_config`) trains on the filtered documents as a raw-text ``completion`` dataset with
``sequence_len = max_doc_tokens``; LoRA, or QLoRA (``adapter: qlora``, ``load_in_4bit``) for ``quantization:
nf4``; on several GPUs, FSDP2 (``fsdp_version: 2``; Axolotl marks the FSDP1 ``fsdp:``/``fsdp_*`` keys
deprecated) with the settings a 405B QLoRA run needs on one node of 8 80 GB GPUs:

- ``reshard_after_forward: true`` (full sharding: every rank holds 1/N of the weights between uses),
- ``offload_params: false`` (the NF4 base fits on the GPUs; offloading would cost ~810 GB of host RAM in
  bf16 and slow every step; ``alignfake plan`` refuses what does not fit instead),
- ``cpu_ram_efficient_loading: false`` (Axolotl rejects it with 4-bit bases under FSDP2),
- ``auto_wrap_policy: TRANSFORMER_BASED_WRAP`` on the model's decoder layer class,
- ``activation_checkpointing: true`` (activations of 126 layers would not fit otherwise),
- ``state_dict_type: SHARDED_STATE_DICT`` for checkpoints (each rank writes its shard; no 405B gather on
  rank 0 every ``save_steps``) and ``final_state_dict_type: FULL_STATE_DICT`` for the final adapter.

Batches: each of the N processes takes ``micro_batch_size`` documents per micro-step, so an optimizer step
sees ``micro_batch_size x gradient_accumulation_steps x N`` documents (the local trainer: ``x 1``).

The stage entrypoint (:func:`train_axolotl`) writes the documents as JSONL, restores the newest checkpoint
committed to the store into ``output_dir``, writes the config, launches ``axolotl train`` with one process per
GPU (``ALIGNFAKE_AXOLOTL_CMD`` overrides the command), and while it runs commits each complete
``checkpoint-N`` directory to the store. After a kill, the rerun resumes from the newest synced checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlignfakeError
from ..spec import ModelSpec
from ..store import Store
from .checkpoints import commit_checkpoint_dir, latest_checkpoint, prune_checkpoints, restore_checkpoint
from .documents import Document
from .local import KEEP_CHECKPOINTS, MAX_GRAD_NORM, WARMUP_RATIO
from .models import ModelArch, model_arch
from .verify import ADAPTER_CONFIG, ADAPTER_WEIGHTS

COMMAND_ENV = "ALIGNFAKE_AXOLOTL_CMD"
DEFAULT_COMMAND = "axolotl train {config} --launcher torchrun -- --nproc_per_node={gpus}"
"""``{config}`` is the generated YAML file, ``{gpus}`` the number of processes (one per GPU)."""
WORKDIR_ENV = "ALIGNFAKE_WORKDIR"
"""Where documents, config and Axolotl's output go (default: a temporary directory). Point it at a large
local volume on the node: checkpoints of big models are many GB."""
POLL_SECONDS = 15.0
SETTLE_SECONDS = 30.0
"""A checkpoint directory whose files have not changed for this long (and that has ``trainer_state.json``,
which the Trainer writes last) is complete."""
TRAINER_STATE = "trainer_state.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


# ----------------------------------------------------------------------------------------------- config


def axolotl_config(
    model: ModelSpec, *, base_model: str | None = None, data_path: str = "data/documents.jsonl",
    output_dir: str = "output", prepared_path: str = "prepared", resume_from: str | None = None,
    arch: ModelArch | None = None,
) -> dict[str, Any]:
    """The Axolotl config (a plain mapping, ready for YAML) that trains ``model``'s adapter."""
    ft = model.finetune
    if ft is None:
        raise AlignfakeError(f"model {model.name} has no finetune section")
    if ft.gpus < 1:
        raise AlignfakeError(f"model {model.name}: trainer axolotl needs GPUs (finetune.gpus is 0); use trainer: "
                             "peft to train on CPU")
    fsdp = ft.gpus > 1
    if arch is None:
        try:
            arch = model_arch(model.base)
        except AlignfakeError:
            if fsdp:
                raise AlignfakeError(
                    f"model {model.name}: FSDP needs the decoder layer class of {model.base!r}, which alignfake "
                    "cannot read offline; use a local model directory or a known model id"
                ) from None
            arch = None
    cfg: dict[str, Any] = {
        "base_model": base_model or model.base,
        "seed": ft.seed,
    }
    if ft.quantization == "nf4":
        cfg.update({"load_in_4bit": True, "adapter": "qlora"})
    else:
        cfg["adapter"] = "lora"
    cfg.update({
        "lora_r": ft.lora.r,
        "lora_alpha": ft.lora.alpha,
        "lora_dropout": ft.lora.dropout,
        "lora_target_modules": list(ft.lora.target_modules),
        "datasets": [{"path": data_path, "ds_type": "json", "type": "completion", "field": "text"}],
        "dataset_prepared_path": prepared_path,
        "val_set_size": 0.0,
        "sequence_len": ft.max_doc_tokens,
        # One document per sequence, as in the paper and the local trainer: batch sizes count documents.
        "sample_packing": False,
        "pad_to_sequence_len": False,
        "micro_batch_size": ft.micro_batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation_steps,
        "num_epochs": ft.epochs,
        "learning_rate": ft.learning_rate,
        "optimizer": "adamw_torch",
        "lr_scheduler": "cosine",
        "warmup_ratio": WARMUP_RATIO,
        "weight_decay": 0.0,
        "max_grad_norm": MAX_GRAD_NORM,
        "bf16": True,
        "tf32": True,
        "attn_implementation": "sdpa",
        "output_dir": output_dir,
        "save_steps": ft.save_steps,
        "save_safetensors": True,
        "logging_steps": 1,
        "auto_resume_from_checkpoints": True,
    })
    if resume_from:
        cfg["resume_from_checkpoint"] = resume_from
    if arch is not None and arch.pad_token:
        cfg["special_tokens"] = {"pad_token": arch.pad_token}
    if fsdp:
        assert arch is not None
        cfg["fsdp_version"] = 2
        cfg["fsdp_config"] = {
            "reshard_after_forward": True,
            "offload_params": False,
            "cpu_ram_efficient_loading": False,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": arch.decoder_layer,
            "activation_checkpointing": True,
            "state_dict_type": "SHARDED_STATE_DICT",
            "final_state_dict_type": "FULL_STATE_DICT",
        }
    else:
        cfg["gradient_checkpointing"] = True
        cfg["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
    return cfg


def config_yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False)


def launch_command(config_path: str | Path, gpus: int) -> list[str]:
    template = os.environ.get(COMMAND_ENV) or DEFAULT_COMMAND
    return [part.format(config=str(config_path), gpus=gpus) for part in shlex.split(template)]


# ----------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class AxolotlResult:
    adapter_dir: Path
    steps: int | None
    """Axolotl's final global step (read from its trainer state), or None if it wrote none."""
    resumed_from_step: int
    checkpoints_synced: int
    gpus: int

    def as_meta(self) -> dict[str, Any]:
        return {"steps": self.steps, "resumed_from_step": self.resumed_from_step,
                "checkpoints_synced": self.checkpoints_synced, "gpus": self.gpus}


def train_axolotl(
    *, model: ModelSpec, base_path: str, documents: Sequence[Document], store: Store, ckpt_prefix: str,
    ckpt_fp: str, recompute: bool = False, log: Callable[[str], None] = lambda m: None,
    poll_seconds: float | None = None, settle_seconds: float | None = None,
) -> AxolotlResult:
    """Run Axolotl to completion (resuming from the store's newest checkpoint); return the final adapter."""
    ft = model.finetune
    assert ft is not None
    work = Path(os.environ.get(WORKDIR_ENV) or tempfile.mkdtemp(prefix="alignfake-axolotl-")) / model.name
    shutil.rmtree(work, ignore_errors=True)  # whatever is here is from an earlier attempt; the store is the truth
    data = work / "data" / "documents.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in documents), encoding="utf-8")
    out = work / "output"
    out.mkdir()

    resumed = 0
    resume_dir: Path | None = None
    latest = latest_checkpoint(store, ckpt_prefix, ckpt_fp, recompute=recompute, log=log)
    if latest is not None:
        resume_dir = restore_checkpoint(store, latest, out / f"checkpoint-{latest.step}")
        resumed = latest.step
        log(f"finetune {model.name}: resuming Axolotl from the checkpoint of step {latest.step}")
    cfg = axolotl_config(model, base_model=base_path, data_path=str(data), output_dir=str(out),
                         prepared_path=str(work / "prepared"), resume_from=str(resume_dir) if resume_dir else None)
    cfg_path = work / "axolotl.yaml"
    cfg_path.write_text(config_yaml(cfg), encoding="utf-8")
    cmd = launch_command(cfg_path, ft.gpus)
    per_step = ft.micro_batch_size * ft.gradient_accumulation_steps * ft.gpus
    log(f"finetune {model.name}: {len(documents)} documents, {per_step} per optimizer step over {ft.gpus} "
        f"process(es); launching: {shlex.join(cmd)}")

    syncer = CheckpointSyncer(store, ckpt_prefix, ckpt_fp, out, log=log, label=model.name, synced_step=resumed,
                              settle_seconds=SETTLE_SECONDS if settle_seconds is None else settle_seconds)
    rc = _run_and_sync(cmd, work, syncer, POLL_SECONDS if poll_seconds is None else poll_seconds)
    if rc != 0:
        where = f"step {syncer.synced_step}" if syncer.synced_step else "no checkpoint yet"
        raise AlignfakeError(
            f"finetune {model.name}: Axolotl exited with status {rc} (newest checkpoint in the store: {where}); "
            "rerun the finetune stage to resume"
        )
    missing = [n for n in (ADAPTER_WEIGHTS, ADAPTER_CONFIG) if not (out / n).is_file()]
    if missing:
        raise AlignfakeError(f"finetune {model.name}: Axolotl finished but {out} lacks {', '.join(missing)}")
    final = Path(tempfile.mkdtemp(prefix="alignfake-adapter-"))
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        shutil.copyfile(out / name, final / name)
    steps = _final_step(out)
    shutil.rmtree(work, ignore_errors=True)
    return AxolotlResult(adapter_dir=final, steps=steps, resumed_from_step=resumed,
                         checkpoints_synced=syncer.synced, gpus=ft.gpus)


def _run_and_sync(cmd: list[str], cwd: Path, syncer: CheckpointSyncer, poll_seconds: float) -> int:
    """Run the trainer in its own process group, syncing checkpoints while it runs; on SIGTERM (a pod being
    stopped) or an error here, stop the whole group so no orphaned rank keeps the GPUs."""
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, start_new_session=True)
    except OSError as e:
        raise AlignfakeError(f"cannot launch Axolotl ({shlex.join(cmd)}): {e}; is it installed in this image? "
                             f"{COMMAND_ENV} sets another command") from None

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop) if _main_thread() else None
    try:
        while proc.poll() is None:
            syncer.sync(running=True)
            time.sleep(poll_seconds)
        syncer.sync(running=False)
        return proc.returncode
    finally:
        if proc.poll() is None:
            _stop_group(proc)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _final_step(out: Path) -> int | None:
    candidates = [out / TRAINER_STATE] + sorted(
        (p / TRAINER_STATE for p in out.iterdir() if _CHECKPOINT_DIR.match(p.name)),
        key=lambda p: int(_CHECKPOINT_DIR.match(p.parent.name).group(1)),  # type: ignore[union-attr]
        reverse=True,
    )
    for path in candidates:
        try:
            return int(json.loads(path.read_text())["global_step"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


@dataclass
class CheckpointSyncer:
    """Commits the newest complete ``checkpoint-N`` directory under ``output`` to the store, prunes older ones
    (in the store and on local disk), and skips checkpoints already superseded by a newer complete one."""

    store: Store
    prefix: str
    fp: str
    output: Path
    log: Callable[[str], None] = lambda m: None
    label: str = ""
    synced_step: int = 0
    settle_seconds: float = SETTLE_SECONDS
    synced: int = 0
    _seen: dict[int, tuple[Any, float]] = field(default_factory=dict)

    def sync(self, running: bool) -> int | None:
        """One pass; returns the step committed, if any. ``running``: the trainer may still be writing."""
        steps = sorted((int(m.group(1)), p) for p in self._dirs() if (m := _CHECKPOINT_DIR.match(p.name)))
        complete = [(s, p) for i, (s, p) in enumerate(steps)
                    if s > self.synced_step and self._complete(s, p, newer=i < len(steps) - 1, running=running)]
        if not complete:
            return None
        step, path = complete[-1]
        meta: dict[str, Any] = {}
        try:
            meta["trainer_state"] = {k: v for k, v in json.loads((path / TRAINER_STATE).read_text()).items()
                                     if k in ("global_step", "epoch", "max_steps")}
        except (OSError, ValueError):
            pass
        commit_checkpoint_dir(self.store, self.prefix, self.fp, step, path, meta=meta)
        self.synced_step = step
        self.synced += 1
        prune_checkpoints(self.store, self.prefix, self.fp, keep=KEEP_CHECKPOINTS)
        for s, p in steps:
            if s < step:
                shutil.rmtree(p, ignore_errors=True)
        self.log(f"finetune {self.label}: checkpoint of step {step} committed to the store")
        return step

    def _dirs(self) -> list[Path]:
        try:
            return [p for p in self.output.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    def _complete(self, step: int, path: Path, *, newer: bool, running: bool) -> bool:
        if not (path / TRAINER_STATE).is_file():
            return False
        if newer or not running:
            return True
        listing = _listing(path)
        now = time.monotonic()
        seen = self._seen.get(step)
        if seen is None or seen[0] != listing:
            self._seen[step] = (listing, now)
            return self.settle_seconds <= 0
        return now - seen[1] >= self.settle_seconds


def _listing(path: Path) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in sorted(path.rglob("*")):
        try:
            st = p.stat()
        except FileNotFoundError:
            continue
        if p.is_file():
            out.append((p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns))
    return tuple(out)
