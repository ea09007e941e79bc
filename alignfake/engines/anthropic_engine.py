"""The Anthropic engine: the Messages API through the ``anthropic`` SDK.

Options (``create_engine("anthropic", ...)``): ``model``, ``base_url`` (default the SDK's), ``api_key_env``
(default ``ANTHROPIC_API_KEY``; a key is always required), ``max_concurrency``, ``cache`` / ``cache_dir``,
``timeout``, ``max_retries``, ``backoff_base``, ``backoff_max`` -- as for the OpenAI-compatible engine.

Conversion:

* ``system`` messages become the ``system`` parameter (joined with a blank line, in order); the rest stay
  ``user`` / ``assistant`` turns.
* A prefill is sent the way the API supports it: as a final ``assistant`` message, which the model continues;
  the reply holds only the continuation. The API rejects a final assistant turn ending in whitespace, so such a
  prefill is refused here, before anything is sent.
* ``temperature`` goes in the request body (``extra_body``) so it reaches the API whatever SDK version names.
  The API has no ``seed`` and no ``n``: each of ``n`` samples is its own call, and the seed only enters the
  cache key (so ``n`` samples at temperature 1 are cached as one answer and a rerun returns the same votes).
* Stop reasons: ``end_turn``, ``stop_sequence`` -> stop; ``max_tokens``, ``model_context_window_exceeded`` ->
  length; ``refusal``, ``tool_use``, ``pause_turn`` and anything unknown -> error (the raw reason is in
  ``Response.meta["stop_reason"]``), so a provider-side refusal is recorded as invalid, never as the model's
  refusal.
"""

from __future__ import annotations

from typing import Any

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

_STOP: dict[str | None, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
}


def build_call(request: Request, *, model: str) -> dict[str, Any]:
    """Keyword arguments of ``client.messages.create`` for one sample of ``request``."""
    system = [m["content"] for m in request.messages if m["role"] == "system"]
    turns = []
    for m in request.messages:
        if m["role"] == "system":
            continue
        if m["role"] not in ("user", "assistant"):
            raise EngineError(f"anthropic: request {request.id}: unsupported message role {m['role']!r}")
        turns.append({"role": m["role"], "content": m["content"]})
    if request.prefill:
        if request.prefill != request.prefill.rstrip():
            raise EngineError(
                f"anthropic: request {request.id}: the prefill ends in whitespace, which the Messages API rejects; "
                "strip it from inference.prefill"
            )
        turns.append({"role": "assistant", "content": request.prefill})
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": request.max_tokens,
        "messages": turns,
        "extra_body": {"temperature": request.temperature},
    }
    if system:
        kwargs["system"] = "\n\n".join(system)
    return kwargs


def parse_message(message: Any) -> CallResult:
    """A ``Message`` -> CallResult with one sample: the text blocks joined."""
    text = "".join(getattr(b, "text", "") for b in (message.content or []) if getattr(b, "type", None) == "text")
    reason = message.stop_reason
    usage = message.usage
    return CallResult(
        texts=[text],
        finish_reasons=[_STOP.get(reason, "error")],
        prompt_tokens=(usage.input_tokens or 0) if usage else 0,
        completion_tokens=(usage.output_tokens or 0) if usage else 0,
        meta={"model": message.model, "stop_reason": reason},
    )


class AnthropicEngine(ApiEngine):
    """Messages over the Anthropic API (see the module docstring)."""

    name = "anthropic"
    native_n = False

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
        adapter: str | None = None,
        **ignored: Any,
    ):
        unknown = set(ignored) - IGNORED_OPTIONS
        if unknown:
            raise EngineError(f"anthropic: unknown engine options {sorted(unknown)}")
        if adapter:
            raise EngineError(f"anthropic: cannot apply the local adapter {adapter}")
        secret = read_api_key(api_key_env, "ANTHROPIC_API_KEY", provider="anthropic", required=True)
        assert secret is not None
        endpoint = (base_url or "https://api.anthropic.com").rstrip("/")
        super().__init__(model=model, endpoint=endpoint, secret=secret, max_concurrency=max_concurrency,
                         cache=cache, cache_dir=cache_dir, max_retries=max_retries, backoff_base=backoff_base,
                         backoff_max=backoff_max, n_strategy="fanout")

        import anthropic

        self._anthropic = anthropic
        # The SDK's retries are off: ours count, back off with jitter and honour Retry-After (see _retry).
        self._client = anthropic.Anthropic(api_key=secret.reveal(), base_url=endpoint, max_retries=0,
                                           timeout=timeout)

    def _identity(self, request: Request) -> dict[str, Any]:
        return {}

    def _send(self, request: Request, n: int, seed: int | None) -> CallResult:
        assert n == 1  # fanout: the API has no n
        anthropic = self._anthropic
        try:
            message = self._client.messages.create(**build_call(request, model=self.model))
        except anthropic.APIStatusError as e:
            # prefill=False: the API supports prefill, so a 400 here is about this request, not the feature.
            raise classify_status(e.status_code, dict(e.response.headers), error_text(e), provider="anthropic",
                                  prefill=False) from None
        except anthropic.APIConnectionError as e:  # includes timeouts and dropped connections
            raise TransientError(f"connection error: {type(e).__name__}: {e}") from None
        except anthropic.APIResponseValidationError as e:
            raise RequestRejected(f"unexpected response: {e}") from None
        return parse_message(message)

    def close(self) -> None:
        super().close()
        self._client.close()


__all__ = ["AnthropicEngine", "build_call", "parse_message"]
