"""The S3 backend of the store: AWS S3 and S3-compatible servers (MinIO, Ceph RGW, R2, rclone, GCS interop).

Credentials come from boto3's standard chain, never from here: environment variables, a profile, a web
identity token (IRSA on EKS, workload identity elsewhere), or instance metadata. Every call retries throttling,
5xx answers and dropped connections (botocore "standard" mode); what survives the retries becomes a
:class:`~alignfake.errors.StoreError` naming the key and the endpoint. Objects are always written whole
(``put_object``, or a multipart upload that only becomes visible on completion), so the commit protocol of
:class:`~alignfake.store.Store` holds without conditional PUT.

Imported only for ``s3://`` stores (see :func:`alignfake.store.open_store`).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from .errors import StoreError
from .store import Store

MiB = 1024 * 1024
# S3's smallest allowed part (except the last one).
MIN_PART = 5 * MiB
# Parts no bigger than this keep a GB-sized adapter spread over many concurrent requests; s3transfer raises it
# on its own if an object would need more than S3's 10,000 parts.
MAX_PART = 16 * MiB

# Work calls: enough attempts to ride out throttling and a restarting endpoint (backoff grows from 50 ms for
# connection errors and from 1 s for throttling, capped at 20 s).
WORK_ATTEMPTS = 10
WORK_CONNECT_TIMEOUT_S = 10
WORK_READ_TIMEOUT_S = 120
# check(): an unreachable or misconfigured store must fail in seconds, before any GPU is requested.
CHECK_ATTEMPTS = 2
CHECK_CONNECT_TIMEOUT_S = 3
CHECK_READ_TIMEOUT_S = 10
# Reading a body can fail after botocore's retries are done (the connection drops mid-stream).
BODY_ATTEMPTS = 4

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_T = TypeVar("_T")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b/")``: the bucket and the key prefix of the store root."""
    if not uri.startswith("s3://"):
        raise StoreError(f"not an s3:// URI: {uri!r}")
    bucket, _, rest = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StoreError(f"s3 URI {uri!r} needs a bucket: s3://bucket/prefix")
    parts = [p for p in rest.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise StoreError(f"s3 URI {uri!r} has a '.' or '..' segment")
    return bucket, "".join(p + "/" for p in parts)


def _env_endpoint() -> str | None:
    """The endpoint boto3 >= 1.28 would take from the environment; read here too, so older boto3 behaves the
    same and we know to use path-style addressing."""
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _redact_url(url: str) -> str:
    """Drop ``user:password@`` from an endpoint URL before it goes into a message."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


class S3Store(Store):
    """A store rooted at ``s3://bucket/prefix/experiment``.

    ``endpoint_url`` (else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) selects an S3-compatible server and
    switches to path-style addressing. Files above ``multipart_threshold_mb`` are transferred in parts,
    ``max_concurrency`` at a time.
    """

    def __init__(
        self,
        uri: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        multipart_threshold_mb: int = 64,
        max_concurrency: int = 8,
    ):
        self.bucket, self._root = parse_s3_uri(uri)
        self.uri = f"s3://{self.bucket}/{self._root}".rstrip("/")
        self.endpoint_url = endpoint_url or _env_endpoint()
        self.region = region
        if multipart_threshold_mb < MIN_PART // MiB:
            raise StoreError(f"storage.multipart_threshold_mb must be at least 5 (S3's smallest part), "
                             f"got {multipart_threshold_mb}")
        if max_concurrency < 1:
            raise StoreError(f"storage.max_concurrency must be at least 1, got {max_concurrency}")
        self.max_concurrency = max_concurrency
        threshold = multipart_threshold_mb * MiB
        self.transfer_config = TransferConfig(
            multipart_threshold=threshold,
            multipart_chunksize=max(MIN_PART, min(threshold, MAX_PART)),
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )
        # Clients are made on first use: constructing a store resolves no credentials and opens no socket.
        self._lock = threading.Lock()
        self._session: boto3.session.Session | None = None
        self._client: Any = None
        self._check_client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Picklable for worker processes: clients, sessions and locks are rebuilt on first use there.
        state = self.__dict__.copy()
        state.update(_lock=None, _session=None, _client=None, _check_client=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, endpoint={self.endpoint})"

    # -- clients ------------------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The endpoint for messages (never with credentials in it)."""
        if self.endpoint_url:
            return _redact_url(self.endpoint_url)
        if self._client is not None:
            return str(self._client.meta.endpoint_url)
        return "AWS S3" + (f" ({self.region})" if self.region else "")

    def _config(self, *, attempts: int, connect_timeout: float, read_timeout: float, pool: int) -> Config:
        return Config(
            retries={"mode": "standard", "total_max_attempts": attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # s3transfer runs max_concurrency requests at once; a smaller pool would drop connections.
            max_pool_connections=pool,
            tcp_keepalive=True,
            # MinIO and most S3-compatible servers do not serve virtual-hosted bucket names by default.
            s3={"addressing_style": "path"} if self.endpoint_url else None,
        )

    def _make_clients(self) -> None:
        try:
            # A fresh session: sessions are not thread-safe, and region=None lets the chain pick the region.
            session = boto3.session.Session(region_name=self.region)
            work = session.client("s3", endpoint_url=self.endpoint_url, config=self._config(
                attempts=WORK_ATTEMPTS, connect_timeout=WORK_CONNECT_TIMEOUT_S,
                read_timeout=WORK_READ_TIMEOUT_S, pool=self.max_concurrency + 4))
        except (BotoCoreError, ValueError) as e:
            raise StoreError(f"cannot set up S3 access for {self.uri} at {self.endpoint}: "
                             f"{self._reason(e)}") from e
        self._session, self._client = session, work

    @property
    def client(self) -> Any:
        """The boto3 S3 client (thread-safe) used for all work."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    self._make_clients()
        return self._client

    def _checker(self) -> tuple[boto3.session.Session, Any]:
        """The session, and a client of it with short timeouts and few retries, for check()."""
        self.client  # noqa: B018 - makes the session
        assert self._session is not None
        with self._lock:
            if self._check_client is None:
                self._check_client = self._session.client("s3", endpoint_url=self.endpoint_url, config=self._config(
                    attempts=CHECK_ATTEMPTS, connect_timeout=CHECK_CONNECT_TIMEOUT_S,
                    read_timeout=CHECK_READ_TIMEOUT_S, pool=2))
        return self._session, self._check_client

    # -- keys and errors -----------------------------------------------------------------------------------
    def _k(self, key: str) -> str:
        # The same keys LocalStore accepts: S3-compatible servers that map keys to files (MinIO, rclone) reject
        # '.', '..' and empty segments, and AWS would store them as names no local store could hold.
        if not key or any(p in ("", ".", "..") for p in key.split("/")):
            raise StoreError(f"key {key!r} is not a relative path inside the store {self.uri} "
                             "(empty, '.', '..' or '//' segment)")
        return self._root + key

    def _secrets(self) -> list[str]:
        """Credential values to scrub from server-supplied text (already resolved by the client)."""
        if self._session is None:
            return []
        try:
            creds = self._session.get_credentials()
            frozen = creds.get_frozen_credentials() if creds is not None else None
        except Exception:  # noqa: BLE001 - only used to scrub messages
            return []
        if frozen is None:
            return []
        return [s for s in (frozen.access_key, frozen.secret_key, frozen.token) if s]

    def _reason(self, e: BaseException) -> str:
        """A one-line, credential-free explanation of a botocore/boto3 failure."""
        if isinstance(e, S3UploadFailedError) and isinstance(e.__context__, (ClientError, BotoCoreError)):
            e = e.__context__  # boto3 wraps the real failure in a message that repeats file names
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", "?"))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code == "NoSuchBucket":
                text = f"bucket {self.bucket!r} does not exist"
            elif code == "InvalidAccessKeyId":
                text = ("the access key id is not known to the server (check AWS_ACCESS_KEY_ID, AWS_PROFILE "
                        "or the service account's role)")
            elif code == "SignatureDoesNotMatch":
                text = ("the secret access key does not match the access key id (check "
                        "AWS_SECRET_ACCESS_KEY or the profile)")
            elif code in ("ExpiredToken", "TokenRefreshRequired", "RequestExpired"):
                text = f"the credentials have expired ({code})"
            elif code in ("AccessDenied", "403", "AllAccessDisabled"):
                text = f"access denied to s3://{self.bucket}/{self._root} (the credentials lack permission)"
            elif code in ("SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded") or (
                isinstance(status, int) and status >= 500
            ):
                text = f"the server kept failing after retries (HTTP {status} {code})"
            else:
                msg = err.get("Message") or ""
                text = f"HTTP {status} {code}" + (f": {msg}" if msg else "")
        elif isinstance(e, NoCredentialsError):
            text = ("no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or "
                    "a web identity token: IRSA / workload identity)")
        elif isinstance(e, (PartialCredentialsError, CredentialRetrievalError, ProfileNotFound)):
            text = f"the AWS credentials could not be loaded: {e}"
        elif isinstance(e, BotoConnectionError):
            text = f"cannot connect to {self.endpoint} ({type(e).__name__}) after retries"
        elif isinstance(e, HTTPClientError):
            text = f"the connection to {self.endpoint} failed ({type(e).__name__}) after retries"
        else:
            text = f"{type(e).__name__}: {e}"
        for secret in self._secrets():
            text = text.replace(secret, "***")
        return text

    def _error(self, op: str, key: str | None, e: BaseException) -> StoreError:
        where = f"{self.uri}/{key}" if key else self.uri
        return StoreError(f"S3 {op} of {where} at {self.endpoint} failed: {self._reason(e)}")

    def _call(self, op: str, key: str | None, fn: Callable[..., _T], **kwargs: Any) -> _T:
        try:
            return fn(**kwargs)
        except (ClientError, BotoCoreError, S3UploadFailedError) as e:
            raise self._error(op, key, e) from e

    @staticmethod
    def _is_not_found(e: BaseException) -> bool:
        return isinstance(e, ClientError) and str(e.response.get("Error", {}).get("Code")) in _NOT_FOUND

    # -- primitive object operations -----------------------------------------------------------------------
    def read_bytes(self, key: str) -> bytes:
        k = self._k(key)
        for attempt in range(1, BODY_ATTEMPTS + 1):
            try:
                resp = self.client.get_object(Bucket=self.bucket, Key=k)
            except ClientError as e:
                if self._is_not_found(e):
                    raise FileNotFoundError(f"{self.uri}/{key} does not exist") from e
                raise self._error("read", key, e) from e
            except BotoCoreError as e:
                raise self._error("read", key, e) from e
            try:
                return resp["Body"].read()  # StreamingBody checks Content-Length: a short body raises
            except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError) as e:
                # The body broke after the request succeeded, which botocore does not retry: ask again.
                if attempt == BODY_ATTEMPTS:
                    raise self._error("read", key, e) from e
                time.sleep(0.1 * 2**attempt)
        raise AssertionError("unreachable")

    def write_bytes(self, key: str, data: bytes) -> None:
        # One PUT is atomic on S3: readers see the old object, the new one, or none.
        k = self._k(key)
        self._call("write", key, self.client.put_object, Bucket=self.bucket, Key=k, Body=data)

    def size(self, key: str) -> int | None:
        k = self._k(key)
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=k)
        except ClientError as e:
            if self._is_not_found(e):
                return None
            raise self._error("head", key, e) from e
        except BotoCoreError as e:
            raise self._error("head", key, e) from e
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def list(self, prefix: str = "") -> list[str]:
        """Keys equal to ``prefix`` or below ``prefix/`` (path semantics, like LocalStore: ``list("a/b")``
        does not return ``a/bc``), sorted."""
        base = prefix.strip("/")
        if base:
            self._k(base)  # validate
        paginator = self.client.get_paginator("list_objects_v2")
        out: list[str] = []
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._root + base):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(self._root):]
                    if not base or rel == base or rel.startswith(base + "/"):
                        out.append(rel)
        except (ClientError, BotoCoreError) as e:
            raise self._error("list", base or None, e) from e
        return sorted(out)

    def delete(self, key: str) -> None:
        # Deleting an absent key succeeds on S3, as in LocalStore.
        k = self._k(key)
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=k)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = keys[i:i + 1000]
            resp = self._call("delete", prefix or None, self.client.delete_objects, Bucket=self.bucket,
                              Delete={"Objects": [{"Key": self._root + k} for k in batch], "Quiet": True})
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StoreError(f"S3 delete of {len(errors)} object(s) under {self.uri}/{prefix} at "
                                 f"{self.endpoint} failed, e.g. {first.get('Key')}: {first.get('Code')} "
                                 f"{first.get('Message', '')}".rstrip())
        return len(keys)

    def upload_file(self, local: str | Path, key: str) -> None:
        # A multipart upload becomes visible only on completion, and s3transfer aborts it on failure.
        k = self._k(key)
        self._call("upload", key, self.client.upload_file, Filename=str(local), Bucket=self.bucket, Key=k,
                   Config=self.transfer_config)

    def download_file(self, key: str, local: str | Path) -> None:
        k = self._k(key)
        dest = Path(local)
        dest.parent.mkdir(parents=True, exist_ok=True)
        # Download next to the destination and rename: a partial download never has the final name. No fsync
        # (like LocalStore.download_file): the file is a copy of a store object, not the record of it.
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                self.client.download_fileobj(Bucket=self.bucket, Key=k, Fileobj=f, Config=self.transfer_config)
            os.replace(tmp, dest)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if self._is_not_found(e):
                raise FileNotFoundError(f"{self.uri}/{key} does not exist") from e
            if isinstance(e, (ClientError, BotoCoreError)):
                raise self._error("download", key, e) from e
            raise

    # -- fail fast -----------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise StoreError within seconds unless the bucket exists and the store root can be listed, written,
        read and deleted with the credentials at hand. Uses short timeouts and few retries."""
        session, fast = self._checker()
        try:
            creds = session.get_credentials()
        except BotoCoreError as e:
            raise StoreError(f"store {self.uri} at {self.endpoint} is not usable: {self._reason(e)}") from e
        if creds is None:
            raise StoreError(f"store {self.uri} at {self.endpoint} is not usable: "
                             f"{self._reason(NoCredentialsError())}")
        probe = self._root + f"_alignfake_probe-{uuid.uuid4().hex}"
        step = "list"
        try:
            fast.list_objects_v2(Bucket=self.bucket, Prefix=self._root, MaxKeys=1)
            step = "write"
            fast.put_object(Bucket=self.bucket, Key=probe, Body=b"ok")
            step = "read"
            fast.get_object(Bucket=self.bucket, Key=probe)["Body"].read()
            step = "delete"
            fast.delete_object(Bucket=self.bucket, Key=probe)
        except (ClientError, BotoCoreError) as e:
            raise StoreError(f"store {self.uri} at {self.endpoint} is not usable ({step} failed): "
                             f"{self._reason(e)}") from e
