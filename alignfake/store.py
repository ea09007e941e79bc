"""One interface over local directories and ``s3://`` (boto3), with the commit protocol every stage uses.

A *piece* of output (a completion shard, a checkpoint, a label shard, the results) is committed by writing its
data objects whole, then a marker ``{piece}.commit.json`` that records the fingerprint of the piece's inputs and
the name, size and sha256 of each object it commits. Readers trust only committed pieces, and re-check sizes.
Nothing relies on conditional PUT: two writers of the same piece write identical content (the fingerprint fixes
the inputs, generation is deterministic), so the last complete writer wins, and a writer whose fingerprint
differs from a committed marker refuses unless asked to recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StaleOutputError, StoreError
from .faults import crash_point

MARKER_SUFFIX = ".commit.json"


def fingerprint(*parts: Any) -> str:
    """Stable sha256 of JSON-serialisable inputs (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Marker:
    piece: str
    fingerprint: str
    objects: dict[str, dict[str, Any]]  # relative name -> {"size": int, "sha256": str}
    meta: dict[str, Any]

    def to_json(self) -> bytes:
        return json.dumps(
            {"piece": self.piece, "fingerprint": self.fingerprint, "objects": self.objects, "meta": self.meta},
            sort_keys=True,
            indent=1,
        ).encode()


class Store(ABC):
    """Keys are ``/``-separated paths relative to the store root (``{storage}/{experiment}``)."""

    uri: str

    # -- primitive object operations ---------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Raise FileNotFoundError if absent."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write an object whole: a reader sees the old object, the new one, or none, never a part."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int | None:
        """Size in bytes, or None if absent."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """All keys under ``prefix`` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None: ...

    @abstractmethod
    def upload_file(self, local: str | Path, key: str) -> None: ...

    @abstractmethod
    def download_file(self, key: str, local: str | Path) -> None: ...

    def check(self) -> None:
        """Fail fast (StoreError) if the store cannot be reached or written."""
        probe = "_alignfake_probe"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - any backend failure means unreachable
            raise StoreError(f"store {self.uri} is not writable: {e}") from e

    def local_path(self, key: str) -> Path | None:
        """A local filesystem path for the key, when the store is local."""
        return None

    # -- convenience -----------------------------------------------------------------------------------------
    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode("utf-8")

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode("utf-8"))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for k in keys:
            self.delete(k)
        return len(keys)

    # -- commit protocol ------------------------------------------------------------------------------------
    def marker(self, piece: str) -> Marker | None:
        try:
            raw = json.loads(self.read_bytes(piece + MARKER_SUFFIX))
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError):
            return None  # a torn marker cannot happen with whole-object writes; treat garbage as absent
        return Marker(raw["piece"], raw["fingerprint"], raw.get("objects", {}), raw.get("meta", {}))

    def committed(self, piece: str, fp: str | None = None, *, verify: bool = True) -> Marker | None:
        """The piece's marker if committed (and, with ``fp``, with that fingerprint), else None. Raises
        StaleOutputError if committed with another fingerprint. ``verify`` re-checks object sizes."""
        m = self.marker(piece)
        if m is None:
            return None
        if fp is not None and m.fingerprint != fp:
            raise StaleOutputError(
                f"{self.uri}/{piece} was committed from different inputs (fingerprint {m.fingerprint}, now {fp}); "
                "the spec changed. Rerun with --recompute to replace it."
            )
        if verify:
            for name, info in m.objects.items():
                if self.size(_join(piece, name)) != info["size"]:
                    return None  # an object was removed or replaced behind our back: not trustworthy
        return m

    def commit(
        self,
        piece: str,
        fp: str,
        files: dict[str, bytes] | None = None,
        local_files: dict[str, Path] | None = None,
        meta: dict[str, Any] | None = None,
    ) -> Marker:
        """Write the piece's objects, then its marker. ``files`` maps names (relative to ``piece``; ``""``
        for the piece key itself) to bytes; ``local_files`` maps names to local files to upload."""
        objects: dict[str, dict[str, Any]] = {}
        for name, data in (files or {}).items():
            self.write_bytes(_join(piece, name), data)
            objects[name] = {"size": len(data), "sha256": sha256_bytes(data)}
            crash_point("store.write")
        for name, path in (local_files or {}).items():
            self.upload_file(path, _join(piece, name))
            objects[name] = {"size": os.path.getsize(path), "sha256": sha256_file(path)}
            crash_point("store.write")
        m = Marker(piece, fp, objects, {"committed_at": time.time(), **(meta or {})})
        self.write_bytes(piece + MARKER_SUFFIX, m.to_json())
        crash_point("store.marker")
        return m

    def read_committed(self, piece: str, fp: str, name: str = "") -> bytes:
        """The bytes of a committed object, checked against the marker's sha256. Raises StoreError if the
        piece is not committed with ``fp`` or the object differs from what was committed (a concurrent writer
        died between its data and its marker): rerun the producing stage."""
        m = self.committed(piece, fp, verify=False)
        if m is None or name not in m.objects:
            raise StoreError(f"{self.uri}/{_join(piece, name)} is not committed; run the stage that produces it")
        data = self.read_bytes(_join(piece, name))
        if sha256_bytes(data) != m.objects[name]["sha256"]:
            # A second writer of the piece replaced the object and died before its own marker. The marker no
            # longer describes the data, so the piece is not committed: remove the marker (only the marker)
            # and let a rerun produce the piece again.
            self.delete(piece + MARKER_SUFFIX)
            raise StoreError(
                f"{self.uri}/{_join(piece, name)} did not match its commit marker (a concurrent writer was "
                "interrupted); the piece is now uncommitted: rerun to produce it again"
            )
        return data

    def uncommit(self, piece: str) -> None:
        """Remove a piece: marker first, so no reader trusts a half-deleted piece."""
        self.delete(piece + MARKER_SUFFIX)
        m_objects = [k for k in self.list(piece) if not k.endswith(MARKER_SUFFIX)]
        for k in m_objects:
            if k == piece or k.startswith(piece.rstrip("/") + "/"):
                self.delete(k)

    def markers(self, prefix: str) -> Iterator[Marker]:
        for key in self.list(prefix):
            if key.endswith(MARKER_SUFFIX):
                m = self.marker(key[: -len(MARKER_SUFFIX)])
                if m is not None:
                    yield m


def _join(piece: str, name: str) -> str:
    return piece if not name else f"{piece.rstrip('/')}/{name}"


class LocalStore(Store):
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.uri = str(self.root)

    def _p(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if self.root != p and self.root not in p.parents:
            raise StoreError(f"key {key!r} escapes the store root")
        return p

    def local_path(self, key: str) -> Path:
        return self._p(key)

    def read_bytes(self, key: str) -> bytes:
        return self._p(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        # write to a temp file in the same directory, fsync, then rename: readers never see a partial file
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            with _suppress():
                os.unlink(tmp)
            raise

    def exists(self, key: str) -> bool:
        return self._p(key).is_file()

    def size(self, key: str) -> int | None:
        p = self._p(key)
        return p.stat().st_size if p.is_file() else None

    def list(self, prefix: str = "") -> list[str]:
        base = self._p(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        out = []
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.startswith(".") and f.endswith(".tmp"):
                    continue  # an interrupted write: never a committed object
                out.append(Path(dirpath, f).relative_to(self.root).as_posix())
        return sorted(out)

    def delete(self, key: str) -> None:
        with _suppress():
            self._p(key).unlink()

    def upload_file(self, local: str | Path, key: str) -> None:
        p = self._p(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
        os.close(fd)
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, p)
        except BaseException:
            with _suppress():
                os.unlink(tmp)
            raise

    def download_file(self, key: str, local: str | Path) -> None:
        Path(local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._p(key), local)

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create store directory {self.root}: {e}") from e
        super().check()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, *_: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, OSError)


def open_store(uri: str, experiment: str, *, endpoint_url: str | None = None, region: str | None = None,
               multipart_threshold_mb: int = 64, max_concurrency: int = 8) -> Store:
    """The store rooted at ``{uri}/{experiment}``."""
    if uri.startswith("s3://"):
        from .s3 import S3Store  # boto3 only when needed

        return S3Store(
            uri.rstrip("/") + "/" + experiment,
            endpoint_url=endpoint_url,
            region=region,
            multipart_threshold_mb=multipart_threshold_mb,
            max_concurrency=max_concurrency,
        )
    return LocalStore(Path(uri) / experiment)


def store_for(exp: Any) -> Store:
    """The store of an Experiment."""
    s = exp.spec.storage
    return open_store(s.uri, exp.name, endpoint_url=s.endpoint_url, region=s.region,
                      multipart_threshold_mb=s.multipart_threshold_mb, max_concurrency=s.max_concurrency)


def read_jsonl(data: bytes) -> Iterable[dict[str, Any]]:
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def to_jsonl(rows: Iterable[Any]) -> bytes:
    out = []
    for r in rows:
        if hasattr(r, "model_dump_json"):
            out.append(r.model_dump_json())
        else:
            out.append(json.dumps(r, sort_keys=True))
    return ("\n".join(out) + "\n").encode("utf-8") if out else b""
