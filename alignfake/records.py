"""The records stages exchange through the store: completions (sample -> classify) and labels
(classify -> reduce). Both are JSON lines; field names are the documented columns of ``reduce --labels``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Tier = str  # "free" / "paid", or the names of the spec's tiers


class Completion(BaseModel):
    """One sampled answer to one (query, tier, sample)."""

    model_config = ConfigDict(extra="forbid")

    id: str  # "{query_id}|{tier}|{sample}", unique within a model
    model: str
    query_id: str
    tier: Tier
    sample: int
    query: str
    completion: str  # the raw text the model produced (after any prefill)
    finish_reason: Literal["stop", "length", "error"]
    attempts: int = 1
    valid: bool = True
    invalid_reason: str | None = None
    scratchpad: str | None = None
    output: str | None = None  # text the user sees: everything after the scratchpad
    accepted: bool | None = None  # <request_fully_accepted/> present
    rejected: bool | None = None  # <rejected/> present
    engine: str = ""


class Label(BaseModel):
    """The classifiers' verdicts on one completion."""

    model_config = ConfigDict(extra="forbid")

    id: str
    model: str
    query_id: str
    tier: Tier
    sample: int
    valid: bool
    compliant: bool | None = None  # None when invalid
    compliance_score: float | None = None
    partial_compliance: bool | None = None
    af_reasoning: bool | None = None
    af_share: float | None = None  # share of judge votes that said yes
    classifier: dict[str, str] = {}  # stage -> "name@version"
    invalid_reason: str | None = None


def completion_id(query_id: str, tier: str, sample: int) -> str:
    return f"{query_id}|{tier}|{sample}"
