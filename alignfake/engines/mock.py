"""A real, registered engine with scripted outputs, for protocol tests of stages and judges."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .base import Engine, Request, Response

Script = Callable[[Request, int], str] | dict[str, str] | list[str] | str


class MockEngine(Engine):
    """Answers from a script: a function ``(request, sample_index) -> text``, a dict keyed by request id,
    a list cycled in order of calls, or one fixed string. ``calls`` records every request seen."""

    name = "mock"

    def __init__(self, script: Script = "", finish_reason: str = "stop", **_: object):
        self.script = script
        self.finish_reason = finish_reason
        self.calls: list[Request] = []
        self._i = 0

    def _one(self, req: Request, k: int) -> str:
        s = self.script
        if callable(s):
            return s(req, k)
        if isinstance(s, dict):
            return s[req.id]
        if isinstance(s, list):
            text = s[self._i % len(s)]
            self._i += 1
            return text
        return s

    def generate(self, requests: Sequence[Request]) -> list[Response]:
        out = []
        for req in requests:
            self.calls.append(req)
            texts = [self._one(req, k) for k in range(req.n)]
            out.append(Response(id=req.id, texts=texts, finish_reasons=[self.finish_reason] * req.n))  # type: ignore[list-item]
        return out
