"""What every HTTP engine shares (alignfake/engines/_api.py, _retry.py, _cache.py, _keys.py), specified on a
scripted provider: retries and their waits, Retry-After, the response cache and its key, n top-up and fan-out,
per-request rejections vs fatal errors, and keys that never print. The real I/O paths are tested against real
servers in test_openai_server.py and test_anthropic_engine.py."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from alignfake.engines import Request
from alignfake.engines._api import ApiEngine, CallResult, FatalApiError, RequestRejected, classify_status
from alignfake.engines._cache import ResponseCache, cache_key
from alignfake.engines._keys import Secret, read_api_key
from alignfake.engines._retry import RetryPolicy, TransientError, parse_retry_after
from alignfake.errors import EngineError


class Scripted(ApiEngine):
    """A provider whose calls follow a script: per request id, a list of outcomes consumed in order
    ("429:2" = TransientError with Retry-After 2, "500", "reject", "fatal", or a CallResult)."""

    name = "scripted"
    native_n = True

    def __init__(self, script: dict[str, list[Any]], choices: int | None = None, **kw: Any):
        super().__init__(model="m", endpoint=f"http://scripted/{id(self)}", secret=Secret("sk-SECRETKEY"),
                         backoff_base=0.001, **kw)
        self.script = script
        self.choices = choices  # a server that ignores n returns this many choices
        self.sent: list[tuple[str, int, int | None]] = []
        self.lock = threading.Lock()

    def _identity(self, request: Request) -> dict[str, Any]:
        return {}

    def _send(self, request: Request, n: int, seed: int | None) -> CallResult:
        with self.lock:
            self.sent.append((request.id, n, seed))
            steps = self.script.get(request.id, [])
            step = steps.pop(0) if steps else None
        if isinstance(step, str):
            if step.startswith("429"):
                raise TransientError("HTTP 429", status=429, retry_after=float(step.split(":")[1]))
            if step == "500":
                raise TransientError("HTTP 500: boom sk-SECRETKEY", status=500)
            if step == "reject":
                raise RequestRejected("HTTP 400: prompt too long")
            if step == "fatal":
                raise FatalApiError("HTTP 401: bad key sk-SECRETKEY")
        k = self.choices if self.choices is not None else n
        return CallResult([f"{request.id}:{seed}:{i}" for i in range(k)], ["stop"] * k, 3, k)


def req(rid: str, **kw: Any) -> Request:
    return Request(id=rid, messages=({"role": "user", "content": f"hi {rid}"},), max_tokens=8, **kw)


def test_transient_errors_are_retried_and_retry_after_is_honoured(tmp_path: Path) -> None:
    eng = Scripted({"a": ["429:1.5", "500"]}, cache_dir=str(tmp_path))
    [resp] = eng.generate([req("a")])
    assert resp.texts == ["a:None:0"] and resp.meta["retries"] == 2
    assert resp.meta["waits"][0] == 1.5  # the server's Retry-After, not our backoff
    assert resp.meta["waits"][1] < 0.01  # backoff base 0.001 with jitter
    assert len(eng.sent) == 3


def test_exhausted_retries_raise_after_caching_the_finished_requests(tmp_path: Path) -> None:
    eng = Scripted({"bad": ["500"] * 10}, max_retries=2, cache_dir=str(tmp_path))
    with pytest.raises(EngineError, match="gave up after 3 attempts") as err:
        eng.generate([req("good"), req("bad")])
    assert "sk-SECRETKEY" not in str(err.value)
    again = Scripted({}, cache_dir=str(tmp_path))
    again.endpoint = eng.endpoint  # same endpoint -> same cache keys
    [good] = again.generate([req("good")])
    assert good.cached and again.sent == []


def test_rejected_request_gives_an_error_response_and_the_batch_goes_on(tmp_path: Path) -> None:
    eng = Scripted({"x": ["reject"]}, cache_dir=str(tmp_path))
    ok, bad = eng.generate([req("ok"), req("x", n=2)])
    assert ok.texts == ["ok:None:0"] and ok.error is None
    assert bad.finish_reasons == ["error", "error"] and bad.texts == ["", ""] and "prompt too long" in bad.error
    # errors are not cached: the next run asks again
    assert eng.generate([req("x")])[0].texts == ["x:None:0"]


def test_fatal_errors_raise_at_once_without_the_key() -> None:
    eng = Scripted({"a": ["fatal"]}, cache=False)
    with pytest.raises(EngineError, match="HTTP 401") as err:
        eng.generate([req("a")])
    assert "sk-SECRETKEY" not in str(err.value) and "[redacted]" in str(err.value)
    assert "SECRET" not in repr(eng)


def test_a_server_that_ignores_n_is_topped_up_with_distinct_seeds() -> None:
    eng = Scripted({}, choices=1, cache=False)
    [resp] = eng.generate([req("v", n=3, seed=10, temperature=1.0)])
    assert resp.texts == ["v:10:0", "v:11:0", "v:12:0"]
    assert eng.sent == [("v", 3, 10), ("v", 1, 11), ("v", 1, 12)]
    assert resp.meta["calls"] == 3 and resp.completion_tokens == 3


def test_fanout_sends_one_call_per_sample() -> None:
    eng = Scripted({}, cache=False, n_strategy="fanout")
    [resp] = eng.generate([req("v", n=2, seed=5)])
    assert sorted(eng.sent) == [("v", 1, 5), ("v", 1, 6)] and len(resp.texts) == 2


def test_second_run_is_served_from_the_cache(tmp_path: Path) -> None:
    reqs = [req(str(i), n=2, seed=i) for i in range(5)]
    first = Scripted({}, cache_dir=str(tmp_path))
    out1 = first.generate(reqs)
    second = Scripted({}, cache_dir=str(tmp_path))
    second.endpoint = first.endpoint
    out2 = second.generate(reqs)
    assert second.sent == [] and all(r.cached for r in out2)
    assert [r.texts for r in out1] == [r.texts for r in out2]
    assert [r.id for r in out2] == [r.id for r in reqs]


def test_cache_key_covers_every_input_but_not_the_request_id(tmp_path: Path) -> None:
    eng = Scripted({}, cache=False)
    base = req("a", seed=1)
    variants = [
        Request(id="a", messages=({"role": "user", "content": "other"},), max_tokens=8, seed=1),
        Request(id="a", messages=base.messages, max_tokens=9, seed=1),
        Request(id="a", messages=base.messages, max_tokens=8, seed=2),
        Request(id="a", messages=base.messages, max_tokens=8, seed=1, temperature=1.0),
        Request(id="a", messages=base.messages, max_tokens=8, seed=1, n=2),
        Request(id="a", messages=base.messages, max_tokens=8, seed=1, prefill="<SCRATCHPAD_REASONING>"),
    ]
    keys = {eng.cache_key(v) for v in variants} | {eng.cache_key(base)}
    assert len(keys) == len(variants) + 1
    assert eng.cache_key(Request(id="zzz", messages=base.messages, max_tokens=8, seed=1)) == eng.cache_key(base)
    other_endpoint = Scripted({}, cache=False)
    assert other_endpoint.cache_key(base) != eng.cache_key(base)
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})


def test_concurrency_is_bounded_and_order_is_kept(tmp_path: Path) -> None:
    active = 0
    peak = 0
    lock = threading.Lock()

    class Slow(Scripted):
        def _send(self, request: Request, n: int, seed: int | None) -> CallResult:
            nonlocal active, peak
            with lock:
                active += 1
                peak = max(peak, active)
            time.sleep(0.02)
            with lock:
                active -= 1
            return super()._send(request, n, seed)

    eng = Slow({}, cache=False, max_concurrency=3)
    out = eng.generate([req(str(i)) for i in range(12)])
    assert [r.id for r in out] == [str(i) for i in range(12)]
    assert peak <= 3


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(0)
    for k, cap in enumerate([1, 2, 4, 8, 8, 8]):
        d = policy.delay(k, None, rng)
        assert cap / 2 <= d <= cap
    assert policy.delay(0, 30.0, rng) == 30.0
    assert policy.delay(0, 10_000.0, rng) == policy.max_retry_after


def test_retry_after_forms() -> None:
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "1500"}) == 1.5
    assert parse_retry_after({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, now=1445412480.0) == 10.0
    assert parse_retry_after({"Retry-After": "soon"}) is None
    assert parse_retry_after({}) is None


def test_status_mapping() -> None:
    assert isinstance(classify_status(429, {"retry-after": "2"}, "", provider="p", prefill=False), TransientError)
    assert classify_status(429, {"retry-after": "2"}, "", provider="p", prefill=False).retry_after == 2.0
    for s in (500, 502, 503, 529):
        assert isinstance(classify_status(s, None, "", provider="p", prefill=False), TransientError)
    for s in (401, 403, 404):
        assert isinstance(classify_status(s, None, "", provider="p", prefill=False), FatalApiError)
    assert isinstance(classify_status(400, None, "", provider="p", prefill=False), RequestRejected)
    assert isinstance(classify_status(422, None, "", provider="p", prefill=True), FatalApiError)


def test_api_keys_come_from_the_environment_and_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-live-123456")
    s = read_api_key("MY_KEY", "OPENAI_API_KEY", provider="openai", required=True)
    assert s is not None and s.reveal() == "sk-live-123456"
    assert "123456" not in repr(s) and "123456" not in str(s) and "123456" not in f"{s}"
    assert s.redact("Bearer sk-live-123456 failed") == "Bearer [redacted] failed"
    monkeypatch.delenv("MY_KEY")
    with pytest.raises(EngineError, match="MY_KEY"):
        read_api_key("MY_KEY", "OPENAI_API_KEY", provider="openai", required=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert read_api_key(None, "OPENAI_API_KEY", provider="openai", required=False) is None
    with pytest.raises(EngineError, match="OPENAI_API_KEY"):
        read_api_key(None, "OPENAI_API_KEY", provider="openai", required=True)


def test_cache_file_is_shared_between_instances(tmp_path: Path) -> None:
    a = ResponseCache(tmp_path)
    a.put("k", {"texts": ["x"]})
    b = ResponseCache(tmp_path)
    assert b.get("k") == {"texts": ["x"]} and b.get("missing") is None and len(b) == 1


def test_engines_are_registered_and_reject_unknown_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from alignfake.engines import create_engine, engine_names

    assert {"openai", "anthropic"} <= set(engine_names())
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-xyz")
    with pytest.raises(EngineError, match="unknown engine options"):
        create_engine("openai", model="m", base_url="http://127.0.0.1:9/v1", cache_dir=str(tmp_path), bogus=1)
    with pytest.raises(EngineError, match="adapter"):
        create_engine("anthropic", model="m", adapter="/some/dir", cache_dir=str(tmp_path))
    # the options the sample stage passes to every engine are accepted
    eng = create_engine("openai", model="m", base_url="http://127.0.0.1:9/v1", cache_dir=str(tmp_path),
                        batch_size=8, precision="auto", max_model_len=16384, gpus=0, shared_prefix_cache=True,
                        api_key_env=None, max_concurrency=2, adapter=None)
    eng.close()


def test_http_engines_and_judges_import_no_sdk_until_used() -> None:
    import json
    import subprocess
    import sys

    code = ("import alignfake.engines.openai_compat, alignfake.engines.anthropic_engine, "
            "alignfake.classifiers.judges, alignfake.classifiers.judge_eval, sys, json; "
            "print(json.dumps(sorted(sys.modules)))")
    mods = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                     check=True).stdout.splitlines()[-1])
    assert sorted(m for m in mods if m.split(".")[0] in ("openai", "anthropic", "torch", "transformers")) == []
