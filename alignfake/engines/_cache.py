"""An on-disk response cache for HTTP engines, so that rerunning a stage costs nothing.

The key is a hash of everything that decides the answer: provider, endpoint, model, messages, every sampling
parameter, seed, ``n`` and prefill (never the API key, never the request id). Only complete, successful
responses are stored. One SQLite file per directory; several threads and processes may share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import EngineError

CACHE_FORMAT = 1
"""Bump when the stored value's shape changes: older entries are then simply never hit."""


def default_cache_dir() -> Path:
    """``$ALIGNFAKE_CACHE/responses``, else ``$XDG_CACHE_HOME/alignfake/responses``, else
    ``~/.cache/alignfake/responses``."""
    root = os.environ.get("ALIGNFAKE_CACHE")
    if root:
        return Path(root).expanduser() / "responses"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "alignfake" / "responses"


def cache_key(identity: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``identity`` (sorted keys, no whitespace)."""
    blob = json.dumps({"format": CACHE_FORMAT, **identity}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Key -> JSON value, in ``{directory}/responses.sqlite``."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            self.path = self.directory / "responses.sqlite"
            # One connection shared by the engine's worker threads, serialised by a lock; SQLite's own
            # locking (with a generous busy timeout) handles other processes.
            self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL)"
            )
        except (OSError, sqlite3.Error) as e:
            raise EngineError(
                f"cannot open the response cache in {self.directory}: {e}; set the engine's cache_dir or "
                "ALIGNFAKE_CACHE to a writable directory, or cache: false"
            ) from e
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM responses WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        blob = json.dumps(value, ensure_ascii=False)
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)", (key, blob, time.time())
            )

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
