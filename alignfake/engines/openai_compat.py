"""The OpenAI-compatible engine: OpenAI, a vLLM server, Together, OpenRouter, xAI, Gemini's compatible
endpoint, ``transformers serve``; anything that speaks ``POST {base_url}/chat/completions``.

Options (``create_engine("openai", ...)``; the sample stage fills them from ``models[].inference``):

``model``
    The server's model name.
``base_url``
    Endpoint including ``/v1`` (e.g. ``http://vllm:8000/v1``); default OpenAI's.
``api_key_env``
    Environment variable holding the key (default ``OPENAI_API_KEY``). With a ``base_url`` and no key set, no
    key is sent (local servers); with OpenAI's own endpoint a key is required.
``max_concurrency``
    Requests in flight at once to this endpoint (shared by every engine with the same endpoint and limit).
``cache`` / ``cache_dir``
    The on-disk response cache (default on, under ``~/.cache/alignfake/responses``; see ``_cache``).
``timeout``, ``max_retries``, ``backoff_base``, ``backoff_max``
    Per-call timeout in seconds; retries on 429/5xx/connection errors (see ``_retry``).
``n_strategy``
    ``native`` sends ``n`` (servers that ignore it are topped up with single-sample calls, seeds
    ``seed+k``); ``fanout`` always sends one call per sample.
``prefill_style``
    How an assistant prefill is sent. ``continue_final_message`` (default): the prefill is appended as a final
    assistant message and the body carries vLLM's ``"continue_final_message": true, "add_generation_prompt":
    false``, so the model continues the prefill (vLLM and SGLang support this; the reply holds only the
    continuation). ``none``: the server has no prefill; a request with one raises an error before anything is
    sent. A server that rejects the fields (400/422; e.g. ``transformers serve``) stops the run with an error
    saying so. Hosted chat APIs (OpenAI itself) do not support prefill.
``token_limit_field``
    ``max_tokens`` (default; vLLM, most servers) or ``max_completion_tokens`` (OpenAI's reasoning models).
``extra_body``
    Extra JSON fields sent with every request (provider-specific knobs); part of the cache key.

Finish reasons: ``stop`` -> stop; ``length`` -> length (the sample stage retries it with a larger budget);
``content_filter``, tool calls and anything unknown -> error (recorded in ``Response.meta``).
"""

from __future__ import annotations

from typing import Any, Literal

from ..errors import EngineError
from ._api import (
    IGNORED_OPTIONS,
    ApiEngine,
    CallResult,
    FinishReason,
    RequestRejected,
    classify_status,
    error_text,
)
from ._keys import read_api_key
from ._retry import TransientError
from .base import Request

OPENAI_URL = "https://api.openai.com/v1"
PrefillStyle = Literal["continue_final_message", "none"]

_FINISH: dict[str | None, FinishReason] = {"stop": "stop", "length": "length", "eos": "stop", None: "stop"}


def build_call(request: Request, n: int, seed: int | None, *, model: str, prefill_style: PrefillStyle,
               token_limit_field: str, extra_body: dict[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments of ``client.chat.completions.create`` for one call."""
    messages = [dict(m) for m in request.messages]
    body: dict[str, Any] = dict(extra_body or {})
    if request.prefill:
        if prefill_style == "none":
            raise EngineError(
                f"openai: request {request.id} has a prefill but prefill_style is 'none' (the server cannot "
                "continue an assistant turn); drop inference.prefill or serve the model with vLLM"
            )
        messages.append({"role": "assistant", "content": request.prefill})
        body.update(continue_final_message=True, add_generation_prompt=False)
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        token_limit_field: request.max_tokens,
        "temperature": request.temperature,
    }
    if n != 1:
        kwargs["n"] = n
    if seed is not None:
        kwargs["seed"] = seed
    if body:
        kwargs["extra_body"] = body
    return kwargs


def parse_completion(completion: Any) -> CallResult:
    """A ``ChatCompletion`` -> CallResult (choices in index order)."""
    choices = sorted(completion.choices or [], key=lambda c: c.index)
    if not choices:
        raise RequestRejected("the server returned no choices")
    texts, reasons, raw = [], [], []
    for c in choices:
        texts.append((c.message.content if c.message else None) or "")
        raw.append(c.finish_reason)
        reasons.append(_FINISH.get(c.finish_reason, "error"))
    usage = completion.usage
    meta: dict[str, Any] = {"model": completion.model}
    if any(r not in _FINISH for r in raw):
        meta["finish_reasons_raw"] = raw
    return CallResult(
        texts=texts,
        finish_reasons=reasons,
        prompt_tokens=(usage.prompt_tokens or 0) if usage else 0,
        completion_tokens=(usage.completion_tokens or 0) if usage else 0,
        meta=meta,
    )


class OpenAIEngine(ApiEngine):
    """Chat completions over the OpenAI API (see the module docstring for the options)."""

    name = "openai"
    native_n = True

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str | None = None,
        max_concurrency: int = 8,
        cache: bool = True,
        cache_dir: str | None = None,
        timeout: float = 600.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        n_strategy: Literal["native", "fanout"] = "native",
        prefill_style: PrefillStyle = "continue_final_message",
        token_limit_field: Literal["max_tokens", "max_completion_tokens"] = "max_tokens",
        extra_body: dict[str, Any] | None = None,
        adapter: str | None = None,
        **ignored: Any,
    ):
        unknown = set(ignored) - IGNORED_OPTIONS
        if unknown:
            raise EngineError(f"openai: unknown engine options {sorted(unknown)}")
        if adapter:
            raise EngineError(
                f"openai: cannot apply the local adapter {adapter}; serve it on the server (e.g. vLLM "
                "--lora-modules name=path) and use its name as the model"
            )
        if prefill_style not in ("continue_final_message", "none"):
            raise EngineError(f"openai: prefill_style must be 'continue_final_message' or 'none', got {prefill_style!r}")
        if token_limit_field not in ("max_tokens", "max_completion_tokens"):
            raise EngineError(f"openai: token_limit_field must be max_tokens or max_completion_tokens, got "
                              f"{token_limit_field!r}")
        endpoint = (base_url or OPENAI_URL).rstrip("/")
        secret = read_api_key(api_key_env, "OPENAI_API_KEY", provider="openai", required=base_url is None)
        super().__init__(model=model, endpoint=endpoint, secret=secret, max_concurrency=max_concurrency,
                         cache=cache, cache_dir=cache_dir, max_retries=max_retries, backoff_base=backoff_base,
                         backoff_max=backoff_max, n_strategy=n_strategy)
        self.prefill_style: PrefillStyle = prefill_style
        self.token_limit_field = token_limit_field
        self.extra_body = dict(extra_body or {})

        import openai

        self._openai = openai
        # The SDK's retries are off: ours count, back off with jitter and honour Retry-After (see _retry).
        # A local server without auth still needs a non-empty key for the SDK; it is sent but means nothing.
        self._client = openai.OpenAI(
            api_key=secret.reveal() if secret else "no-key",
            base_url=endpoint,
            max_retries=0,
            timeout=timeout,
        )

    def _identity(self, request: Request) -> dict[str, Any]:
        return {
            "prefill_style": self.prefill_style if request.prefill else None,
            "token_limit_field": self.token_limit_field,
            "extra_body": self.extra_body,
        }

    def _send(self, request: Request, n: int, seed: int | None) -> CallResult:
        kwargs = build_call(request, n, seed, model=self.model, prefill_style=self.prefill_style,
                            token_limit_field=self.token_limit_field, extra_body=self.extra_body)
        openai = self._openai
        try:
            completion = self._client.chat.completions.create(**kwargs)
        except openai.APIStatusError as e:
            raise classify_status(e.status_code, dict(e.response.headers), error_text(e), provider="openai",
                                  prefill=bool(request.prefill)) from None
        except openai.APIConnectionError as e:  # includes timeouts and dropped connections
            raise TransientError(f"connection error: {type(e).__name__}: {e}") from None
        except openai.APIResponseValidationError as e:
            raise RequestRejected(f"unexpected response: {e}") from None
        return parse_completion(completion)

    def close(self) -> None:
        super().close()
        self._client.close()


__all__ = ["OpenAIEngine", "build_call", "parse_completion"]
