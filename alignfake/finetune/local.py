"""The local trainer: LoRA (or QLoRA on a CUDA GPU) with peft and a plain PyTorch loop, on CPU or one GPU.

One optimizer step takes ``micro_batch_size x gradient_accumulation_steps`` documents in an order fixed by the
seed and the epoch, so any step's batch is known without replaying the ones before it. The loss is the mean
over every predicted token of the step (not a mean of micro-batch means). The learning rate follows a linear
warmup over the first 3 % of steps and a cosine decay to zero, as the Axolotl config asks of Axolotl
(``lr_scheduler: cosine``, ``warmup_ratio: 0.03``); gradients are clipped at norm 1.0 and AdamW runs without
weight decay, as there.

Every ``save_steps`` optimizer steps the adapter weights, the optimizer and scheduler state, the RNG state and
the step are committed to the store (see :mod:`alignfake.finetune.checkpoints`); a restart loads the newest
committed checkpoint and continues with the next step. On CPU the resumed run is bit-identical to an
uninterrupted one; on a GPU, kernels may reduce in another order and the result match only closely.
"""

from __future__ import annotations

import io
import json
import math
import random
import shutil
import tempfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AlignfakeError
from ..faults import crash_point
from ..progress import no_progress
from ..spec import FinetuneSpec
from ..store import Store
from .checkpoints import commit_checkpoint_dir, latest_checkpoint, prune_checkpoints, restore_checkpoint
from .documents import Document, encode_documents
from .verify import ADAPTER_CONFIG, ADAPTER_WEIGHTS

TRAINING_STATE = "training_state.pt"
WARMUP_RATIO = 0.03
MAX_GRAD_NORM = 1.0
KEEP_CHECKPOINTS = 2
"""Committed checkpoints kept while training (older ones are removed once a newer one is committed)."""

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    """A directory holding ``adapter_model.safetensors`` and ``adapter_config.json``."""
    steps: int
    """The final global step (optimizer steps of the whole run, across restarts)."""
    optimizer_steps: int
    """Steps AdamW itself counted (its state survives restarts through the checkpoints)."""
    resumed_from_step: int
    """0 for a fresh run, else the step of the checkpoint this process started from."""
    tokens_per_epoch: int
    final_loss: float | None
    device: str

    def as_meta(self) -> dict[str, Any]:
        return {"steps": self.steps, "optimizer_steps": self.optimizer_steps,
                "resumed_from_step": self.resumed_from_step, "tokens_per_epoch": self.tokens_per_epoch,
                "final_loss": self.final_loss, "device": self.device}


def schedule(n_docs: int, ft: FinetuneSpec) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps)."""
    per_step = ft.micro_batch_size * ft.gradient_accumulation_steps
    per_epoch = math.ceil(n_docs / per_step)
    return per_epoch, per_epoch * ft.epochs


def step_batches(step: int, n_docs: int, ft: FinetuneSpec) -> list[list[int]]:
    """Document indices of each micro-batch of optimizer step ``step`` (0-based): a function of the step alone,
    so that a resumed run sees exactly the batches an uninterrupted run would."""
    per_epoch, _ = schedule(n_docs, ft)
    epoch, b = divmod(step, per_epoch)
    order = list(range(n_docs))
    random.Random(ft.seed * 1_000_003 + epoch).shuffle(order)
    per_step = ft.micro_batch_size * ft.gradient_accumulation_steps
    chosen = order[b * per_step : (b + 1) * per_step]
    m = ft.micro_batch_size
    return [chosen[i : i + m] for i in range(0, len(chosen), m)]


def lr_factor(step: int, total: int) -> float:
    """Multiplier of the learning rate at ``step``: linear warmup over ``ceil(3 % of total)`` steps (never zero,
    so the first step trains), then cosine decay towards zero."""
    warmup = math.ceil(WARMUP_RATIO * total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def train_local(
    *,
    base_path: str,
    base_name: str,
    tokenizer: Any,
    documents: Sequence[Document],
    ft: FinetuneSpec,
    store: Store,
    ckpt_prefix: str,
    ckpt_fp: str,
    label: str,
    recompute: bool = False,
    log: Callable[[str], None] = lambda m: None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train (or resume training) a LoRA adapter on ``documents``; return where the final adapter is."""
    import torch

    device = _device(ft, log, label)
    if ft.quantization == "nf4" and device.type != "cuda":
        raise AlignfakeError(
            f"{label}: quantization nf4 (QLoRA) needs a CUDA GPU and bitsandbytes; none is available here. "
            "Train with quantization: none on CPU, or on a GPU node."
        )
    sequences = encode_documents(tokenizer, [d.text for d in documents])
    pad_id = _pad_id(tokenizer)
    _, total = schedule(len(sequences), ft)

    model = _load_model(base_path, ft, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=ft.learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total))

    work = Path(tempfile.mkdtemp(prefix="alignfake-finetune-"))
    try:
        start = _resume(store, ckpt_prefix, ckpt_fp, model, optimizer, scheduler, total, work, recompute, log, label)
        model.train()
        loss_value: float | None = None
        with (progress or no_progress)(f"finetune {label}", total) as advance:
            advance(start)
            for step in range(start, total):
                loss_value = _train_step(model, sequences, step_batches(step, len(sequences), ft), pad_id, device)
                torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                crash_point("finetune.step")
                advance(1)
                done = step + 1
                if done % ft.save_steps == 0 and done < total:
                    _save_checkpoint(store, ckpt_prefix, ckpt_fp, done, model, optimizer, scheduler, work,
                                     loss_value)
                    log(f"finetune {label}: step {done}/{total}, loss {loss_value:.4f}, checkpoint committed")
        out = work / "adapter"
        _save_adapter(model, out, base_name)
        final = Path(tempfile.mkdtemp(prefix="alignfake-adapter-"))
        for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
            shutil.copyfile(out / name, final / name)
        return TrainResult(
            adapter_dir=final, steps=total, optimizer_steps=_adam_steps(optimizer), resumed_from_step=start,
            tokens_per_epoch=sum(len(s) for s in sequences), final_loss=loss_value, device=str(device),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- pieces


def _device(ft: FinetuneSpec, log: Callable[[str], None], label: str) -> Any:
    import torch

    if ft.gpus >= 1 and torch.cuda.is_available():
        if ft.gpus > 1:
            log(f"finetune {label}: the peft trainer uses one GPU of the {ft.gpus} requested; "
                "use trainer: axolotl to shard over several")
        return torch.device("cuda", 0)
    if ft.gpus >= 1:
        log(f"finetune {label}: no CUDA GPU available, training on CPU")
    return torch.device("cpu")


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:  # Llama 3 has no pad token; padded positions are masked, so any id will do
        pad = tokenizer.eos_token_id
    return int(pad[0] if isinstance(pad, list) else pad)


def _load_model(base_path: str, ft: FinetuneSpec, device: Any) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32 if device.type == "cpu" else torch.bfloat16}
    if ft.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": device.index or 0}
    try:
        model = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
    except OSError as e:
        raise AlignfakeError(f"cannot load base model {base_path!r}: {e}") from None
    if ft.quantization == "nf4":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    else:
        model.to(device)
        if device.type == "cuda":
            # activations of long documents dominate GPU memory; recomputing them costs ~1/3 more compute
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.config.use_cache = False
    config = LoraConfig(r=ft.lora.r, lora_alpha=ft.lora.alpha, lora_dropout=ft.lora.dropout,
                        target_modules=list(ft.lora.target_modules), bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(ft.seed)  # LoRA A matrices are drawn here: same seed, same initial adapter
    return get_peft_model(model, config)


def _train_step(model: Any, sequences: list[list[int]], micro_batches: list[list[int]], pad_id: int,
                device: Any) -> float:
    """Forward and backward over one optimizer step's micro-batches; returns the step's mean token loss."""
    import torch
    import torch.nn.functional as F

    predicted = sum(len(sequences[i]) - 1 for mb in micro_batches for i in mb)
    total = 0.0
    for mb in micro_batches:
        ids, mask = _collate([sequences[i] for i in mb], pad_id, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=ids, attention_mask=mask).logits
        labels = ids.masked_fill(mask == 0, -100)[:, 1:]
        loss_sum = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum")
        (loss_sum / predicted).backward()
        total += float(loss_sum.detach())
    return total / predicted


def _collate(batch: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    import torch

    n = max(len(x) for x in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, x in enumerate(batch):
        ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return ids.to(device), mask.to(device)


def _adam_steps(optimizer: Any) -> int:
    for state in optimizer.state.values():
        if "step" in state:
            return int(state["step"])
    return 0


def _save_adapter(model: Any, out: Path, base_name: str) -> None:
    model.save_pretrained(str(out), safe_serialization=True)
    # Name the base as the spec does (not this machine's cache path): the store's bytes stay portable.
    cfg_path = out / ADAPTER_CONFIG
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    cfg["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_checkpoint(store: Store, prefix: str, fp: str, step: int, model: Any, optimizer: Any, scheduler: Any,
                     work: Path, loss: float | None) -> None:
    import torch

    d = work / f"checkpoint-{step}"
    shutil.rmtree(d, ignore_errors=True)
    model.save_pretrained(str(d), safe_serialization=True)
    state = {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    (d / TRAINING_STATE).write_bytes(buf.getvalue())
    commit_checkpoint_dir(store, prefix, fp, step, d, meta={"loss": loss})
    shutil.rmtree(d, ignore_errors=True)
    prune_checkpoints(store, prefix, fp, keep=KEEP_CHECKPOINTS)


def _resume(store: Store, prefix: str, fp: str, model: Any, optimizer: Any, scheduler: Any, total: int,
            work: Path, recompute: bool, log: Callable[[str], None], label: str) -> int:
    """Load the newest committed checkpoint into model, optimizer, scheduler and RNG; return its step."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = latest_checkpoint(store, prefix, fp, recompute=recompute, log=log)
    if ckpt is None:
        return 0
    d = restore_checkpoint(store, ckpt, work / f"restore-{ckpt.step}")
    state = torch.load(d / TRAINING_STATE, weights_only=True, map_location="cpu")
    if state["step"] != ckpt.step or ckpt.step > total:
        raise AlignfakeError(f"{store.uri}/{ckpt.piece}: checkpoint of step {state['step']} does not fit a run of "
                             f"{total} steps; rerun with --recompute")
    weights = load_file(str(d / ADAPTER_WEIGHTS), device=str(next(model.parameters()).device))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    if missing:
        raise AlignfakeError(f"{store.uri}/{ckpt.piece}: adapter weights lack {missing[:3]}; rerun with --recompute")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    shutil.rmtree(d, ignore_errors=True)
    log(f"finetune {label}: resuming from the checkpoint of step {ckpt.step}/{total}")
    return ckpt.step
