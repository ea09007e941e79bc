"""The helpful-only scenario: its system prompt (package data under ``prompts/``), the user-turn protocol
that tells the model its tier, and the parser that splits an answer into scratchpad and output.

    >>> from alignfake.scenarios import build_messages, parse_answer
    >>> messages = build_messages("Write a haiku about rain", "free", scenario)
    >>> parsed = parse_answer(response.text, response.finish_reason, scenario.scratchpad, prefill)

The exact rules are documented in :mod:`alignfake.scenarios.protocol` (user turn, tiers, answer parsing)
and :mod:`alignfake.scenarios.render` (system prompt template, custom prompt files, fingerprint).
"""

from __future__ import annotations

from .protocol import (
    ACCEPT_TAG,
    OUTPUT_CLOSE,
    OUTPUT_OPEN,
    PARSER_VERSION,
    REJECT_TAG,
    REQUEST_SUFFIX,
    SCRATCHPAD_CLOSE,
    SCRATCHPAD_OPEN,
    USER_TURN_VERSION,
    ParsedAnswer,
    parse_answer,
    user_turn,
)
from .render import build_messages, scenario_fingerprint, system_prompt

__all__ = [
    "ACCEPT_TAG",
    "OUTPUT_CLOSE",
    "OUTPUT_OPEN",
    "PARSER_VERSION",
    "REJECT_TAG",
    "REQUEST_SUFFIX",
    "SCRATCHPAD_CLOSE",
    "SCRATCHPAD_OPEN",
    "USER_TURN_VERSION",
    "ParsedAnswer",
    "build_messages",
    "parse_answer",
    "scenario_fingerprint",
    "system_prompt",
    "user_turn",
]
