"""Finetune stage: a LoRA/QLoRA adapter per model, trained on the model's synthetic documents.

1. Skip if ``adapters/{model}/final`` is committed with this fingerprint (base model, finetune section,
   document contents).
2. Load the documents leniently, measure them with the model's tokenizer, drop malformed and over-long ones,
   keep at most ``limit``; log the counts.
3. Train: ``trainer: peft`` in this process (:mod:`alignfake.finetune.local`), ``trainer: axolotl`` by launching
   Axolotl (:mod:`alignfake.finetune.axolotl`). Both commit checkpoints to ``adapters/{model}/checkpoints/``
   while training and resume from the newest one after a restart.
4. Check the saved adapter (non-empty, non-zero tensors), commit ``adapter_model.safetensors`` and
   ``adapter_config.json`` under ``adapters/{model}/final`` with a marker whose meta records the document counts,
   the steps and the trainer, then remove the checkpoints. The sample stage serves the base model with it.
"""

from __future__ import annotations

import shutil
from typing import Any

from ..errors import DataError
from ..finetune.checkpoints import checkpoint_fp, remove_all_checkpoints
from ..finetune.documents import Document, DocumentReport, filter_documents, tokenizer_counter
from ..finetune.precision import precision_mismatch_warning
from ..finetune.verify import ADAPTER_CONFIG, ADAPTER_WEIGHTS, check_adapter
from ..spec import ModelSpec
from ..store import Marker
from .common import Context, adapter_key, checkpoints_prefix


def run_finetune(ctx: Context, model: ModelSpec) -> Marker | None:
    """Train and commit ``model``'s adapter unless it is committed already; returns the new marker or None."""
    ft = model.finetune
    if ft is None:
        return None
    fp = ctx.finetune_fp(model)
    assert fp is not None
    piece = adapter_key(model.name)
    if ctx.is_done(piece, fp):
        ctx.log(f"finetune {model.name}: adapter already committed")
        if ctx.store.list(checkpoints_prefix(model.name)):  # killed between the commit and the clean-up
            remove_all_checkpoints(ctx.store, checkpoints_prefix(model.name))
        return None

    from ..tinymodel import resolve_model_path

    warning = precision_mismatch_warning(model)
    if warning:
        ctx.log(warning)
    base_path = resolve_model_path(model.base)
    tokenizer = load_tokenizer(base_path)
    documents, report = prepare_documents(ctx, model, tokenizer)
    ckpt_fp = checkpoint_fp(fp, ft.trainer)
    prefix = checkpoints_prefix(model.name)
    if ft.trainer == "peft":
        from ..finetune.local import train_local

        result: Any = train_local(
            base_path=base_path, base_name=model.base, tokenizer=tokenizer, documents=documents, ft=ft,
            store=ctx.store, ckpt_prefix=prefix, ckpt_fp=ckpt_fp, label=model.name, recompute=ctx.recompute,
            log=ctx.log, progress=ctx.progress,
        )
    else:
        from ..finetune.axolotl import train_axolotl

        result = train_axolotl(
            model=model, base_path=base_path, documents=documents, store=ctx.store, ckpt_prefix=prefix,
            ckpt_fp=ckpt_fp, recompute=ctx.recompute, log=ctx.log,
        )
    try:
        stats = check_adapter(result.adapter_dir)
        meta = {
            "model": model.name, "base": model.base, "trainer": ft.trainer, "precision": model.training_precision,
            "documents": report.as_meta(), "adapter": stats.as_meta(), **result.as_meta(),
        }
        marker = ctx.store.commit(
            piece, fp,
            local_files={name: result.adapter_dir / name for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG)},
            meta=meta,
        )
    finally:
        shutil.rmtree(result.adapter_dir, ignore_errors=True)
    removed = remove_all_checkpoints(ctx.store, prefix)
    ctx.log(f"finetune {model.name}: adapter committed after {result.steps} steps "
            f"({stats.parameters} parameters); {removed} checkpoint(s) removed")
    return marker


def load_tokenizer(base_path: str) -> Any:
    from transformers import AutoTokenizer

    from ..errors import AlignfakeError

    try:
        return AutoTokenizer.from_pretrained(base_path)
    except (OSError, ValueError) as e:
        raise AlignfakeError(f"cannot load the tokenizer of {base_path!r}: {e}") from None


def prepare_documents(ctx: Context, model: ModelSpec, tokenizer: Any) -> tuple[list[Document], DocumentReport]:
    """The documents to train on, filtered by length with the model's tokenizer; logs the counts."""
    ft = model.finetune
    assert ft is not None
    rows, load_report = ctx.documents(model)
    documents, report = filter_documents(rows, load_report, tokenizer_counter(tokenizer),
                                         max_doc_tokens=ft.max_doc_tokens, limit=ft.limit)
    ctx.log(f"finetune {model.name}: {report.summary()}")
    for problem in report.problems[:3]:
        ctx.log(f"  malformed: {problem}")
    if not documents:
        where = f"spec.models[{ctx.model_index(model)}].finetune"
        raise DataError(
            f"{where}: no documents left to train on ({report.summary()}); raise {where}.max_doc_tokens or fix "
            f"{ft.documents.source}"
        )
    return documents, report
