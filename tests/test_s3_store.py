"""S3Store against real S3 servers: rclone serve s3 (checks signatures, stores plain files) and moto."""

from __future__ import annotations

import os
import pickle
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from s3server import RcloneS3Server, S3Endpoint, closed_port, moto_s3

from alignfake.errors import StaleOutputError, StoreError
from alignfake.s3 import S3Store, parse_s3_uri
from alignfake.store import MARKER_SUFFIX, fingerprint, open_store

MiB = 1024 * 1024


# -- environment and servers ---------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only what a test sets reaches boto3: no developer ~/.aws, no instance metadata lookups."""
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture(scope="module")
def rclone_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    # DEBUG logs name every multipart part the server receives.
    with RcloneS3Server(tmp_path_factory.mktemp("rclone") / "root", log_level="DEBUG") as server:
        yield server


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[S3Endpoint]:
    with moto_s3() as ep:
        yield ep


@pytest.fixture(params=["rclone", "moto"])
def server(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    """Each server of the basic contract, with its credentials in the environment (the standard chain)."""
    ep: S3Endpoint = (request.getfixturevalue("rclone_server").endpoint if request.param == "rclone"
                      else request.getfixturevalue("moto_endpoint"))
    for k, v in ep.env().items():
        monkeypatch.setenv(k, v)
    return ep


@pytest.fixture
def rclone(rclone_server: RcloneS3Server, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    for k, v in rclone_server.endpoint.env().items():
        monkeypatch.setenv(k, v)
    return rclone_server.endpoint


@pytest.fixture
def moto(moto_endpoint: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> S3Endpoint:
    for k, v in moto_endpoint.env().items():
        monkeypatch.setenv(k, v)
    return moto_endpoint


def new_store(ep: S3Endpoint, **kwargs: Any) -> S3Store:
    """A store under a fresh prefix, so tests sharing a server never see each other's keys."""
    return S3Store(f"s3://{ep.bucket}/t-{uuid.uuid4().hex[:10]}/exp", endpoint_url=ep.endpoint_url, **kwargs)


def count_calls(store: S3Store, operation: str) -> list[dict[str, Any]]:
    """Record the request (url_path, headers, ...) of every ``operation`` the store's client makes; retries
    of one call are not counted again."""
    calls: list[dict[str, Any]] = []
    store.client.meta.events.register(f"before-call.s3.{operation}", lambda params, **_: calls.append(params))
    return calls


# -- URIs and keys ---------------------------------------------------------------------------------------------
def test_uri_parsing() -> None:
    assert parse_s3_uri("s3://b") == ("b", "")
    assert parse_s3_uri("s3://b/runs//exp/") == ("b", "runs/exp/")
    with pytest.raises(StoreError, match="needs a bucket"):
        parse_s3_uri("s3:///exp")
    with pytest.raises(StoreError, match=r"'\.\.'"):
        parse_s3_uri("s3://b/../exp")


def test_open_store_builds_an_s3_store_under_the_experiment() -> None:
    store = open_store("s3://bucket/runs/", "exp1", endpoint_url="http://127.0.0.1:1", multipart_threshold_mb=5,
                       max_concurrency=3)
    assert isinstance(store, S3Store)
    assert store.uri == "s3://bucket/runs/exp1"
    assert store.transfer_config.multipart_threshold == 5 * MiB
    assert store.transfer_config.max_request_concurrency == 3


@pytest.mark.parametrize("key", ["", "../x", "a//b", "a/./b", "/abs"])
def test_keys_must_be_relative_paths(key: str) -> None:
    store = S3Store("s3://bucket/exp", endpoint_url="http://127.0.0.1:1")
    with pytest.raises(StoreError, match="not a relative path"):
        store.write_bytes(key, b"x")


# -- the basic contract, on both servers --------------------------------------------------------------------------
def test_bytes_round_trip(server: S3Endpoint) -> None:
    store = new_store(server)
    store.write_bytes("a/b.json", b'{"x": 1}')
    assert store.read_bytes("a/b.json") == b'{"x": 1}'
    store.write_bytes("a/b.json", b"replaced")  # whole-object overwrite
    assert store.read_bytes("a/b.json") == b"replaced"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""
    with pytest.raises(FileNotFoundError, match="a/missing"):
        store.read_bytes("a/missing")


def test_exists_size_delete(server: S3Endpoint) -> None:
    store = new_store(server)
    assert not store.exists("k") and store.size("k") is None
    store.write_bytes("k", b"12345")
    assert store.exists("k") and store.size("k") == 5
    store.delete("k")
    assert not store.exists("k") and store.size("k") is None
    store.delete("k")  # deleting an absent key is not an error, as in LocalStore


def test_list_is_recursive_sorted_and_path_wise(server: S3Endpoint) -> None:
    store = new_store(server)
    other = S3Store(store.uri + "-other", endpoint_url=server.endpoint_url)
    other.write_bytes("runs/m1/s0", b"not ours")
    for key in ["runs/m1/s2", "runs/m1/s1", "runs/m10/s1", "runs/m1/deep/x", "top"]:
        store.write_bytes(key, b"x")
    assert store.list() == ["runs/m1/deep/x", "runs/m1/s1", "runs/m1/s2", "runs/m10/s1", "top"]
    assert store.list("runs/m1") == ["runs/m1/deep/x", "runs/m1/s1", "runs/m1/s2"]  # not runs/m10
    assert store.list("runs/m1/") == store.list("runs/m1")
    assert store.list("runs/m1/s1") == ["runs/m1/s1"]
    assert store.list("nothing") == []
    assert store.delete_prefix("runs") == 4
    assert store.list() == ["top"]
    assert other.list() == ["runs/m1/s0"]


def test_multipart_upload_and_download(server: S3Endpoint, tmp_path: Path,
                                       request: pytest.FixtureRequest) -> None:
    store = new_store(server, multipart_threshold_mb=5, max_concurrency=4)
    data = os.urandom(12 * MiB + 12345)
    src = tmp_path / "adapter.safetensors"
    src.write_bytes(data)
    parts = count_calls(store, "UploadPart")
    ranged_gets = count_calls(store, "GetObject")

    store.upload_file(src, "adapters/m/adapter.safetensors")

    assert len(parts) == 3  # 5 MiB parts: 5 + 5 + 2
    assert store.size("adapters/m/adapter.safetensors") == len(data)
    key = store._k("adapters/m/adapter.safetensors")
    if request.node.callspec.params["server"] == "rclone":
        # what the server saw, not just what the client sent
        log = request.getfixturevalue("rclone_server").log()
        assert len(re.findall(rf"put multipart upload {server.bucket} {re.escape(key)} ", log)) == 3
    else:
        etag = boto3.client("s3", endpoint_url=server.endpoint_url).head_object(Bucket=server.bucket, Key=key)["ETag"]
        assert etag.strip('"').endswith("-3")  # S3's ETag of a 3-part upload

    dest = tmp_path / "down" / "adapter.safetensors"
    store.download_file("adapters/m/adapter.safetensors", dest)
    assert dest.read_bytes() == data
    assert len(ranged_gets) >= 3 and all("Range" in g["headers"] for g in ranged_gets)
    assert os.listdir(dest.parent) == ["adapter.safetensors"]  # no temporary file left behind


def test_download_of_missing_key_leaves_nothing(server: S3Endpoint, tmp_path: Path) -> None:
    store = new_store(server)
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        store.download_file("nope.bin", tmp_path / "out" / "nope.bin")
    assert os.listdir(tmp_path / "out") == []


def test_commit_protocol(server: S3Endpoint, tmp_path: Path) -> None:
    store = new_store(server)
    fp = fingerprint({"model": "tiny", "shard": 0})
    ckpt = tmp_path / "ckpt.bin"
    ckpt.write_bytes(b"weights" * 100)
    piece = "adapters/tiny"
    assert store.committed(piece, fp) is None

    m = store.commit(piece, fp, files={"config.json": b"{}"}, local_files={"ckpt.bin": ckpt}, meta={"step": 3})

    assert store.exists(piece + MARKER_SUFFIX)
    got = store.committed(piece, fp)
    assert got is not None and got.fingerprint == fp and got.objects == m.objects and got.meta["step"] == 3
    assert store.read_bytes("adapters/tiny/ckpt.bin") == ckpt.read_bytes()
    with pytest.raises(StaleOutputError, match="different inputs"):
        store.committed(piece, fingerprint({"model": "tiny", "shard": 1}))
    assert [mk.piece for mk in store.markers("adapters")] == [piece]

    store.write_bytes("adapters/tiny/ckpt.bin", b"truncated behind our back")
    assert store.committed(piece, fp) is None  # sizes no longer match the marker

    store.uncommit(piece)
    assert store.list("adapters") == []


# -- listing beyond one page ----------------------------------------------------------------------------------------
def test_list_paginates_past_1000_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # 1234 PUTs take 5-20 s here (on moto too), so the objects are made as files before a fresh rclone serves
    # them (its directory cache never saw the directory empty); the listing still goes through S3.
    keys = [f"completions/m/shard-{i:05d}.jsonl" for i in range(1234)] + ["completions/m1/shard-00000.jsonl"]
    root = tmp_path / "root"
    for k in keys:
        (root / "alignfake-test" / "runs" / "exp" / k).parent.mkdir(parents=True, exist_ok=True)
        (root / "alignfake-test" / "runs" / "exp" / k).write_bytes(b"{}\n")
    with RcloneS3Server(root, "alignfake-test") as srv:
        for k, v in srv.endpoint.env().items():
            monkeypatch.setenv(k, v)
        store = S3Store("s3://alignfake-test/runs/exp", endpoint_url=srv.endpoint.endpoint_url)
        pages = count_calls(store, "ListObjectsV2")
        assert store.list("completions/m") == keys[:-1]
        assert len(pages) == 2  # the server returns at most 1000 keys a page
        assert store.list() == keys


# -- credentials and endpoints come from the standard chain -------------------------------------------------------
def test_endpoint_from_environment(rclone: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", rclone.endpoint_url)
    store = S3Store(f"s3://{rclone.bucket}/env-{uuid.uuid4().hex[:8]}")
    assert store.endpoint == rclone.endpoint_url
    store.write_bytes("k", b"via env endpoint")
    assert store.read_bytes("k") == b"via env endpoint"


def test_credentials_from_a_profile(rclone: S3Endpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    creds = tmp_path / "credentials"
    creds.write_text(f"[lab]\naws_access_key_id = {rclone.access_key}\naws_secret_access_key = {rclone.secret_key}\n")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_PROFILE", "lab")
    store = new_store(rclone)
    store.check()
    store.write_bytes("k", b"profile")
    assert store.read_bytes("k") == b"profile"


# -- check() fails fast and says why ----------------------------------------------------------------------------------
# check() uses 2 attempts and a 3 s connect timeout; the work client would retry for ~25 s on a closed port. The
# bound below is far from both, so it tells them apart without being sensitive to a slow machine.
FAST_S = 12.0


def test_check_passes_on_a_usable_store(server: S3Endpoint) -> None:
    store = new_store(server)
    store.check()
    assert store.list() == []  # the probe object is gone


def checked_error(store: S3Store) -> str:
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        store.check()
    assert time.monotonic() - start < FAST_S
    return str(info.value)


def test_check_missing_bucket(rclone: S3Endpoint) -> None:
    msg = checked_error(S3Store("s3://no-such-bucket/exp", endpoint_url=rclone.endpoint_url))
    assert "no-such-bucket" in msg and "does not exist" in msg and rclone.endpoint_url in msg


def test_check_wrong_secret(rclone: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789-wrong-secret-0123")
    msg = checked_error(new_store(rclone))
    assert "secret access key does not match" in msg and rclone.endpoint_url in msg
    assert "wrong-secret" not in msg and rclone.access_key not in msg


def test_check_unknown_access_key(rclone: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "TESTUNKNOWNKEY000000")
    msg = checked_error(new_store(rclone))
    assert "access key id is not known" in msg and "TESTUNKNOWNKEY000000" not in msg


def test_check_closed_port(rclone: S3Endpoint) -> None:
    endpoint = f"http://127.0.0.1:{closed_port()}"
    msg = checked_error(S3Store(f"s3://{rclone.bucket}/exp", endpoint_url=endpoint))
    assert "cannot connect" in msg and endpoint in msg and rclone.secret_key not in msg


def test_check_without_credentials(rclone: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    msg = checked_error(new_store(rclone))
    assert "no AWS credentials found" in msg


def test_operation_errors_name_key_and_endpoint(rclone: S3Endpoint, tmp_path: Path) -> None:
    store = S3Store("s3://no-such-bucket/exp", endpoint_url=rclone.endpoint_url)
    with pytest.raises(StoreError) as info:
        store.write_bytes("completions/m/shard-00000.jsonl", b"x")
    msg = str(info.value)
    assert "s3://no-such-bucket/exp/completions/m/shard-00000.jsonl" in msg and rclone.endpoint_url in msg
    assert "does not exist" in msg
    src = tmp_path / "ckpt.bin"
    src.write_bytes(b"w")
    with pytest.raises(StoreError, match=r"upload of s3://no-such-bucket/exp/adapters/ckpt\.bin at .*does not exist"):
        store.upload_file(src, "adapters/ckpt.bin")
    with pytest.raises(StoreError, match=r"list of s3://no-such-bucket/exp/adapters at .*does not exist"):
        store.list("adapters")


def test_store_pickles_without_its_clients(rclone: S3Endpoint) -> None:
    store = new_store(rclone)
    store.write_bytes("k", b"v")
    copy = pickle.loads(pickle.dumps(store))
    assert copy.uri == store.uri and copy.read_bytes("k") == b"v"


# -- faults ---------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_server_killed_mid_writes_loses_nothing_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies (SIGKILL) while commits stream in and comes back ~1.5 s later on the same port and
    directory. Each commit either retries through or raises a StoreError naming the key and endpoint; every
    commit that returned is still committed, intact, afterwards."""
    with RcloneS3Server(tmp_path / "root") as srv:
        for k, v in srv.endpoint.env().items():
            monkeypatch.setenv(k, v)
        store = new_store(srv.endpoint)
        ckpt = tmp_path / "ckpt.bin"
        ckpt.write_bytes(os.urandom(64 * 1024))
        enough_before = threading.Event()
        restarted = threading.Event()
        down: list[float] = []  # when the server died, when it was back

        def outage() -> None:
            enough_before.wait(timeout=30)
            srv.kill()
            down.append(time.monotonic())
            time.sleep(1.5)
            srv.start()
            down.append(time.monotonic())
            restarted.set()

        killer = threading.Thread(target=outage, daemon=True)
        killer.start()

        done: dict[str, str] = {}  # piece -> fingerprint, for commits that returned
        failed: list[str] = []
        spans: list[tuple[float, float]] = []  # when each commit began and ended
        i = after_restart = 0
        while after_restart < 5:
            piece, fp = f"completions/m/shard-{i:05d}", fingerprint("shard", i)
            began = time.monotonic()
            try:
                # (a piece is either one object or a directory of them: file-backed servers can't hold both)
                store.commit(piece, fp, files={"rows.jsonl": f'{{"i": {i}}}\n'.encode()},
                             local_files={"ckpt.bin": ckpt} if i % 3 == 0 else None)
                done[piece] = fp
            except StoreError as e:
                failed.append(piece)
                assert piece in str(e)  # every key of the piece starts with it
                assert srv.endpoint.endpoint_url in str(e)
            spans.append((began, time.monotonic()))
            i += 1
            if i == 10:
                enough_before.set()
            if restarted.is_set():
                after_restart += 1
            assert i < 10_000, "the server never came back"
        killer.join(timeout=30)
        assert any(b < down[1] and e > down[0] for b, e in spans), "no commit ran while the server was down"

        assert len(done) >= 15  # the 10 before the outage and the 5 after it
        for piece, fp in done.items():
            marker = store.committed(piece, fp)
            assert marker is not None, piece
            n = int(piece.rsplit("-", 1)[1])
            assert store.read_committed(piece, fp, "rows.jsonl") == f'{{"i": {n}}}\n'.encode()  # sha256-checked
        for piece in failed:  # a failed commit may have written objects, but a marker only after all of them
            marker = store.marker(piece)
            assert marker is None or store.committed(piece, marker.fingerprint) is not None
        # and the store works normally again
        store.commit("after", fingerprint("after"), files={"": b"ok"})
        assert store.committed("after", fingerprint("after")) is not None


def test_read_retries_a_body_cut_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection that drops mid-body is past botocore's retries; read_bytes asks again."""
    body = b"0123456789"
    gets: list[str] = []

    class CutFirstBody(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            gets.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            # the first answer promises 10 bytes, sends 4 and hangs up
            self.wfile.write(body if len(gets) > 1 else body[:4])
            self.close_connection = True

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutFirstBody)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "TESTFAKEFAKEFAKEFAKE")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fake")
        store = S3Store("s3://bucket/exp", endpoint_url=f"http://127.0.0.1:{server.server_address[1]}")
        assert store.read_bytes("k") == body
        assert gets == ["/bucket/exp/k", "/bucket/exp/k"]
    finally:
        server.shutdown()
        server.server_close()
