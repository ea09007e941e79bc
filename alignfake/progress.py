"""Progress reporting for stages, independent of how it is shown: a *progress factory* is called as
``with progress(description, total) as advance: advance(n)``. The local executor shows rich bars; Jobs and
tests use ``no_progress``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

ProgressFactory = Callable[[str, int], Any]


@contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda n=1: None
