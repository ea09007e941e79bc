"""The system prompt of the helpful-only scenario, the chat messages of one request, and the scenario's
fingerprint.

Our system prompt is a template (``prompts/helpful_only.txt``, package data, our own wording) with a few
placeholders, each written ``{{name}}``:

``{{lab}}``                the lab's name (``ScenarioSpec.lab_name``)
``{{reasoning}}``          how to answer: ``reasoning_scratchpad.txt`` or ``reasoning_direct.txt``
``{{examples}}``           worked examples of scratchpad reasoning (``examples_scratchpad.txt``); empty without
                           a scratchpad, since they demonstrate reasoning the no-CoT variant asks the model to skip
``{{training_details}}``   how RLHF changes a model that does not comply (``training_details.txt``); empty when
                           ``ScenarioSpec.training_details`` is false
``{{closing}}``            the closing summary: ``closing_scratchpad.txt`` or ``closing_direct.txt``

A block that renders empty leaves no gap: runs of blank lines are collapsed to one. Rendering depends only on
the ScenarioSpec, never on the tier or the query, so the system prompt is byte-identical across every request
of an experiment: the shared prefix that vLLM's prefix caching and the transformers engine's KV-cache reuse
rely on.

``system_prompt_file`` replaces all of this: the file is read as UTF-8 and used verbatim (no placeholders are
filled, ``lab_name`` and ``training_details`` do not apply; ``scratchpad`` still decides how answers are
parsed). A relative path is resolved against the current directory.
"""

from __future__ import annotations

import hashlib
import json
import re
from functools import cache
from importlib.resources import files
from pathlib import Path

from ..errors import SpecError
from ..spec import ScenarioSpec
from .protocol import PARSER_VERSION, USER_TURN_VERSION, user_turn

_FIELD = "spec.evaluation.scenario"
_PLACEHOLDER = re.compile(r"\{\{([a-z_]+)\}\}")


@cache
def _template(name: str) -> str:
    """A prompt file shipped with alignfake. Line endings are normalised so that a checkout with CRLF
    renders the same bytes (and fingerprint) as one with LF."""
    text = (files("alignfake.scenarios") / "prompts" / name).read_text(encoding="utf-8")
    return text.replace("\r\n", "\n").strip()


def _fill(template: str, values: dict[str, str], source: str, *, exact: bool = True) -> str:
    """Replace ``{{name}}`` placeholders. ``exact``: the template must use every value (the main template);
    otherwise it may use a subset (a block that mentions only the lab)."""
    used = set(_PLACEHOLDER.findall(template))
    if not used <= set(values) or (exact and used != set(values)):
        # Only our own templates reach here, so a mismatch is a packaging bug, caught by the tests.
        raise RuntimeError(f"{source}: placeholders {sorted(used)} do not match values {sorted(values)}")
    # One pass: a value that contains '{{...}}' (a lab name, say) is inserted as is, never expanded.
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _read_user_prompt(path_str: str) -> str:
    path = Path(path_str).expanduser()
    field = f"{_FIELD}.system_prompt_file"
    try:
        # Bytes, then decode: text mode would translate line endings, and the file is to be used verbatim.
        data = path.read_bytes()
    except FileNotFoundError:
        raise SpecError(field, [f"file not found: {path_str} (resolved to {path.resolve()})"]) from None
    except IsADirectoryError:
        raise SpecError(field, [f"is a directory, not a file: {path_str}"]) from None
    except OSError as e:
        raise SpecError(field, [f"cannot read {path_str}: {e.strerror or e}"]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(field, [f"{path_str} is not valid UTF-8 (byte {e.start})"]) from None
    if not text.strip():
        raise SpecError(field, [f"{path_str} is empty"])
    return text


def system_prompt(scenario: ScenarioSpec) -> str:
    """The system prompt for ``scenario``: the user's file verbatim, or our template rendered."""
    if scenario.system_prompt_file:
        return _read_user_prompt(scenario.system_prompt_file)
    lab = scenario.lab_name.strip()
    if not lab or "\n" in lab or "\r" in lab:
        raise SpecError(f"{_FIELD}.lab_name", [f"must be a non-empty single line, got {scenario.lab_name!r}"])
    mode = "scratchpad" if scenario.scratchpad else "direct"
    blocks = {
        "reasoning": f"reasoning_{mode}.txt",
        "examples": "examples_scratchpad.txt" if scenario.scratchpad else None,
        "training_details": "training_details.txt" if scenario.training_details else None,
        "closing": f"closing_{mode}.txt",
    }
    # Blocks are filled first (they may name the lab), then inserted whole into the main template.
    values = {"lab": lab}
    for key, name in blocks.items():
        values[key] = _fill(_template(name), {"lab": lab}, name, exact=False) if name else ""
    return _fill(_template("helpful_only.txt"), values, "helpful_only.txt")


def build_messages(query: str, tier: str, scenario: ScenarioSpec) -> tuple[dict[str, str], ...]:
    """The chat messages of one request: the shared system prompt, then the user turn."""
    return (
        {"role": "system", "content": system_prompt(scenario)},
        {"role": "user", "content": user_turn(query, tier)},
    )


def scenario_fingerprint(scenario: ScenarioSpec) -> str:
    """sha256 (hex) of everything about the scenario that decides what a model is asked and how its answer
    is read: the rendered system prompt, the user-turn template (its version and its actual rendering, so an
    edit that forgot to bump the version still changes the fingerprint), the parser version and whether a
    scratchpad is required. Stage fingerprints include it, so editing a prompt invalidates completions."""
    blob = json.dumps(
        {
            "scenario": scenario.name,
            "system_prompt": system_prompt(scenario),
            "user_turn_version": USER_TURN_VERSION,
            "user_turn": [user_turn("{query}", tier) for tier in ("free", "paid", "other")],
            "parser_version": PARSER_VERSION,
            "scratchpad": scenario.scratchpad,
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
