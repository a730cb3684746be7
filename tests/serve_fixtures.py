"""Helpers for the server tests (test_serve.py, test_kiosk.py): a controlled demo bundle with a decoder, a
uvicorn server on a free loopback port in a thread, and a pipeline wrapper that slows generation down.

The bundle is exported once per test session (module-level cache) whichever test file asks first: red
images score 'gun' (flagged), blue images 'neutral' (clean), through descriptor embeddings made to point at
them (``conftest.controlled_text_embeds``).
"""
from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from pathlib import Path

Q = "What is in the picture?"


def data_uri(path: Path | bytes, mime: str = "image/png") -> str:
    raw = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


class ServerThread:
    """``with ServerThread(app) as s: s.url`` — uvicorn on 127.0.0.1:<free port>, stopped on exit."""

    def __init__(self, app, production: dict | None = None, **config):
        """``production``: run the CLI's server (``server.make_server(app, **production)``) instead of plain
        uvicorn."""
        import uvicorn

        self.sock = free_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        if production is not None:
            from safeclip.runtime.serve.server import make_server
            self.server = make_server(app, log_level="warning", **production, **config)
        else:
            self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_keep_alive=5, **config))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()
        assert not self.thread.is_alive(), "the test server did not stop"


class SlowPipeline:
    """The real pipeline, with a pause before each text piece (and a record of concurrent generations), so
    queueing and disconnects can be observed with a model that is otherwise done in milliseconds."""

    def __init__(self, pipe, delay_s: float):
        self._pipe, self.delay_s = pipe, delay_s
        self.active = self.max_active = self.started = self.closed = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def stream(self, *args, **kw):
        return self._slowed(self._pipe.stream(*args, **kw))

    def chat(self, *args, **kw):
        """A conversation on the real pipeline whose turns are slowed like :meth:`stream` (the server's path)."""
        inner_chat, outer = self._pipe.chat(*args, **kw), self

        class _Chat:
            def __getattr__(self, name):
                return getattr(inner_chat, name)

            def ask(self, *a, **k):
                return outer._slowed(inner_chat.ask(*a, **k))
        return _Chat()

    def _slowed(self, inner):
        outer = self

        class _Stream:
            verdict, policy, action = inner.verdict, inner.policy, inner.action
            verdicts = getattr(inner, "verdicts", ())

            def __iter__(self):
                with outer._lock:
                    outer.active += 1
                    outer.started += 1
                    outer.max_active = max(outer.max_active, outer.active)
                try:
                    for piece in inner:
                        time.sleep(outer.delay_s)
                        yield piece
                finally:
                    with outer._lock:
                        outer.active -= 1
                        outer.closed += 1

            @property
            def result(self):
                return inner.result

        return _Stream()


# -- clients -----------------------------------------------------------------------------------------------
def client(url: str, key: str = "unused"):
    return __import__("openai").OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=30)


def user(text: str, image: str | None = None) -> list[dict]:
    content = [{"type": "text", "text": text}]
    if image:
        content.append({"type": "image_url", "image_url": {"url": image}})
    return [{"role": "user", "content": content}]


def pieces(chunks) -> list[str]:
    """The text pieces of a streamed completion, in order."""
    return [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]


def raw(url: str, method: str, path: str, body=b"", headers: dict | None = None, timeout: float = 30):
    """(status, headers, parsed JSON or None) over plain http.client."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    h = {"Content-Type": "application/json"} if headers is None else headers
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    conn.request(method, path, body=body, headers=h, encode_chunked=not isinstance(body, (bytes, str)))
    r = conn.getresponse()
    data = r.read()
    conn.close()
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    return r.status, {k.lower(): v for k, v in r.getheaders()}, parsed


def health(url: str) -> dict:
    return raw(url, "GET", "/health", headers={})[2]


def start_raw(port: int, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return s


def drip(socks: list, stop: threading.Event, byte: bytes = b"a") -> None:
    """Send ``byte`` on every socket of ``socks`` once a second until ``stop`` (a slow client), in a thread."""
    def run():
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.sendall(byte)
                except OSError:
                    pass
    threading.Thread(target=run, daemon=True).start()


def read_until(s: socket.socket, marker: bytes) -> bytes:
    buf = b""
    while marker not in buf:
        got = s.recv(65536)
        assert got, f"connection closed before {marker!r}: {buf[-300:]!r}"
        buf += got
    return buf


def wait_until(cond, timeout: float = 10.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached in time"
        time.sleep(0.02)
    return time.monotonic() - t0


# -- shared fixtures (imported by the test_serve*.py modules) ---------------------------------------------
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bundle(controlled_bundle):
    """The controlled demo bundle (red flagged 'gun', blue clean) every server test serves."""
    return controlled_bundle


@pytest.fixture(scope="module")
def oracle(bundle):
    """A second pipeline on the same bundle: greedy answers equal the server's token for token."""
    from safeclip.runtime.pipeline import Pipeline
    return Pipeline.load(bundle)
