"""Small HTTP servers for engine tests, each a real threaded server on a free loopback port.

* ``FaultProxy`` sits in front of a real OpenAI-compatible server: it forwards requests, and on demand answers
  429 (with Retry-After), 500 (optionally echoing the request's Authorization header, to test redaction) or
  drops the connection without a reply; it can rewrite the server's answers (judge tests) and counts what it
  received and what reached the server.
* ``FakeAnthropic`` is a stand-in for the Anthropic Messages API (no real one is reachable from here): it checks
  the headers and body the SDK sends and answers deterministically, with the same fault injection.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Rewrite = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Faults:
    """A queue of faults consumed one per request: "429:SECONDS", "500", "500-echo", "drop"."""

    def __init__(self) -> None:
        self.queue: list[str] = []
        self.received = 0
        self.lock = threading.Lock()

    def next(self) -> str | None:
        with self.lock:
            self.received += 1
            return self.queue.pop(0) if self.queue else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: Any

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _fault(self) -> bool:
        """Apply the next fault, if any; True if the request was answered (or dropped) here."""
        fault = self.owner.faults.next()
        if fault is None:
            return False
        if fault.startswith("429"):
            self._reply(429, {"error": {"message": "rate limited", "type": "rate_limit_error"}},
                        {"retry-after": fault.split(":")[1]})
        elif fault == "500":
            self._reply(500, {"error": {"message": "internal error", "type": "server_error"}})
        elif fault == "500-echo":
            self._reply(500, {"error": {"message": f"failed for {self.headers.get('authorization')} "
                                                   f"{self.headers.get('x-api-key')}"}})
        elif fault == "529":
            self._reply(529, {"type": "error", "error": {"type": "overloaded_error", "message": "overloaded"}})
        elif fault == "drop":
            # Close the socket without a reply: the client sees a dropped connection.
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise ValueError(f"unknown fault {fault!r}")
        return True

    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("content-length") or 0)
        return json.loads(self.rfile.read(length) or b"{}")


class _Running:
    def __init__(self, handler: type[_Handler]):
        self.faults = _Faults()
        handler.owner = self
        self.server = _Server(("127.0.0.1", 0), handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class FaultProxy(_Running):
    """Forwards ``/v1/...`` to ``upstream`` (e.g. ``http://127.0.0.1:8000``)."""

    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.rewrite: Rewrite | None = None
        self.bodies: list[dict[str, Any]] = []  # request bodies that reached the upstream
        self.headers: list[dict[str, str]] = []
        owner = self

        class Handler(_Handler):
            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                if self._fault():
                    return
                with owner.faults.lock:
                    owner.bodies.append(body)
                    owner.headers.append({k.lower(): v for k, v in self.headers.items()})
                req = urllib.request.Request(owner.upstream + self.path, data=json.dumps(body).encode(),
                                             headers={"content-type": "application/json"}, method="POST")
                try:
                    with urllib.request.urlopen(req, timeout=300) as r:
                        status, payload = r.status, json.loads(r.read())
                except urllib.error.HTTPError as e:
                    status, payload = e.code, e.read()
                if status == 200 and owner.rewrite is not None:
                    payload = owner.rewrite(body, payload)
                self._reply(status, payload)

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}/v1"

    @property
    def forwarded(self) -> int:
        return len(self.bodies)


class FakeAnthropic(_Running):
    """``POST /v1/messages``: checks the key (``x-api-key`` or bearer) and ``anthropic-version``; answers ``reply(body)`` (default:
    a deterministic text naming the last user message, continuing a prefill if the last turn is the
    assistant's). ``max_tokens`` below 5 gives ``stop_reason: max_tokens``."""

    def __init__(self, api_key: str):
        self.api_key = api_key
        self.bodies: list[dict[str, Any]] = []
        self.reply: Callable[[dict[str, Any]], str] | None = None
        owner = self

        class Handler(_Handler):
            def do_POST(self) -> None:  # noqa: N802
                body = self._body()
                if self.path != "/v1/messages":
                    self._reply(404, {"type": "error", "error": {"type": "not_found_error", "message": self.path}})
                    return
                # The SDK sends the key as x-api-key or, in recent versions, as a bearer token.
                sent = self.headers.get("x-api-key") or (self.headers.get("authorization") or "").removeprefix(
                    "Bearer ")
                if sent != owner.api_key:
                    self._reply(401, {"type": "error", "error": {"type": "authentication_error",
                                                                 "message": "invalid x-api-key"}})
                    return
                if not self.headers.get("anthropic-version"):
                    self._reply(400, {"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "anthropic-version header required"}})
                    return
                if self._fault():
                    return
                with owner.faults.lock:
                    owner.bodies.append(body)
                messages = body["messages"]
                if owner.reply is not None:
                    text = owner.reply(body)
                elif messages[-1]["role"] == "assistant":
                    text = " continued after the prefill"
                else:
                    text = f"answer to: {messages[-1]['content']}"
                stop = "max_tokens" if body["max_tokens"] < 5 else "end_turn"
                self._reply(200, {
                    "id": "msg_test", "type": "message", "role": "assistant", "model": body["model"],
                    "content": [{"type": "text", "text": text}], "stop_reason": stop, "stop_sequence": None,
                    "usage": {"input_tokens": 11, "output_tokens": 7},
                })

        super().__init__(Handler)
        self.url = f"http://127.0.0.1:{self.port}"
