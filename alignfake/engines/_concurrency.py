"""Bounded concurrency for HTTP engines: a worker pool per call, and slots shared per provider endpoint.

``Engine.generate`` is synchronous; the calls inside it run on threads (the SDK clients are thread-safe and
the work is waiting on the network). Engines that talk to the same endpoint with the same limit (e.g. the
three judges of one classify stage) share one set of slots, so together they never exceed it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def provider_slots(endpoint: str, limit: int) -> threading.BoundedSemaphore:
    """The semaphore every engine for ``endpoint`` with this ``limit`` shares."""
    with _slots_lock:
        key = (endpoint, limit)
        if key not in _slots:
            _slots[key] = threading.BoundedSemaphore(limit)
        return _slots[key]


@dataclass
class Outcome(Generic[R]):
    """The result of one task, or the exception it raised."""

    value: R | None = None
    error: BaseException | None = None


def run_all(fn: Callable[[T], R], items: Sequence[T], max_workers: int) -> list[Outcome[R]]:
    """Run ``fn`` on every item with at most ``max_workers`` threads; results in input order. Every task runs
    to completion even if others fail, so finished work can be kept (cached) before an error is raised."""
    if not items:
        return []

    def guarded(item: T) -> Outcome[R]:
        try:
            return Outcome(value=fn(item))
        except Exception as e:  # noqa: BLE001 - handed back to the caller, who decides
            return Outcome(error=e)

    if max_workers <= 1 or len(items) == 1:
        return [guarded(i) for i in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items)), thread_name_prefix="alignfake-api") as pool:
        return list(pool.map(guarded, items))
