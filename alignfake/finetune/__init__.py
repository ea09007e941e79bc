"""Fine-tuning: LoRA/QLoRA adapters on synthetic documents, locally with peft or on the cluster with Axolotl.

Modules (the finetune stage, :mod:`alignfake.stages.finetune`, ties them together):

``documents``    load, measure with the model's tokenizer, filter and count the documents
``local``        the in-process trainer (peft, CPU or one GPU), resumable from store checkpoints
``axolotl``      the Axolotl config generated from the spec, the launch, and the checkpoint sync
``checkpoints``  training checkpoints as committed pieces of the store
``verify``       the check that a saved adapter has non-empty, non-zero tensors
``models``       model shapes known offline (a small table, ``config.json``, the tiny model's recipe)
``plan``         GPU memory and GPU-hour estimates (``alignfake plan``; ``commands`` holds the Click command)

Importing this package (or ``documents``, ``checkpoints``, ``verify``, ``models``, ``plan``, ``axolotl``)
loads no torch; only the local trainer imports it, when it trains.
"""

from __future__ import annotations

from .documents import Document, DocumentReport, filter_documents
from .models import ModelArch, model_arch
from .verify import AdapterCheckError, check_adapter

__all__ = [
    "AdapterCheckError",
    "Document",
    "DocumentReport",
    "ModelArch",
    "check_adapter",
    "filter_documents",
    "model_arch",
]
