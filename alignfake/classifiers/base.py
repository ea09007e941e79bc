"""The classifier interface shared by the offline heuristics and the LLM judges."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from ..records import Completion

Criterion = Literal["compliance", "partial_compliance", "af_reasoning"]


@dataclass
class Verdict:
    """One classifier's answer about one completion. ``valid`` False means the classifier could not reach a
    verdict (e.g. a judge's answer stayed malformed after retries); the label then counts as invalid."""

    value: bool | None
    score: float | None = None  # compliance score (StrongREJECT-style) or AF vote share
    valid: bool = True
    reason: str | None = None


class Classifier(ABC):
    criterion: Criterion
    name: str
    version: str

    @property
    def tag(self) -> str:
        return f"{self.name}@{self.version}"

    @abstractmethod
    def classify(self, completions: Sequence[Completion]) -> list[Verdict]:
        """One verdict per completion, in order. Only called on valid completions."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
