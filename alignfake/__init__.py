"""alignfake: run alignment-faking experiments end to end and report compliance gaps.

The public surface is small: load an experiment, run it, reduce labels. Importing alignfake loads no torch,
transformers, vllm, openai, anthropic or kubernetes."""

from __future__ import annotations

from typing import Any

from .errors import AlignfakeError, DataError, SpecError, StaleOutputError, StoreError
from .spec import Experiment, load_experiment, parse_experiment

__version__ = "0.1.0"
__all__ = [
    "AlignfakeError",
    "DataError",
    "Experiment",
    "SpecError",
    "StaleOutputError",
    "StoreError",
    "load_experiment",
    "parse_experiment",
    "run_experiment",
    "__version__",
]


def run_experiment(exp: Experiment, **kwargs: Any) -> Any:
    """Run every stage of ``exp`` in this process; see ``alignfake.executors.local.run_experiment``."""
    from .executors.local import run_experiment as _run

    return _run(exp, **kwargs)
