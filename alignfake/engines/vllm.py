"""vLLM engine: offline batched generation with automatic prefix caching and LoRA adapters.

The whole shard goes to ``LLM.generate`` as one list and vLLM's scheduler batches it (on CPU with LoRA, one list
per adapter: see ``VLLMEngine._batches``). Prompts are rendered with
the model's chat template by the Hugging Face tokenizer (the same call the transformers engine makes) and sent as
token ids, so the ≈6k-token system prompt is a token-identical prefix of every request: the first request fills
the prefix cache and the others reuse its KV blocks.

Precision (``precision``), as tested with vLLM 0.32 (CPU build):

========  ===================================  ==============================================================
value     vLLM arguments                       notes
========  ===================================  ==============================================================
auto      ``dtype="auto"``                     vLLM's rule: fp32 checkpoints are served in 16 bits (bf16 on
                                               CPU), 16-bit checkpoints as stored
bf16      ``dtype="bfloat16"``                 GPU and CPU
fp16      ``dtype="float16"``                  GPU and CPU
fp32      ``dtype="float32"``                  GPU and CPU; the CPU tests use it for token-exact parity with
                                               transformers
fp8       ``quantization="fp8"``               online FP8 weight quantization of a 16-bit checkpoint (GPUs
                                               with FP8 support; Hopper/Ada run it natively); not on CPU
nf4       ``quantization="bitsandbytes"``      for vLLM versions that still ship bitsandbytes (CUDA only);
                                               vLLM 0.32 has removed it, so the engine refuses nf4 there with
                                               a message: serve the base at bf16/fp8 with
                                               ``allow_precision_mismatch``, or use the transformers engine
========  ===================================  ==============================================================

On CPU (vLLM's detected platform) the engine reserves an explicit KV cache (``kv_cache_gb``, default 1 GiB; the environment
variable ``VLLM_CPU_KVCACHE_SPACE`` overrides it) because vLLM's CPU backend otherwise reserves
``gpu_memory_utilization`` of the machine's memory and refuses to start on a shared host; and it runs eagerly
(no torch.compile) because compiling costs more than it saves for one shard.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ..errors import EngineError
from ..tinymodel import resolve_model_path
from .base import Engine, Request, Response

__all__ = ["VLLMEngine", "adapter_rank", "lora_rank_slot", "precision_args", "render_prompt"]

# alignfake precision -> (vLLM dtype, vLLM quantization)
_PRECISION: dict[str, tuple[str, str | None]] = {
    "auto": ("auto", None),
    "bf16": ("bfloat16", None),
    "fp16": ("float16", None),
    "fp32": ("float32", None),
    "fp8": ("auto", "fp8"),
    "nf4": ("auto", "bitsandbytes"),
}
# vLLM sizes its LoRA buffers for one of these ranks (vllm.config.lora.MaxLoRARanks).
_LORA_RANK_SLOTS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_FINISH: dict[str, Literal["stop", "length"]] = {"stop": "stop", "length": "length"}


def precision_args(precision: str) -> dict[str, Any]:
    """``dtype`` and ``quantization`` keyword arguments of ``vllm.LLM`` for an alignfake precision."""
    try:
        dtype, quantization = _PRECISION[precision]
    except KeyError:
        raise EngineError(
            f"vllm: unknown precision {precision!r}; expected one of {', '.join(_PRECISION)}"
        ) from None
    args: dict[str, Any] = {"dtype": dtype}
    if quantization is not None:
        args["quantization"] = quantization
    return args


def _check_precision_supported(precision: str) -> None:
    """Refuse precisions this vLLM build cannot serve before loading anything, with a message that says what
    to do instead (vLLM's own errors surface deep in model loading)."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.platforms import current_platform

    quantization = precision_args(precision).get("quantization")
    if quantization is None:
        return
    if quantization not in QUANTIZATION_METHODS:
        raise EngineError(
            f"vllm: precision {precision!r} needs quantization={quantization!r}, which this vLLM does not support; "
            "serve the base at bf16 or fp8 (set inference.allow_precision_mismatch) or use the transformers engine"
        )
    if quantization == "fp8" and current_platform.is_cpu():
        raise EngineError("vllm: precision 'fp8' needs a GPU (vLLM's CPU backend has no FP8 kernels); use bf16")


def adapter_rank(adapter_dir: str) -> int:
    """The largest LoRA rank in a peft adapter directory (``r`` and any per-module ``rank_pattern``)."""
    path = Path(adapter_dir) / "adapter_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EngineError(f"vllm: LoRA adapter {adapter_dir}: {path.name} not found (is it a peft adapter?)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"vllm: LoRA adapter {adapter_dir}: cannot read {path.name}: {e}") from None
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    ranks = [r for r in ranks if r is not None]
    if not ranks or not all(isinstance(r, int) and r > 0 for r in ranks):
        raise EngineError(f"vllm: LoRA adapter {adapter_dir}: {path.name} has no valid rank 'r' (got {ranks})")
    return max(ranks)


def lora_rank_slot(rank: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds ``rank``."""
    for slot in _LORA_RANK_SLOTS:
        if slot >= rank:
            return slot
    raise EngineError(f"vllm: LoRA rank {rank} is above vLLM's maximum of {_LORA_RANK_SLOTS[-1]}")


def render_prompt(
    tokenizer: Any, messages: Sequence[dict[str, str]], prefill: str | None = None, chat_template: str | None = None
) -> str:
    """The prompt text of one request: the chat template with the assistant turn opened, then the prefill.

    This is what ``tokenizer.apply_chat_template(..., add_generation_prompt=True)`` renders in transformers;
    the prefill is appended verbatim so generation continues the assistant turn. The system message comes first
    and is rendered the same for every request, so every prompt starts with the same bytes."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise EngineError(
            "vllm: the model's tokenizer has no chat template; pass chat_template (a Jinja file or string)"
        )
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=True, chat_template=chat_template
    )
    return text + (prefill or "")


class VLLMEngine(Engine):
    """Generates with an offline ``vllm.LLM``.

    ``model``: a Hugging Face id, a local directory, or ``alignfake:tiny``. ``adapter``: a peft LoRA directory
    applied to every request that names no adapter of its own (``Request.adapter``). ``enable_lora``: load the
    LoRA machinery even without a default adapter, so requests can each name one (or none: the base model);
    defaults to whether ``adapter`` is set. ``max_lora_rank``: defaults to the rank of ``adapter``.
    ``gpus``: tensor-parallel size (0 and 1 both mean one device). ``batch_size`` is accepted for the shared
    engine options and not used: vLLM schedules the whole shard itself; ``max_num_seqs`` caps the sequences
    decoded together. ``llm_kwargs``: further ``vllm.LLM`` arguments, applied last.
    """

    name = "vllm"

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        gpus: int = 0,
        precision: str = "auto",
        max_model_len: int = 16384,
        batch_size: int | None = None,
        seed: int = 0,
        enable_prefix_caching: bool = True,
        *,
        enable_lora: bool | None = None,
        max_lora_rank: int | None = None,
        max_loras: int = 1,
        max_num_seqs: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_gb: float | None = None,
        enforce_eager: bool | None = None,
        chat_template: str | None = None,
        llm_kwargs: dict[str, Any] | None = None,
        **_: object,
    ):
        try:
            from vllm import LLM
            from vllm.platforms import current_platform
        except ImportError as e:  # the registry checked the package exists; this is a broken install
            raise EngineError(f"vllm is installed but cannot be imported: {e}") from e

        # The platform vLLM detected, not ``gpus``, decides the CPU defaults: gpus=0 on a GPU host still runs
        # on one GPU and must keep CUDA graphs and the memory-fraction KV cache.
        self._cpu = bool(current_platform.is_cpu())

        self.model = resolve_model_path(model)
        self.adapter = adapter
        self.precision = precision
        self.max_model_len = max_model_len
        self.enable_lora = bool(adapter) if enable_lora is None else enable_lora
        if adapter and not self.enable_lora:
            raise EngineError("vllm: an adapter was given with enable_lora=False")
        rank = max_lora_rank if max_lora_rank is not None else (adapter_rank(adapter) if adapter else 16)
        self.max_lora_rank = lora_rank_slot(rank)
        self.chat_template = _read_template(chat_template) if chat_template else None
        self._lora_ids: dict[str, int] = {}

        _check_precision_supported(precision)
        kwargs: dict[str, Any] = {
            "tensor_parallel_size": max(gpus, 1),
            "max_model_len": max_model_len,
            "seed": seed,
            "enable_prefix_caching": enable_prefix_caching,
            # CUDA graphs pay off on GPUs; on CPU compilation takes longer than the shard.
            "enforce_eager": self._cpu if enforce_eager is None else enforce_eager,
            **precision_args(precision),
        }
        if self._cpu:
            kwargs["kv_cache_memory_bytes"] = int((kv_cache_gb if kv_cache_gb is not None else 1.0) * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if kv_cache_gb is not None:
                kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * 2**30)
        if self.enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=self.max_lora_rank, max_loras=max_loras)
        if max_num_seqs is not None:
            kwargs["max_num_seqs"] = max_num_seqs
        kwargs.update(llm_kwargs or {})
        self.llm_args = kwargs
        try:
            self._llm: Any = LLM(self.model, **kwargs)
        except Exception as e:  # vLLM raises plain ValueError/RuntimeError for bad configs and missing models
            raise EngineError(f"vllm: cannot start {self.model} ({_describe(kwargs)}): {e}") from e
        self.tokenizer = self._llm.get_tokenizer()

    # ------------------------------------------------------------------------------------------- generation

    def encode(self, request: Request) -> list[int]:
        """Token ids of a request's prompt. The template writes its own BOS, so no special tokens are added."""
        text = render_prompt(self.tokenizer, request.messages, request.prefill, self.chat_template)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        results: list[Response | None] = [None] * len(requests)
        prompts, params, loras, index = [], [], [], []
        for i, req in enumerate(requests):
            if req.max_tokens < 1 or req.n < 1:
                raise EngineError(f"vllm: request {req.id}: max_tokens and n must be at least 1")
            ids = self.encode(req)
            room = self.max_model_len - len(ids)
            if room < 1:
                results[i] = Response(
                    id=req.id,
                    texts=[""] * req.n,
                    finish_reasons=["error"] * req.n,
                    prompt_tokens=len(ids),
                    error=f"prompt of {len(ids)} tokens does not fit max_model_len={self.max_model_len}",
                )
                continue
            prompts.append(TokensPrompt(prompt_token_ids=ids))
            params.append(
                SamplingParams(
                    # vLLM refuses n > 1 when greedy; greedy samples are identical, so one is copied n times
                    n=req.n if req.temperature > 0 else 1,
                    # vLLM stops at max_model_len anyway; clamping keeps it from rejecting the request.
                    max_tokens=min(req.max_tokens, room),
                    temperature=req.temperature,
                    seed=req.seed,
                )
            )
            loras.append(self._lora_request(req.adapter or self.adapter))
            index.append(i)
        for group in self._batches(loras):
            outputs = self._llm.generate(
                [prompts[j] for j in group],
                [params[j] for j in group],
                lora_request=[loras[j] for j in group] if self.enable_lora else None,
                use_tqdm=False,
            )
            for j, out in zip(group, outputs, strict=True):
                results[index[j]] = _response(requests[index[j]], out)
        return [r for r in results if r is not None]

    def _batches(self, loras: list[Any]) -> list[list[int]]:
        """Positions of the requests to send together: all of them, except on CPU with LoRA, where each adapter
        (and the base model) gets its own batch. vLLM's CPU LoRA ops read the "no adapter" index -1 as the last
        adapter slot, so a base request batched with adapter requests silently gets the adapter's delta
        (vllm-project/vllm#48421, open for 0.32; the GPU kernels skip -1 correctly)."""
        if not loras:
            return []
        if not (self.enable_lora and self._cpu):
            return [list(range(len(loras)))]
        groups: dict[int, list[int]] = {}
        for j, lora in enumerate(loras):
            groups.setdefault(lora.lora_int_id if lora is not None else 0, []).append(j)
        return list(groups.values())

    def _lora_request(self, adapter: str | None) -> Any:
        if adapter is None:
            return None
        if not self.enable_lora:
            raise EngineError(f"vllm: request names adapter {adapter} but the engine was started without LoRA")
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter).resolve())
        if key not in self._lora_ids:
            rank = adapter_rank(key)
            if rank > self.max_lora_rank:
                raise EngineError(
                    f"vllm: adapter {adapter} has rank {rank} > max_lora_rank={self.max_lora_rank}; "
                    "start the engine with a larger max_lora_rank"
                )
            self._lora_ids[key] = len(self._lora_ids) + 1  # vLLM ids start at 1 and must be unique per adapter
        return LoRARequest(lora_name=f"adapter-{self._lora_ids[key]}", lora_int_id=self._lora_ids[key], lora_path=key)

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is None:
            return
        self._llm = None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        gc.collect()


def _response(req: Request, out: Any) -> Response:
    samples = sorted(out.outputs, key=lambda c: c.index)
    if len(samples) < req.n:  # greedy: one sample stands for all n
        samples = samples * req.n
    return Response(
        id=req.id,
        texts=[c.text for c in samples],
        finish_reasons=[_FINISH.get(c.finish_reason or "", "error") for c in samples],
        prompt_tokens=len(out.prompt_token_ids or []),
        completion_tokens=sum(len(c.token_ids) for c in samples),
        meta={
            "token_ids": [list(c.token_ids) for c in samples],
            # prompt tokens served from the prefix cache (whole KV blocks only)
            "cached_tokens": out.num_cached_tokens or 0,
        },
    )


def _read_template(value: str) -> str:
    """A chat template given as a file path or as the template text itself."""
    path = Path(value).expanduser()
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{" not in value:
        raise EngineError(f"vllm: chat_template {value!r} is neither a file nor a Jinja template")
    return value


def _describe(kwargs: dict[str, Any]) -> str:
    keys = ("tensor_parallel_size", "dtype", "quantization", "max_model_len", "enable_lora", "max_lora_rank")
    return ", ".join(f"{k}={kwargs[k]}" for k in keys if k in kwargs)
