"""The Anthropic engine through the real ``anthropic`` SDK against a fake Messages API on loopback.

Only a mock can run here (no network, no key): ``FakeAnthropic`` (tests/http_fakes.py) is a small HTTP server
that speaks the Messages API's shape, checks the headers the SDK sends, and injects 429/529/500 and dropped
connections. What is tested is our side: conversion (system, prefill, stop reasons), retries, the cache, n,
and that the key never leaks.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from http_fakes import FakeAnthropic

from alignfake.engines import Request, create_engine
from alignfake.errors import EngineError

KEY = "sk-ant-test-0123456789"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAnthropic]:
    s = FakeAnthropic(KEY)
    yield s
    s.close()


@pytest.fixture
def fake(server: FakeAnthropic) -> Iterator[FakeAnthropic]:
    server.faults.queue.clear()
    server.faults.received = 0
    server.bodies.clear()
    server.reply = None
    yield server


@pytest.fixture
def engine(fake: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("TEST_ANTHROPIC_KEY", KEY)
    eng = create_engine("anthropic", model="claude-test", base_url=fake.url, api_key_env="TEST_ANTHROPIC_KEY",
                        cache_dir=str(tmp_path / "cache"), backoff_base=0.01, max_retries=4, max_concurrency=4)
    yield eng
    eng.close()


def req(rid: str, text: str = "hello", **kw) -> Request:
    return Request(id=rid, messages=({"role": "system", "content": "be brief"}, {"role": "user", "content": text}),
                   max_tokens=kw.pop("max_tokens", 50), **kw)


def test_conversion_of_system_messages_and_stop_reasons(engine, fake: FakeAnthropic) -> None:
    ok, cut = engine.generate([req("a", "hi"), req("b", "long", max_tokens=3)])
    assert ok.text == "answer to: hi" and ok.finish_reason == "stop"
    assert ok.prompt_tokens == 11 and ok.completion_tokens == 7
    assert cut.finish_reason == "length"
    body = next(b for b in fake.bodies if b["messages"][-1]["content"] == "hi")
    assert body["system"] == "be brief" and body["model"] == "claude-test" and body["temperature"] == 0.0
    assert [m["role"] for m in body["messages"]] == ["user"]


def test_prefill_is_sent_as_the_final_assistant_turn(engine, fake: FakeAnthropic) -> None:
    [resp] = engine.generate([req("p", prefill="<SCRATCHPAD_REASONING>")])
    assert fake.bodies[-1]["messages"][-1] == {"role": "assistant", "content": "<SCRATCHPAD_REASONING>"}
    assert resp.text == " continued after the prefill"  # only the continuation
    with pytest.raises(EngineError, match="whitespace"):
        engine.generate([req("q", prefill="<SCRATCHPAD_REASONING>\n")])


def test_429_529_500_and_dropped_connections_are_retried(engine, fake: FakeAnthropic) -> None:
    fake.faults.queue[:] = ["429:1", "529", "500", "drop"]
    [resp] = engine.generate([req("r", "retry me")])
    assert resp.text == "answer to: retry me"
    assert resp.meta["retries"] == 4 and resp.meta["waits"][0] == 1.0  # Retry-After honoured
    assert fake.faults.received == 5 and len(fake.bodies) == 1


def test_rerun_is_served_from_the_cache(engine, fake: FakeAnthropic, tmp_path: Path, monkeypatch) -> None:
    reqs = [req(str(i), f"q{i}") for i in range(6)]
    first = engine.generate(reqs)
    before = fake.faults.received
    again = create_engine("anthropic", model="claude-test", base_url=fake.url, api_key_env="TEST_ANTHROPIC_KEY",
                          cache_dir=str(tmp_path / "cache"))
    second = again.generate(reqs)
    again.close()
    assert fake.faults.received == before  # not one request reached the server
    assert all(r.cached for r in second) and [r.texts for r in first] == [r.texts for r in second]


def test_n_samples_are_separate_calls(engine, fake: FakeAnthropic) -> None:
    counter = iter(range(100))
    fake.reply = lambda body: f"vote {next(counter)}"
    [resp] = engine.generate([req("n", n=3, temperature=1.0, seed=1)])
    assert sorted(resp.texts) == ["vote 0", "vote 1", "vote 2"] and len(fake.bodies) == 3
    assert all("n" not in b and "seed" not in b for b in fake.bodies)


def test_bad_key_is_fatal_and_never_printed(fake: FakeAnthropic, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WRONG_KEY", "sk-ant-wrong-999999")
    eng = create_engine("anthropic", model="m", base_url=fake.url, api_key_env="WRONG_KEY", cache=False)
    with pytest.raises(EngineError, match="401") as err:
        eng.generate([req("k")])
    assert "999999" not in str(err.value) and "999999" not in repr(eng)
    eng.close()


def test_exhausted_retries_do_not_leak_the_key(engine, fake: FakeAnthropic) -> None:
    fake.faults.queue[:] = ["500-echo"] * 5
    with pytest.raises(EngineError, match="gave up after 5 attempts") as err:
        engine.generate([req("x", "never")])
    assert KEY not in str(err.value) and "[redacted]" in str(err.value)


def test_missing_key_is_a_clear_error(monkeypatch, fake: FakeAnthropic) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(EngineError, match="ANTHROPIC_API_KEY"):
        create_engine("anthropic", model="m", base_url=fake.url, cache=False)
