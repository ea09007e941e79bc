"""The transformers engine: local models on CPU or small GPUs, with peft LoRA adapters and reuse of the KV
cache of the prompt prefix a batch shares.

Every request of an experiment starts with the same ≈6k-token system prompt (DESIGN.md), so encoding it
once dominates the saving. For each batch the engine takes the longest common token prefix of the prompts,
encodes it once (or reuses it from the previous batch, since the prefix cache survives across batches) and
generates only the suffixes. Rows are laid out as ``prefix | padding | suffix``: the attention mask hides
the padding and ``generate`` derives position ids from the mask, so every suffix token sits at exactly the
position it has in the unpadded prompt, and greedy outputs match plain left-padded batched ``generate``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import EngineError
from .base import Engine, Request, Response

__all__ = ["TransformersEngine"]

MIN_SHARED_PREFIX = 16
"""Shorter common prefixes are not worth a separate forward pass."""

_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


@dataclass
class _Prompt:
    index: int
    """Position of the request in the caller's list."""
    request: Request
    ids: list[int]
    adapter: str | None


@dataclass
class _PrefixEntry:
    tokens: tuple[int, ...]
    kv: list[tuple[Any, Any]]
    """Per layer (keys, values), each ``[1, kv_heads, len(tokens), head_dim]``."""


class TransformersEngine(Engine):
    """Generates with a Hugging Face causal LM (``model``: hub id, local directory or ``alignfake:tiny``).

    ``adapter`` is the local directory of a peft LoRA adapter applied to every request that does not name
    its own; a request's ``adapter`` overrides it (extra adapters are loaded on first use, and requests are
    grouped by adapter). Without either, a request runs on the base weights. Greedy requests
    (``temperature == 0``) are batched ``batch_size`` at a time; sampled requests are generated one request
    at a time (its ``n`` samples together) with the request's ``seed``, so a seeded request gives the same
    samples whatever else is in the call. ``progress(k)`` is called after each batch with the number of
    requests that batch finished (an increment, as for a progress bar's ``update``). ``precision`` (the
    spec's name: auto, fp32, bf16, fp16) overrides ``dtype``; ``auto`` is fp32 on CPU and the checkpoint's
    dtype on GPU. Other options (``max_model_len``, ``gpus``, ...) belong to other engines and are ignored.
    """

    name = "transformers"

    def __init__(
        self,
        model: str,
        adapter: str | None = None,
        batch_size: int = 8,
        device: str | None = None,
        dtype: str = "auto",
        shared_prefix_cache: bool = True,
        progress: Callable[[int], None] | None = None,
        precision: str | None = None,
        **_: object,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..tinymodel import resolve_model_path

        if batch_size < 1:
            raise EngineError(f"batch_size must be at least 1, got {batch_size}")
        self.model_name = model
        self.batch_size = batch_size
        self.shared_prefix_cache = shared_prefix_cache
        self.progress = progress
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # ``precision`` is the spec's name (models[].inference.precision, which the sample stage passes);
        # ``dtype`` the library's. An explicit precision wins over the default dtype.
        torch_dtype = self._torch_dtype(precision if precision not in (None, "auto") else dtype)
        path = resolve_model_path(model)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as e:
            raise EngineError(f"cannot load model {model!r} ({path}): {e}") from e
        if self.tokenizer.chat_template is None:
            raise EngineError(f"model {model!r} has no chat template; the transformers engine needs one")
        self.model.to(self.device).eval()
        self.default_adapter = _normalise(adapter)
        self._adapters: dict[str, str] = {}
        """Adapter directory -> peft adapter name, for the adapters loaded so far."""
        if self.default_adapter is not None:
            self._load_adapter(self.default_adapter)
        self.stop_ids = self._stop_ids()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = min(self.stop_ids)
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)
        # Reusing a prefix needs a cache of plain keys and values for every position; sliding-window and
        # linear-attention layers keep something else, so such models generate without reuse.
        self.prefix_reuse = shared_prefix_cache and _full_attention_only(self.model.config)
        self._prefixes: dict[str | None, _PrefixEntry] = {}
        """Per adapter, the last shared prefix encoded; a batch whose prefix starts the same way reuses it."""
        self.stats = {"prefix_tokens_reused": 0, "prefix_tokens_encoded": 0}

    # ------------------------------------------------------------------------------------------- setup

    def _torch_dtype(self, dtype: str) -> Any:
        import torch

        if dtype == "auto":
            # CPU: fp32, for speed (no bf16 matmul units on most CPUs) and reproducible greedy outputs.
            return torch.float32 if self.device.type == "cpu" else "auto"
        if dtype not in _DTYPES:
            raise EngineError(
                f"the transformers engine serves precision auto, fp32, bf16 or fp16, not {dtype!r}; "
                "serve fp8 or nf4 with the vllm engine (models[].provider: vllm)"
            )
        return getattr(torch, _DTYPES[dtype])

    def _stop_ids(self) -> set[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        eot = self.tokenizer.convert_tokens_to_ids("<|eot_id|>")
        if isinstance(eot, int) and eot != self.tokenizer.unk_token_id:
            ids.add(eot)
        if not ids:
            raise EngineError(f"model {self.model_name!r} defines no end-of-sequence token")
        return ids

    def _load_adapter(self, directory: str) -> str:
        if directory in self._adapters:
            return self._adapters[directory]
        if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
            raise EngineError(f"adapter {directory!r} is not a peft adapter directory (no adapter_config.json)")
        try:
            from peft import PeftModel
        except ImportError as e:
            raise EngineError("LoRA adapters need peft: pip install 'alignfake[local]'") from e
        name = f"adapter{len(self._adapters)}"
        try:
            if not self._adapters:
                self.model = PeftModel.from_pretrained(self.model, directory, adapter_name=name)
                self.model.to(self.device).eval()
            else:
                self.model.load_adapter(directory, adapter_name=name)
        except Exception as e:  # noqa: BLE001 - peft raises many types for a mismatched adapter
            raise EngineError(f"cannot apply adapter {directory!r} to {self.model_name!r}: {e}") from e
        self._adapters[directory] = name
        return name

    def close(self) -> None:
        import gc

        import torch

        self._prefixes.clear()
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------------------------------- generate

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        if self.model is None:
            raise EngineError("the transformers engine is closed")
        results: list[Response | None] = [None] * len(requests)
        greedy: dict[str | None, list[_Prompt]] = {}
        sampled: list[_Prompt] = []
        for i, req in enumerate(requests):
            prompt = self._prompt(i, req)
            if isinstance(prompt, Response):
                results[i] = prompt
            elif req.temperature == 0:
                greedy.setdefault(prompt.adapter, []).append(prompt)
            else:
                sampled.append(prompt)
        self._report(sum(r is not None for r in results))
        for adapter, prompts in greedy.items():
            for start in range(0, len(prompts), self.batch_size):
                batch = prompts[start : start + self.batch_size]
                texts = self._run(adapter, [p.ids for p in batch], [p.request.max_tokens for p in batch], None)
                for p, (text, reason, used) in zip(batch, texts, strict=True):
                    results[p.index] = self._response(p, [text] * p.request.n, [reason] * p.request.n, used)
                self._report(len(batch))
        for p in sampled:
            req = p.request
            outs = self._run(p.adapter, [p.ids] * req.n, [req.max_tokens] * req.n, (req.temperature, req.seed))
            results[p.index] = self._response(
                p, [o[0] for o in outs], [o[1] for o in outs], sum(o[2] for o in outs), per_sample=False
            )
            self._report(1)
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _report(self, k: int) -> None:
        if self.progress is not None and k:
            self.progress(k)

    def _prompt(self, index: int, req: Request) -> _Prompt | Response:
        if req.max_tokens < 1 or req.n < 1:
            raise EngineError(f"request {req.id}: max_tokens and n must be at least 1")
        try:
            text = self.tokenizer.apply_chat_template(
                list(req.messages), tokenize=False, add_generation_prompt=True
            )
        except Exception as e:  # noqa: BLE001 - jinja errors from the model's own template
            raise EngineError(f"request {req.id}: the chat template of {self.model_name!r} failed: {e}") from e
        # The template already wrote the special tokens (BOS); the prefill continues the assistant turn.
        ids = self.tokenizer(text + (req.prefill or ""), add_special_tokens=False)["input_ids"]
        adapter = _normalise(req.adapter) or self.default_adapter
        if adapter is not None:
            self._load_adapter(adapter)
        if self.max_positions and len(ids) + req.max_tokens > self.max_positions:
            msg = (
                f"prompt of {len(ids)} tokens + max_tokens {req.max_tokens} exceeds the context of "
                f"{self.model_name!r} ({self.max_positions} positions)"
            )
            return Response(req.id, [""] * req.n, ["error"] * req.n, prompt_tokens=len(ids), error=msg)
        return _Prompt(index, req, ids, adapter)

    def _response(
        self, p: _Prompt, texts: list[str], reasons: list[Any], used: int, per_sample: bool = True
    ) -> Response:
        # Greedy samples are one generation repeated n times; count its tokens once per sample all the same,
        # as a server generating n samples would.
        completion = used * len(texts) if per_sample else used
        meta: dict[str, object] = {"adapter": p.adapter} if p.adapter else {}
        return Response(p.request.id, texts, reasons, prompt_tokens=len(p.ids), completion_tokens=completion, meta=meta)

    def _run(
        self,
        adapter: str | None,
        rows: list[list[int]],
        max_tokens: list[int],
        sampling: tuple[float, int | None] | None,
    ) -> list[tuple[str, Literal["stop", "length"], int]]:
        """Generate for token-id rows: (text, finish reason, completion tokens) per row."""
        import contextlib

        import torch

        kwargs: dict[str, Any] = {
            "max_new_tokens": max(max_tokens),
            "eos_token_id": sorted(self.stop_ids),
            "pad_token_id": self.pad_id,
            "num_beams": 1,
            "repetition_penalty": 1.0,
        }
        rng: Any = contextlib.nullcontext()
        if sampling is None:
            kwargs["do_sample"] = False
        else:
            temperature, seed = sampling
            # Plain temperature sampling: no top-k/top-p from the model's generation_config sneaks in.
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
            if seed is not None:
                # Seed a forked generator: the caller's random state is left as it was.
                if self.device.type == "cpu":
                    rng = torch.random.fork_rng(devices=[])
                else:
                    index = self.device.index
                    if index is None:
                        index = torch.get_device_module(self.device.type).current_device()
                    rng = torch.random.fork_rng(devices=[index], device_type=self.device.type)
        try:
            with rng, torch.inference_mode(), self._adapter(adapter):
                if sampling is not None and sampling[1] is not None:
                    torch.manual_seed(sampling[1])
                if self.prefix_reuse:
                    new_tokens = self._generate_with_prefix(adapter, rows, kwargs)
                else:
                    new_tokens = self._generate_plain(rows, kwargs)
        except torch.OutOfMemoryError as e:
            raise EngineError(
                f"out of memory generating {len(rows)} sequences with {self.model_name!r}; lower batch_size"
            ) from e
        return [self._decode(toks[:limit]) for toks, limit in zip(new_tokens, max_tokens, strict=True)]

    def _adapter(self, adapter: str | None) -> Any:
        """Context in which the model computes with ``adapter`` (``None``: the base weights)."""
        import contextlib

        if not self._adapters:
            return contextlib.nullcontext()
        if adapter is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self._adapters[adapter])
        return contextlib.nullcontext()

    def _decode(self, tokens: list[int]) -> tuple[str, Literal["stop", "length"], int]:
        for k, t in enumerate(tokens):
            if t in self.stop_ids:
                return self.tokenizer.decode(tokens[:k], skip_special_tokens=False), "stop", k + 1
        return self.tokenizer.decode(tokens, skip_special_tokens=False), "length", len(tokens)

    # ------------------------------------------------------------------------------------------- batching

    def _generate_plain(self, rows: list[list[int]], kwargs: dict[str, Any]) -> list[list[int]]:
        """Left-padded batched ``generate``: the reference the prefix path must match."""
        import torch

        width = max(map(len, rows))
        ids = torch.tensor([[self.pad_id] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        return out[:, width:].tolist()

    def _generate_with_prefix(
        self, adapter: str | None, rows: list[list[int]], kwargs: dict[str, Any]
    ) -> list[list[int]]:
        import torch
        from transformers import DynamicCache

        # At least one token of every row stays outside the prefix: generate needs a new token per row
        # to produce the first logits.
        shared = min(_common_prefix_len(rows), min(map(len, rows)) - 1)
        if shared < MIN_SHARED_PREFIX:
            return self._generate_plain(rows, kwargs)
        kv = self._prefix_kv(adapter, tuple(rows[0][:shared]))
        suffixes = [r[shared:] for r in rows]
        width = max(map(len, suffixes))
        # prefix | left padding of the suffix | suffix: the mask hides the padding, and position ids (the
        # cumulative sum of the mask) give each suffix token its position in the unpadded prompt.
        ids = torch.tensor(
            [rows[0][:shared] + [self.pad_id] * (width - len(s)) + s for s in suffixes], device=self.device
        )
        mask = torch.tensor(
            [[1] * shared + [0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=self.device
        )
        n = len(rows)
        # DynamicCache copies what it is given on the first update, so the expanded views never write
        # into the stored prefix.
        cache = DynamicCache(
            ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in kv],
            config=self._base_config(),
        )
        out = self.model.generate(input_ids=ids, attention_mask=mask, past_key_values=cache, **kwargs)
        return out[:, shared + width :].tolist()

    def _base_config(self) -> Any:
        return self.model.get_base_model().config if self._adapters else self.model.config

    def _prefix_kv(self, adapter: str | None, tokens: tuple[int, ...]) -> list[tuple[Any, Any]]:
        """Keys and values of ``tokens`` (batch 1), from the stored prefix where it overlaps: a prefix's
        cache is valid for any shorter prefix (attention is causal), and a longer one extends it."""
        import torch
        from transformers import DynamicCache

        entry = self._prefixes.get(adapter)
        have = _common_prefix_len([list(entry.tokens), list(tokens)]) if entry else 0
        if entry is not None and have == len(tokens):
            self.stats["prefix_tokens_reused"] += have
            return [(k[:, :, :have], v[:, :, :have]) for k, v in entry.kv]
        cache = None
        if entry is not None and have >= MIN_SHARED_PREFIX:
            cache = DynamicCache(
                ddp_cache_data=[(k[:, :, :have], v[:, :, :have]) for k, v in entry.kv], config=self._base_config()
            )
            self.stats["prefix_tokens_reused"] += have
        else:
            have = 0
        new = torch.tensor([tokens[have:]], device=self.device)
        out = self.model(
            input_ids=new,
            past_key_values=cache if cache is not None else DynamicCache(config=self._base_config()),
            use_cache=True,
            logits_to_keep=1,
        )
        self.stats["prefix_tokens_encoded"] += len(tokens) - have
        kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        self._prefixes[adapter] = _PrefixEntry(tokens, kv)
        return kv


def _full_attention_only(config: Any) -> bool:
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(cfg, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    return not getattr(cfg, "sliding_window", None) or getattr(cfg, "use_sliding_window", True) is False


def _common_prefix_len(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(map(len, rows))
    for other in rows[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return n


def _normalise(adapter: str | None) -> str | None:
    return os.path.abspath(os.path.expanduser(adapter)) if adapter else None
