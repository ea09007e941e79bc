"""The one request/response record every engine speaks, and the engine interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Request:
    """One chat generation. ``messages`` are OpenAI-style dicts (role, content); ``prefill`` starts the
    assistant turn (base-model experiments) and is not repeated in the response text."""

    id: str
    messages: tuple[dict[str, str], ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int | None = None
    prefill: str | None = None
    n: int = 1
    """Samples of the same prompt (judges vote with n > 1 at temperature 1)."""
    adapter: str | None = None
    """Local directory of a LoRA adapter to apply (engines that support it)."""


@dataclass
class Response:
    id: str
    texts: list[str]
    """One text per sample (``len == request.n``)."""
    finish_reasons: list[Literal["stop", "length", "error"]]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    cached: bool = False
    meta: dict[str, object] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.texts[0] if self.texts else ""

    @property
    def finish_reason(self) -> Literal["stop", "length", "error"]:
        return self.finish_reasons[0] if self.finish_reasons else "error"


class Engine(ABC):
    """Generates responses for a batch of requests. Implementations batch and parallelise internally;
    the order of results matches the order of requests."""

    name: str = "engine"

    @abstractmethod
    def generate(self, requests: Sequence[Request]) -> list[Response]: ...

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release models, servers or connections."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
