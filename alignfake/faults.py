"""Deterministic fault injection for crash tests: ``ALIGNFAKE_FAULT=point:N`` makes the process SIGKILL
itself the N-th time it reaches ``point`` (1-based). Unset, ``crash_point`` costs one dict lookup.

Points: ``store.write`` (an object written, its marker not yet), ``store.marker`` (a marker written),
``sample.batch`` (a batch generated, not committed), ``classify.shard``, ``finetune.step``, ``reduce.write``.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def crash_point(point: str) -> None:
    spec = os.environ.get("ALIGNFAKE_FAULT")
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
