"""Plan before GPUs: per stage, the GPUs, GPU memory per device and GPU-hours, estimated by arithmetic from
the models' shapes (:mod:`alignfake.finetune.models`), and a refusal of what cannot fit, before anything is
submitted. No torch, no downloads; every assumption is listed with the plan.

Fine-tuning, per GPU:
  weights    the base at its training precision (bf16: 2 bytes per parameter; NF4: 4 bits plus double-quantized
             block scales, 0.516 bytes, on the decoder's linear layers, while embeddings and head stay bf16),
             divided over the GPUs under FSDP; plus, under FSDP, two unsharded layers (the one in use and the
             one prefetched)
  LoRA       16 bytes per adapter parameter: fp32 weights and gradients, AdamW's two moments; sharded by FSDP
  activations with activation checkpointing, one token-row of hidden states per layer, one layer's working
             set recomputed, and the logits (bf16, their fp32 copy for the loss and its gradient)
  overhead   CUDA context, allocator and kernels workspace; NCCL buffers with several GPUs
GPU-hours ≈ 6 · params · tokens / (peak FLOP/s · MFU): forward 2, backward to the activations 2 (LoRA skips the
frozen weights' gradients), activation recomputation 2.

Sampling (vLLM / transformers on GPUs), per GPU: weights at the serving precision over the tensor-parallel GPUs,
the adapter, a KV cache holding the shared system prompt once (prefix caching) plus each concurrent request's
own tokens, and overhead; checked against 90 % of memory (vLLM's default ``gpu_memory_utilization``). Time:
every answer runs to ``max_tokens`` (an upper bound), one decode step per token of a batch, each step at
least a read of all weights from memory and at least its FLOPs.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import AlignfakeError
from ..spec import Experiment, ModelSpec
from .models import ModelArch, model_arch
from .precision import precision_mismatch_warning

GIB = 1024**3
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, 8-bit absmax per 64, fp32 scale per 256 blocks
CHARS_PER_TOKEN = 4.0
REMOTE_DOC_TOKENS_FRACTION = 0.6
"""Documents that cannot be read offline are assumed to average this fraction of ``max_doc_tokens``."""
TRAIN_OVERHEAD_GIB = 2.5
NCCL_GIB = 1.0
SERVE_OVERHEAD_GIB = 3.0
TRAIN_HEADROOM = 0.95
"""Fine-tuning must fit in this share of GPU memory (fragmentation)."""
SERVE_UTILIZATION = 0.90
MFU = {"none": 0.35, "nf4": 0.25}
"""Model FLOP utilisation assumed for LoRA on a bf16 base and QLoRA (dequantising NF4 costs time)."""
DECODE_BANDWIDTH_EFFICIENCY = 0.7
SERVE_MFU = 0.35


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gib: float
    """Usable memory as the driver reports it."""
    bf16_tflops: float
    """Dense bf16 tensor-core peak."""
    hbm_tbps: float


GPUS: dict[str, Gpu] = {
    "h100-80gb": Gpu("H100 80GB", 79.6, 989.0, 3.35),
    "h200": Gpu("H200 141GB", 140.4, 989.0, 4.8),
    "a100-80gb": Gpu("A100 80GB", 80.0, 312.0, 2.04),
    "a100-40gb": Gpu("A100 40GB", 40.0, 312.0, 1.56),
    "l40s": Gpu("L40S 48GB", 45.0, 362.0, 0.864),
    "l4": Gpu("L4 24GB", 22.5, 121.0, 0.3),
}
DEFAULT_GPU = "h100-80gb"


def gpu_from_labels(node_selector: dict[str, str]) -> str | None:
    """The GPU type a node selector asks for (``nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3``,
    ``cloud.google.com/gke-accelerator: nvidia-l4``), if known."""
    product = " ".join(v for k, v in node_selector.items() if "gpu" in k.lower() or "accelerator" in k.lower()).upper()
    for pattern, key in (("H200", "h200"), ("H100", "h100-80gb"), (r"A100.*80", "a100-80gb"), ("A100", "a100-40gb"),
                         ("L40S", "l40s"), (r"\bL4\b|-L4$|NVIDIA-L4", "l4")):
        if re.search(pattern, product):
            return key
    return None


@dataclass
class StagePlan:
    stage: str
    model: str | None
    device: str
    """``8 x H100 80GB``, ``CPU``, ``API`` ..."""
    gpus: int = 0
    memory_gib: dict[str, float] = field(default_factory=dict)
    """Per-GPU components."""
    capacity_gib: float | None = None
    """Memory the components must fit in (after headroom)."""
    gpu_hours: float | None = None
    wall_hours: float | None = None
    tokens: int | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def total_gib(self) -> float | None:
        return round(sum(self.memory_gib.values()), 1) if self.memory_gib else None


@dataclass
class Plan:
    stages: list[StagePlan]
    assumptions: list[str]

    @property
    def problems(self) -> list[str]:
        return [p for s in self.stages for p in s.problems]

    def as_json(self) -> dict[str, Any]:
        return {"stages": [{**asdict(s), "total_gib": s.total_gib} for s in self.stages],
                "assumptions": self.assumptions, "problems": self.problems}


@dataclass(frozen=True)
class PlanOptions:
    gpu: str | None = None
    """GPU type (a key of GPUS); default: from each stage's node selector, else H100 80GB."""
    mfu: float | None = None
    documents: int | None = None
    """Override the number of fine-tuning documents (after filtering)."""
    doc_tokens: float | None = None
    """Override the mean tokens per document."""


def plan_experiment(exp: Experiment, options: PlanOptions = PlanOptions()) -> Plan:
    if options.gpu is not None and options.gpu not in GPUS:
        raise AlignfakeError(f"unknown GPU {options.gpu!r}; known: {', '.join(GPUS)}")
    stages: list[StagePlan] = []
    for m in exp.spec.models:
        if m.finetune is not None:
            stages.append(plan_finetune(exp, m, options))
    for m in exp.spec.models:
        stages.append(plan_sample(exp, m, options))
    stages.append(_plan_classify(exp))
    stages.append(StagePlan("reduce", None, "CPU"))
    assumptions = [
        f"bytes per parameter: bf16 2, fp8 1, nf4 {NF4_BYTES:.3f} (decoder linear layers; embeddings and head "
        "stay bf16)",
        "LoRA training state: 16 bytes per adapter parameter (fp32 weights and gradients, AdamW moments)",
        "activations with activation checkpointing; logits kept in bf16 and fp32 with their gradient",
        f"overhead per GPU: {TRAIN_OVERHEAD_GIB} GiB training (+{NCCL_GIB} GiB NCCL with several GPUs), "
        f"{SERVE_OVERHEAD_GIB} GiB serving",
        f"training must fit in {TRAIN_HEADROOM:.0%} of GPU memory; serving in {SERVE_UTILIZATION:.0%} "
        "(vLLM's gpu_memory_utilization)",
        "fine-tuning GPU-hours = 6 x params x tokens / (peak bf16 FLOP/s x MFU); MFU "
        + (f"{options.mfu}" if options.mfu else f"{MFU['none']} (LoRA), {MFU['nf4']} (QLoRA)")
        + "; padding and evaluation not counted",
        f"documents read offline are measured at {CHARS_PER_TOKEN:g} characters per token; remote ones are "
        f"assumed to number `limit` and average {REMOTE_DOC_TOKENS_FRACTION:.0%} of max_doc_tokens",
        "sampling: every answer runs to max_tokens (upper bound); decode steps read all weights at "
        f"{DECODE_BANDWIDTH_EFFICIENCY:.0%} of HBM bandwidth; prompts at {CHARS_PER_TOKEN:g} characters per "
        "token, the system prompt cached once (prefix caching)",
    ]
    return Plan(stages, assumptions)


# ----------------------------------------------------------------------------------------------- finetune


def plan_finetune(exp: Experiment, model: ModelSpec, options: PlanOptions) -> StagePlan:
    ft = model.finetune
    assert ft is not None
    arch = model_arch(model.base)
    n_docs, doc_tokens, doc_note = _documents(ft, options)
    tokens = int(n_docs * doc_tokens * ft.epochs)
    lora_params = arch.lora_params(ft.lora.r, ft.lora.target_modules)
    plan = StagePlan("finetune", model.name, "CPU", tokens=tokens,
                     notes=[doc_note, f"{_count(arch.params)} parameters ({arch.source}), "
                                      f"{_count(lora_params)} LoRA parameters (r={ft.lora.r})"])
    if ft.gpus == 0:
        if ft.trainer == "axolotl":
            plan.problems.append(f"finetune {model.name}: trainer axolotl needs GPUs (finetune.gpus is 0)")
        if ft.quantization == "nf4":
            plan.problems.append(f"finetune {model.name}: quantization nf4 needs a CUDA GPU (finetune.gpus is 0)")
        host = (arch.params * 4 + lora_params * 16) / GIB
        plan.notes.append(f"CPU training in fp32: about {_size(host)} of host memory before activations")
        return plan

    gpu_key = options.gpu or gpu_from_labels(_node_selector(exp, "finetune")) or DEFAULT_GPU
    gpu = GPUS[gpu_key]
    used = ft.gpus if ft.trainer == "axolotl" else 1
    if ft.trainer == "peft" and ft.gpus > 1:
        plan.notes.append(f"the peft trainer uses 1 of the {ft.gpus} GPUs; trainer: axolotl shards over all")
    plan.gpus = ft.gpus
    plan.device = f"{ft.gpus} x {gpu.name}"
    plan.memory_gib = {k: round(v / GIB, 2) for k, v in finetune_memory(arch, model, used).items()}
    plan.capacity_gib = round(gpu.memory_gib * TRAIN_HEADROOM, 1)
    mfu = options.mfu or MFU[ft.quantization]
    gpu_seconds = 6 * arch.params * tokens / (gpu.bf16_tflops * 1e12 * mfu)
    plan.gpu_hours = round(gpu_seconds / 3600 * ft.gpus / used, 1)  # idle GPUs of a peft run still count
    plan.wall_hours = round(gpu_seconds / 3600 / used, 2)
    total = sum(plan.memory_gib.values())
    if total > plan.capacity_gib:
        plan.problems.append(_does_not_fit(model, ft, plan, gpu, total))
    return plan


def finetune_memory(arch: ModelArch, model: ModelSpec, gpus: int) -> dict[str, float]:
    """Bytes per GPU for training ``model``'s adapter on ``gpus`` GPUs (FSDP when more than one)."""
    ft = model.finetune
    assert ft is not None
    linear_bytes = NF4_BYTES if ft.quantization == "nf4" else 2.0
    shard = max(1, gpus)
    weights = (arch.num_layers * arch.layer_linear_params * linear_bytes
               + (arch.embedding_params + arch.num_layers * 2 * arch.hidden_size + arch.hidden_size) * 2.0)
    out = {"weights": weights / shard}
    if shard > 1:
        out["fsdp all-gather (2 layers)"] = 2 * arch.layer_linear_params * linear_bytes
    out["lora (weights, grads, AdamW)"] = arch.lora_params(ft.lora.r, ft.lora.target_modules) * 16.0 / shard
    t = ft.micro_batch_size * ft.max_doc_tokens
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    out["activations"] = (arch.num_layers * t * h * 2.0  # checkpointed layer inputs, bf16
                          + t * (12 * h + 6 * i) * 2.0  # one layer recomputed
                          + t * v * 10.0)  # logits: bf16, fp32 copy, fp32 gradient
    out["overhead"] = (TRAIN_OVERHEAD_GIB + (NCCL_GIB if shard > 1 else 0.0)) * GIB
    return out


def _does_not_fit(model: ModelSpec, ft: Any, plan: StagePlan, gpu: Gpu, total: float) -> str:
    parts = ", ".join(f"{k} {v:.1f}" for k, v in plan.memory_gib.items())
    hints = []
    if plan.memory_gib.get("weights", 0) > plan.capacity_gib * 0.5:  # type: ignore[operator]
        if ft.quantization != "nf4":
            hints.append("quantization: nf4 (QLoRA)")
        hints.append("more GPUs with trainer: axolotl (FSDP shards the weights)" if ft.trainer == "axolotl"
                     or ft.gpus > 1 else "trainer: axolotl with several GPUs")
    else:
        hints.append("a smaller micro_batch_size (raise gradient_accumulation_steps) or max_doc_tokens")
    return (f"finetune {model.name}: needs ~{total:.1f} GiB per GPU ({parts} GiB) but a {gpu.name} offers "
            f"{plan.capacity_gib} GiB; try " + " or ".join(hints))


def _documents(ft: Any, options: PlanOptions) -> tuple[int, float, str]:
    """(documents after filtering, mean tokens per document, how that was found)."""
    n, mean, how = _documents_measured(ft)
    if options.documents is not None:
        n, how = options.documents, f"{options.documents} documents (given)"
    if options.doc_tokens is not None:
        mean, how = options.doc_tokens, how + f", {options.doc_tokens:g} tokens each (given)"
    return n, mean, how


def _documents_measured(ft: Any) -> tuple[int, float, str]:
    src = ft.documents.source
    local = src.startswith("builtin:") or Path(src).expanduser().is_file()
    if local:
        from ..data.loaders import LoadReport, load_rows

        try:
            rows = load_rows(ft.documents, field_path="finetune.documents", strict=False, report=LoadReport())
        except AlignfakeError:
            rows = []
        lengths = [math.ceil(len(r.text) / CHARS_PER_TOKEN) + 2 for r in rows]
        kept = [n for n in lengths if n <= ft.max_doc_tokens][: ft.limit]
        if kept:
            mean = sum(kept) / len(kept)
            return len(kept), mean, (f"{len(kept)} documents of ~{mean:.0f} tokens read from {src} "
                                     f"({len(lengths) - len(kept)} over the limits)")
    mean = ft.max_doc_tokens * REMOTE_DOC_TOKENS_FRACTION
    return ft.limit, mean, f"{ft.limit} documents of ~{mean:.0f} tokens assumed ({src} is not read offline)"


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _size(gib: float) -> str:
    return f"{gib:.1f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _node_selector(exp: Experiment, stage: str) -> dict[str, str]:
    res = exp.spec.kubernetes.stages.get(stage)  # type: ignore[call-overload]
    return dict(res.node_selector) if res is not None else {}


# ----------------------------------------------------------------------------------------------- sample


SERVE_BYTES = {"bf16": 2.0, "fp16": 2.0, "auto": 2.0, "fp32": 4.0, "fp8": 1.0, "nf4": NF4_BYTES}


def plan_sample(exp: Experiment, model: ModelSpec, options: PlanOptions) -> StagePlan:
    inf = model.inference
    warning = precision_mismatch_warning(model)
    if model.provider in ("openai", "anthropic", "mock"):
        return StagePlan("sample", model.name, "API" if model.provider != "mock" else "CPU (mock)")
    if inf.gpus == 0:
        return StagePlan("sample", model.name, "CPU", notes=[*([warning] if warning else []),
                                                               f"{model.provider} on CPU"])
    arch = model_arch(model.base)
    gpu_key = options.gpu or gpu_from_labels(_node_selector(exp, "sample")) or DEFAULT_GPU
    gpu = GPUS[gpu_key]
    tp = inf.gpus
    precision = model.serving_precision
    linear_bytes = SERVE_BYTES.get(precision, 2.0)
    ev = exp.spec.evaluation
    prefix_tokens, user_tokens = _prompt_tokens(exp)
    batch = inf.batch_size
    kv_tokens = max(prefix_tokens + batch * (user_tokens + ev.max_tokens), inf.max_model_len)
    weight_bytes = (arch.num_layers * arch.layer_linear_params * linear_bytes
                    + (arch.embedding_params + arch.num_layers * 2 * arch.hidden_size) * 2.0)
    memory = {"weights": weight_bytes / tp}
    if model.finetune is not None:
        memory["adapter"] = arch.lora_params(model.finetune.lora.r, model.finetune.lora.target_modules) * 2.0 / tp
    memory["kv cache"] = kv_tokens * arch.kv_bytes_per_token() / tp
    memory["overhead"] = SERVE_OVERHEAD_GIB * GIB
    n_queries, q_note = _queries(exp)
    requests = n_queries * len(ev.tiers) * ev.samples_per_query
    steps = math.ceil(requests / batch) * ev.max_tokens
    step_s = max(weight_bytes / (tp * gpu.hbm_tbps * 1e12 * DECODE_BANDWIDTH_EFFICIENCY),
                 2 * arch.params * batch / (tp * gpu.bf16_tflops * 1e12 * SERVE_MFU))
    prefill_s = 2 * arch.params * (prefix_tokens + requests * user_tokens) / (tp * gpu.bf16_tflops * 1e12 * SERVE_MFU)
    wall = (steps * step_s + prefill_s) / 3600
    notes = [f"serving precision {precision}" + (" (bf16 assumed)" if precision == "auto" else ""),
             f"{requests} requests ({q_note}), batches of {batch}, system prompt ~{prefix_tokens} tokens"]
    if warning:
        notes.insert(0, warning)
    plan = StagePlan(
        "sample", model.name, f"{tp} x {gpu.name}", gpus=tp,
        memory_gib={k: round(v / GIB, 2) for k, v in memory.items()},
        capacity_gib=round(gpu.memory_gib * SERVE_UTILIZATION, 1), gpu_hours=round(wall * tp, 2),
        wall_hours=round(wall, 2), tokens=requests * ev.max_tokens, notes=notes,
    )
    total = sum(plan.memory_gib.values())
    if total > plan.capacity_gib:  # type: ignore[operator]
        parts = ", ".join(f"{k} {v:.1f}" for k, v in plan.memory_gib.items())
        plan.problems.append(
            f"sample {model.name}: needs ~{total:.1f} GiB per GPU ({parts} GiB) on {tp} x {gpu.name} "
            f"(usable {plan.capacity_gib} GiB); serve at a lower precision (inference.precision fp8 or nf4), on "
            "more GPUs (inference.gpus), or with a smaller batch_size / max_model_len"
        )
    return plan


def _prompt_tokens(exp: Experiment) -> tuple[int, int]:
    """(shared system prompt tokens, per-request user turn tokens), at CHARS_PER_TOKEN."""
    try:
        from ..scenarios import system_prompt

        system = len(system_prompt(exp.spec.evaluation.scenario))
    except AlignfakeError:
        system = 6000 * int(CHARS_PER_TOKEN)  # the paper's ≈6k-token prompt, when a custom file is unreadable
    return math.ceil(system / CHARS_PER_TOKEN), 150


def _queries(exp: Experiment) -> tuple[int, str]:
    q = exp.spec.evaluation.queries
    if q.limit is not None:
        return q.limit, f"{q.limit} queries"
    src = q.source
    if src.startswith("builtin:") or Path(src).expanduser().is_file():
        from ..data.loaders import load_rows

        try:
            n = len(load_rows(q, field_path="evaluation.queries", strict=False))
            return n, f"{n} queries in {src}"
        except AlignfakeError:
            pass
    return 5000, f"{src} not read offline; ~5000 queries assumed"


def _plan_classify(exp: Experiment) -> StagePlan:
    j = exp.spec.judges
    local = [n for n, s in (("compliance", j.compliance), ("partial_compliance", j.partial_compliance),
                            ("af_reasoning", j.af_reasoning)) if s.kind == "llm" and s.provider in ("vllm",
                                                                                                    "transformers")]
    if local:
        return StagePlan("classify", None, "local judge model",
                         notes=[f"judges {', '.join(local)} serve a local model: not estimated"])
    kinds = {s.kind for s in (j.compliance, j.partial_compliance, j.af_reasoning)}
    return StagePlan("classify", None, "API" if "llm" in kinds else "CPU")
