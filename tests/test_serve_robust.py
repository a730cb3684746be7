"""safeclip-serve under hostile or unlucky conditions, all on loopback: slow-header connections (slowloris)
against the CLI process, the request limit in OpenAI's error shape, graceful shutdown (queued requests 503,
the running stream cut at the deadline with an error event the ``openai`` client raises as ``APIError``, no
traceback), and the CLI stopping on SIGTERM while slow connections are open.

Figures (printed with ``-s``): the slowest /health, page and API answers while 70 connections each send one
header byte per second; the time from SIGTERM to the queued 503s and to the cut stream.
"""
from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle  # noqa: E402,F401 (fixtures)
from serve_fixtures import (Q, ServerThread, SlowPipeline, client, drip, health, raw, start_raw, user,  # noqa: E402
                            wait_until)

ATTACKERS = 70


def _slowloris(port: int, n: int, stop: threading.Event) -> list[socket.socket]:
    """``n`` connections that send a request line and then one header byte per second, until ``stop``."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    drip(socks, stop)
    return socks


def _timed(fn) -> tuple[float, object]:
    t0 = time.monotonic()
    out = fn()
    return time.monotonic() - t0, out


def test_slowloris_against_the_cli_then_sigterm(bundle):
    p = subprocess.Popen([sys.executable, "-m", "safeclip.runtime.serve.cli", "--bundle", str(bundle), "--port", "0",
                          "--default-max-tokens", "3", "--header-timeout", "4", "--log-level", "warning"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    stop = threading.Event()
    socks = []
    try:
        line = p.stderr.readline()
        url = line.split(" on ")[1].split("/ ")[0]
        port = int(url.rsplit(":", 1)[1])
        t_attack = time.monotonic()
        socks = _slowloris(port, ATTACKERS, stop)
        time.sleep(1.5)                                     # every attacker connected and dripping
        worst = {}
        for _ in range(3):
            for name, call in (("health", lambda: raw(url, "GET", "/health", headers={}, timeout=2)),
                               ("page", lambda: raw(url, "GET", "/", headers={}, timeout=2)),
                               ("api", lambda: raw(url, "POST", "/v1/chat/completions", {"messages": user(Q)},
                                                  timeout=2))):
                took, (status, _, _) = _timed(call)
                assert status == 200, name
                worst[name] = max(worst.get(name, 0.0), took)
        assert max(worst.values()) < 2.0, worst
        # the attackers are cut at the header deadline (4 s after they connected) with a 408
        for s in socks:
            s.settimeout(6)
            reply = s.recv(4096)
            assert reply.startswith(b"HTTP/1.1 408") and b'"request_timeout"' in reply, reply[:80]
        print(f"\nslowloris: {ATTACKERS} connections; slowest answers {worst}; all attackers cut with "
              f"a 408 within {time.monotonic() - t_attack:.1f} s of the first connecting (header timeout 4 s)")
        socks2 = _slowloris(port, 10, stop)                # SIGTERM while slow connections are open
        time.sleep(0.3)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=20)
        log = p.stderr.read()
        print(f"SIGTERM with 10 slow connections open: exit {rc} after {time.monotonic() - t0:.2f} s")
        # uvicorn stops gracefully, then re-raises the signal: the parent sees "terminated by SIGTERM"
        # (errors are logged as "safeclip-serve: error: ...": server.log_line)
        assert rc == -signal.SIGTERM and "Traceback" not in log and "safeclip-serve: error" not in log, log
        assert time.monotonic() - t0 < 5
        for s in socks2:
            s.close()
    finally:
        stop.set()
        for s in socks:
            s.close()
        if p.poll() is None:
            p.kill()
        p.stderr.close()


def test_request_limit_answers_in_openai_shape(bundle):
    slow = SlowPipeline(Pipeline.load(bundle), 0.2)
    with ServerThread(create_app(slow, default_max_tokens=10), production={"max_requests": 1}) as s:
        hold = start_raw(s.port, {"messages": user(Q), "max_tokens": 10, "stream": True})
        wait_until(lambda: slow.active == 1)
        status, headers, err = raw(s.url, "POST", "/v1/chat/completions", {"messages": user(Q)})
        assert status == 503 and headers["retry-after"] == "1" and headers["content-type"] == "application/json"
        assert err["error"]["code"] == "too_many_connections" and err["error"]["type"] == "service_unavailable"
        hold.close()
        wait_until(lambda: slow.active == 0)
        wait_until(lambda: raw(s.url, "GET", "/health", headers={})[0] == 200)


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.bad = []

    def emit(self, record):
        if record.levelno >= logging.ERROR or record.exc_info:
            self.bad.append(self.format(record))


def test_graceful_shutdown(bundle):
    slow = SlowPipeline(Pipeline.load(bundle), 0.25)
    app = create_app(slow, default_max_tokens=60, max_tokens=60)
    s = ServerThread(app, production={"shutdown_deadline_s": 1.5}).__enter__()
    records = _Records()
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "safeclip.serve", "asyncio")]
    for lg in loggers:
        lg.addHandler(records)
    try:
        caught, chunks = [], []

        def streamer():
            try:
                for ch in client(s.url).chat.completions.create(model=app.state.safeclip.model_id,
                                                                messages=user(Q), max_tokens=60, stream=True):
                    chunks.append(ch)
            except Exception as e:                        # noqa: BLE001 - the type is what the test checks
                caught.append((e, time.monotonic()))

        t = threading.Thread(target=streamer)
        t.start()
        wait_until(lambda: len(chunks) >= 2)
        queued = [start_raw(s.port, {"messages": user(Q), "max_tokens": 3}) for _ in range(2)]
        wait_until(lambda: health(s.url)["queued"] == 2)
        t0 = time.monotonic()
        s.server.handle_exit(signal.SIGTERM, None)           # what uvicorn's SIGTERM handler calls
        replies = []
        for q in queued:
            buf = b""
            while b"\r\n\r\n" not in buf or not buf.rstrip().endswith(b"}"):
                got = q.recv(65536)
                if not got:
                    break
                buf += got
            replies.append((buf, time.monotonic() - t0))
            q.close()
        for buf, _ in replies:
            head, _, body = buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503") and b"retry-after: 5" in head.lower(), head
            assert json.loads(body)["error"]["code"] == "server_shutting_down"
        t.join(timeout=20)
        assert caught, "the stream was not cut"
        err, when = caught[0]
        assert isinstance(err, openai.APIError) and not isinstance(err, openai.APIConnectionError), repr(err)
        assert "shut down" in str(err) and err.body["code"] == "server_shutting_down"
        assert len(chunks) < 60 and 1.3 < when - t0 < 4.0, when - t0
        s.thread.join(timeout=20)
        assert not s.thread.is_alive()
        print(f"\nshutdown: queued 503s after {max(w for _, w in replies):.2f} s, stream cut after "
              f"{when - t0:.2f} s (deadline 1.5 s), {len(chunks)} chunks before; server stopped")
        assert records.bad == [], records.bad
    finally:
        for lg in loggers:
            lg.removeHandler(records)
        s.__exit__(None, None, None)
