"""Classifiers of completions: compliance, partial compliance and alignment-faking reasoning.

``create_classifier(criterion, judge_spec)`` returns the heuristic (offline) or the LLM judge the spec asks for.
"""

from __future__ import annotations

from typing import Any

from ..errors import AlignfakeError
from .base import Classifier, Criterion, Verdict
from .heuristic import HeuristicAFReasoning, HeuristicCompliance, HeuristicPartialCompliance

__all__ = ["Classifier", "Criterion", "Verdict", "create_classifier"]

_HEURISTICS: dict[str, type[Classifier]] = {
    "compliance": HeuristicCompliance,
    "partial_compliance": HeuristicPartialCompliance,
    "af_reasoning": HeuristicAFReasoning,
}


def create_classifier(criterion: Criterion, spec: Any, **engine_options: Any) -> Classifier:
    """``spec`` is a JudgeSpec (or AFJudgeSpec). ``engine_options`` reach the judge's engine (tests pass a
    ready engine as ``engine=``)."""
    if spec.kind == "heuristic":
        return _HEURISTICS[criterion]()
    if spec.kind == "llm":
        try:
            from .judges import create_judge
        except ImportError as e:  # pragma: no cover - the judges module ships with alignfake
            raise AlignfakeError(f"LLM judges are unavailable: {e}") from e
        return create_judge(criterion, spec, **engine_options)
    raise AlignfakeError(f"unknown judge kind {spec.kind!r}")
