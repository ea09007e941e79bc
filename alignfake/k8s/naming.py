"""Names of the Kubernetes objects of an experiment: DNS-1123 labels of at most 63 characters, stable across
renders, with a hash suffix when a name had to be shortened (so two long names never collide)."""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
HASH_LEN = 8

_INVALID = re.compile(r"[^a-z0-9-]+")
_DASHES = re.compile(r"-{2,}")


def dns_name(*parts: str, max_len: int = MAX_NAME) -> str:
    """Join ``parts`` with ``-`` into a DNS-1123 label of at most ``max_len`` characters.

    A name that fits and needs no cleaning is returned as is. Otherwise (too long, or characters a label
    cannot hold) it is cleaned, cut, and given ``-`` plus the first 8 hex digits of the sha256 of the original
    joined name: the same input always gives the same name, different inputs practically never collide.
    """
    if max_len < HASH_LEN + 2:
        raise ValueError(f"max_len {max_len} leaves no room for a hash suffix")
    raw = "-".join(p for p in parts if p)
    clean = _DASHES.sub("-", _INVALID.sub("-", raw.lower())).strip("-")
    if clean == raw and 0 < len(clean) <= max_len:
        return clean
    digest = hashlib.sha256(raw.encode("utf-8")).hexdigest()[:HASH_LEN]
    head = clean[: max_len - HASH_LEN - 1].rstrip("-")
    return f"{head}-{digest}" if head else f"x-{digest}"


def configmap_name(experiment: str) -> str:
    return dns_name(experiment, "spec")


# An Indexed Job's pods get the hostname ``{job}-{index}``, which must itself be a DNS label: keep room for the
# widest index (``spec.kubernetes.sample_shards`` is at most 1000, so ``-999``), whatever the shard count, so
# that the name does not change when the count does.
INDEX_ROOM = len("-999")


def job_name(experiment: str, stage: str, model: str | None = None, *, indexed: bool = False) -> str:
    """Name of a stage's Job: ``{experiment}-{stage}[-{model}]``, shortened with a hash suffix if needed."""
    return dns_name(experiment, stage, model or "", max_len=MAX_NAME - (INDEX_ROOM if indexed else 0))
