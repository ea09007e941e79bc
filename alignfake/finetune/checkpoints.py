"""Training checkpoints in the store: one committed piece per saved step, ``adapters/{model}/checkpoints/
step-NNNNNNNN``, holding every file of the trainer's checkpoint directory (adapter weights, optimizer, scheduler,
RNG and step). A restart resumes from the newest committed one; a checkpoint without its marker (the process
died mid-upload) is invisible and overwritten by the next save of that step.

Checkpoints carry the fingerprint of the finetune inputs *and the trainer*, since the local trainer's and
Axolotl's checkpoint formats differ: switching trainer, or changing the documents or hyperparameters, makes
old checkpoints stale. Stale checkpoints are refused (StaleOutputError) unless recomputing, which removes them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import StaleOutputError, StoreError
from ..store import MARKER_SUFFIX, Marker, Store, fingerprint, sha256_file

_STEP = re.compile(r"/step-(\d{8})$")


def checkpoint_fp(finetune_fp: str, trainer: str) -> str:
    return fingerprint("checkpoint", finetune_fp, trainer)


def checkpoint_piece(prefix: str, step: int) -> str:
    return f"{prefix}/step-{step:08d}"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    piece: str
    marker: Marker


def committed_checkpoints(
    store: Store, prefix: str, fp: str, *, recompute: bool = False, log: Callable[[str], None] = lambda m: None
) -> list[Checkpoint]:
    """The committed checkpoints with fingerprint ``fp``, oldest first. Stale ones raise StaleOutputError, or
    are removed when ``recompute``."""
    out: list[Checkpoint] = []
    for m in store.markers(prefix):
        match = _STEP.search(m.piece)
        if match is None:
            continue
        if m.fingerprint != fp:
            if not recompute:
                raise StaleOutputError(
                    f"{store.uri}/{m.piece} is a training checkpoint from different inputs (another spec or "
                    "trainer); rerun with --recompute to discard it and train afresh."
                )
            log(f"recompute: removing stale checkpoint {m.piece}")
            store.uncommit(m.piece)
            continue
        if store.committed(m.piece, fp) is not None:  # re-checks object sizes
            out.append(Checkpoint(int(match.group(1)), m.piece, m))
    return sorted(out, key=lambda c: c.step)


def latest_checkpoint(store: Store, prefix: str, fp: str, *, recompute: bool = False,
                      log: Callable[[str], None] = lambda m: None) -> Checkpoint | None:
    found = committed_checkpoints(store, prefix, fp, recompute=recompute, log=log)
    return found[-1] if found else None


def commit_checkpoint_dir(store: Store, prefix: str, fp: str, step: int, directory: Path,
                          meta: dict | None = None) -> Marker:
    """Upload every file under ``directory`` (recursively) as the checkpoint of ``step``, then its marker."""
    files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
    return store.commit(checkpoint_piece(prefix, step), fp, local_files=files, meta={"step": step, **(meta or {})})


def restore_checkpoint(store: Store, ckpt: Checkpoint, target: Path) -> Path:
    """Download a committed checkpoint's files into ``target``; each is checked against the marker's sha256."""
    target.mkdir(parents=True, exist_ok=True)
    for name, info in ckpt.marker.objects.items():
        dest = target / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.download_file(f"{ckpt.piece}/{name}", dest)  # streamed: optimizer states can be many GB
        if sha256_file(dest) != info["sha256"]:
            raise StoreError(
                f"{store.uri}/{ckpt.piece}/{name} does not match its commit marker (an interrupted concurrent "
                "writer?); rerun the finetune stage with --recompute"
            )
    return target


def prune_checkpoints(store: Store, prefix: str, fp: str, keep: int) -> list[int]:
    """Remove all but the ``keep`` newest committed checkpoints (marker first); returns the removed steps."""
    found = committed_checkpoints(store, prefix, fp)
    removed = []
    for c in found[: max(0, len(found) - keep)]:
        store.uncommit(c.piece)
        removed.append(c.step)
    return removed


def remove_all_checkpoints(store: Store, prefix: str) -> int:
    """After the final adapter is committed the checkpoints are no longer needed (they can be large)."""
    pieces = {k[: -len(MARKER_SUFFIX)] for k in store.list(prefix) if k.endswith(MARKER_SUFFIX)}
    for piece in sorted(pieces):
        store.uncommit(piece)
    store.delete_prefix(prefix)  # uploads that never got a marker
    return len(pieces)
