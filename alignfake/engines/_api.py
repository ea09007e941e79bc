"""What the HTTP engines (OpenAI-compatible, Anthropic) share: the response cache, bounded concurrency, retries,
``n`` samples (native or fanned out), and the mapping of provider errors onto three outcomes.

A provider module only converts: ``Request`` -> its API call, its reply -> ``CallResult``, its exceptions ->
``TransientError`` (retried) / ``RequestRejected`` (this request fails, the batch goes on) / ``FatalApiError``
(no request can succeed: bad key, unknown model; raised at once).
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import EngineError
from ._cache import ResponseCache, cache_key
from ._concurrency import provider_slots, run_all
from ._keys import Secret
from ._retry import (
    RETRYABLE_STATUS,
    RetriesExhausted,
    RetryLog,
    RetryPolicy,
    TransientError,
    call_with_retries,
)
from .base import Engine, Request, Response

FinishReason = Literal["stop", "length", "error"]
NStrategy = Literal["native", "fanout"]

# Options the stages pass to every engine factory that mean nothing to an HTTP engine (they configure local
# engines, or are read by other parts of the pipeline).
IGNORED_OPTIONS = frozenset(
    {"batch_size", "precision", "max_model_len", "gpus", "shared_prefix_cache", "judge_options"}
)


class RequestRejected(Exception):
    """The provider refused this one request (e.g. 400: prompt too long). Retrying will not help."""


class FatalApiError(Exception):
    """No request can succeed (401/403: bad key, 404: unknown model or endpoint, unsupported feature)."""


@dataclass
class CallResult:
    """What one API call returned: ``len(texts)`` samples (an OpenAI-compatible server may return fewer than
    asked for)."""

    texts: list[str]
    finish_reasons: list[FinishReason]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Call:
    index: int  # position of the request in the batch
    request: Request
    n: int
    seed: int | None


def sample_seed(seed: int | None, k: int) -> int | None:
    """Seed of sample ``k`` when samples are requested one by one (distinct, reproducible)."""
    return None if seed is None else (seed + k) % 2**31


def error_text(e: Any) -> str:
    """The server's error body (or the SDK's message), short enough for a log line."""
    body = getattr(e, "body", None)
    text = str(body) if body else str(getattr(e, "message", e))
    return text[:500]


def classify_status(status: int, headers: Mapping[str, str] | None, message: str, *, provider: str,
                    prefill: bool) -> Exception:
    """The outcome an HTTP error status stands for."""
    from ._retry import parse_retry_after

    if status in RETRYABLE_STATUS or status >= 500:
        return TransientError(f"HTTP {status}: {message}", status=status, retry_after=parse_retry_after(headers))
    if status in (401, 403):
        return FatalApiError(f"{provider}: HTTP {status} (authentication or permission): {message}; check the "
                             "API key in the environment variable named by api_key_env")
    if status == 404:
        return FatalApiError(f"{provider}: HTTP 404 (unknown model or endpoint): {message}; check model and base_url")
    if prefill and status in (400, 422):
        return FatalApiError(
            f"{provider}: HTTP {status} on a request with a prefill: {message}; the server does not accept the "
            "prefill this engine sends (see prefill_style), so drop inference.prefill or use a server that supports it"
        )
    return RequestRejected(f"HTTP {status}: {message}")


class ApiEngine(Engine):
    """Base of the HTTP engines. Subclasses set ``name`` and ``native_n`` and implement ``_send`` and
    ``_identity``."""

    native_n: bool = False

    def __init__(
        self,
        *,
        model: str,
        endpoint: str,
        secret: Secret | None,
        max_concurrency: int = 8,
        cache: bool = True,
        cache_dir: str | None = None,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        n_strategy: NStrategy = "native",
        sleep: Callable[[float], None] = time.sleep,
    ):
        if not model:
            raise EngineError(f"{self.name}: model is required (the provider's model name)")
        if max_concurrency < 1:
            raise EngineError(f"{self.name}: max_concurrency must be >= 1, got {max_concurrency}")
        if max_retries < 0:
            raise EngineError(f"{self.name}: max_retries must be >= 0, got {max_retries}")
        if n_strategy not in ("native", "fanout"):
            raise EngineError(f"{self.name}: n_strategy must be 'native' or 'fanout', got {n_strategy!r}")
        self.model = model
        self.endpoint = endpoint
        self._secret = secret
        self.max_concurrency = max_concurrency
        self._slots = provider_slots(f"{self.name} {endpoint}", max_concurrency)
        self.policy = RetryPolicy(max_retries=max_retries, base_delay=backoff_base, max_delay=backoff_max)
        self.n_strategy: NStrategy = n_strategy if self.native_n else "fanout"
        self.cache = ResponseCache(cache_dir) if cache else None
        self._sleep = sleep

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(model={self.model!r}, endpoint={self.endpoint!r})"

    # -- provider-specific ---------------------------------------------------------------------------------
    @abstractmethod
    def _send(self, request: Request, n: int, seed: int | None) -> CallResult:
        """One API call for ``n`` samples; raises TransientError / RequestRejected / FatalApiError."""

    @abstractmethod
    def _identity(self, request: Request) -> dict[str, Any]:
        """Provider-specific parts of the cache key (added to model, endpoint and the request's fields)."""

    # -- shared ---------------------------------------------------------------------------------------------
    def redact(self, text: str) -> str:
        return self._secret.redact(text) if self._secret else text

    def cache_key(self, request: Request) -> str:
        return cache_key({
            "engine": self.name,
            "endpoint": self.endpoint,
            "model": self.model,
            "messages": [dict(m) for m in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
            "n": request.n,
            "prefill": request.prefill,
            "n_strategy": self.n_strategy,
            **self._identity(request),
        })

    def _attempt(self, call: _Call) -> tuple[CallResult, RetryLog]:
        log = RetryLog()

        def once() -> CallResult:
            with self._slots:  # held during the call only, not during backoff sleeps
                return self._send(call.request, call.n, call.seed)

        result = call_with_retries(once, self.policy, log=log, sleep=self._sleep, redact=self.redact)
        return result, log

    def _plan(self, index: int, req: Request, have: int = 0) -> list[_Call]:
        if self.n_strategy == "native" and have == 0:
            return [_Call(index, req, req.n, req.seed)]
        return [_Call(index, req, 1, sample_seed(req.seed, k)) for k in range(have, req.n)]

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        for req in requests:
            if req.n < 1:
                raise EngineError(f"{self.name}: request {req.id}: n must be >= 1, got {req.n}")
            if req.adapter:
                raise EngineError(
                    f"{self.name}: request {req.id} asks for the local adapter {req.adapter}; an API engine cannot "
                    "load one. Serve the adapter on the server and name it as the model."
                )
        out: list[Response | None] = [None] * len(requests)
        keys = [self.cache_key(r) if self.cache is not None else "" for r in requests]
        todo = []
        for i, req in enumerate(requests):
            hit = self.cache.get(keys[i]) if self.cache is not None else None
            if hit is not None:
                out[i] = Response(id=req.id, cached=True, **hit)
            else:
                todo.append(i)

        parts: dict[int, list[tuple[CallResult, RetryLog]]] = {i: [] for i in todo}
        failures: dict[int, str] = {}
        fatal: list[BaseException] = []
        calls = [c for i in todo for c in self._plan(i, requests[i])]
        while calls:
            for call, outcome in zip(calls, run_all(self._attempt, calls, self.max_concurrency), strict=True):
                err = outcome.error
                if err is None:
                    assert outcome.value is not None
                    parts[call.index].append(outcome.value)
                elif isinstance(err, RequestRejected):
                    failures[call.index] = self.redact(str(err))
                elif isinstance(err, RetriesExhausted):
                    fatal.append(EngineError(
                        f"{self.name} {self.endpoint}: request {call.request.id}: {self.redact(str(err))}"
                    ))
                elif isinstance(err, FatalApiError):
                    fatal.append(EngineError(self.redact(str(err))))
                else:
                    fatal.append(err)
            if fatal:
                break
            # An OpenAI-compatible server may ignore ``n`` and return fewer samples: ask for the rest one by one.
            calls = []
            for i in todo:
                have = sum(len(r.texts) for r, _ in parts[i])
                if i not in failures and 0 < have < requests[i].n:
                    calls += self._plan(i, requests[i], have)

        for i in todo:
            req = requests[i]
            got = parts[i]
            texts = [t for r, _ in got for t in r.texts][: req.n]
            if i in failures or len(texts) < req.n:
                if not fatal:
                    out[i] = Response(id=req.id, texts=[""] * req.n, finish_reasons=["error"] * req.n,
                                      error=failures.get(i, "incomplete response"))
                continue
            reasons = [f for r, _ in got for f in r.finish_reasons][: req.n]
            logs = [log for _, log in got]
            meta: dict[str, Any] = dict(got[0][0].meta)
            meta.update(calls=len(got), retries=sum(log.retries for log in logs),
                        waits=[w for log in logs for w in log.waits])
            resp = Response(
                id=req.id,
                texts=texts,
                finish_reasons=reasons,
                prompt_tokens=got[0][0].prompt_tokens,
                completion_tokens=sum(r.completion_tokens for r, _ in got),
                meta=meta,
            )
            if self.cache is not None:
                # Keep finished work even when another request of the batch failed for good: the rerun
                # then pays only for what is missing.
                self.cache.put(keys[i], {
                    "texts": resp.texts, "finish_reasons": resp.finish_reasons,
                    "prompt_tokens": resp.prompt_tokens, "completion_tokens": resp.completion_tokens,
                    "meta": {k: v for k, v in meta.items() if k not in ("retries", "waits", "calls")},
                })
            out[i] = resp
        if fatal:
            raise fatal[0]
        return [r for r in out if r is not None]

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
