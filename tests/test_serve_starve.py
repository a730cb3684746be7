"""A server slow clients cannot starve (issue 23 §3), all on loopback: 64 uploads at 1 byte/s and 320 idle
connections at once leave /health, the page and the API answering 200 (before: 503 for as long as they kept
it up); the slow uploads are cut for their rate; Host/Origin are checked against DNS rebinding; the memory
64 concurrent 14.7 MB bodies leave resident is bounded (figures printed with ``-s``). The remote-image filter's
own tests are in test_fetch.py.
"""
from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the [serve] extra (fastapi, uvicorn)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle  # noqa: E402,F401 (fixtures)
from serve_fixtures import Q, ServerThread, drip, raw, user  # noqa: E402

SLOW_UPLOADS, IDLE = 64, 320


def _connect(port: int, n: int, first: bytes) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if first:
            s.sendall(first)
        socks.append(s)
    return socks


def test_slow_uploads_and_idle_connections_do_not_starve_health_page_or_api(bundle):
    app = create_app(Pipeline.load(bundle), default_max_tokens=2)
    with ServerThread(app, production={"max_requests": 64, "header_timeout_s": 30.0}) as s:
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: 100000\r\n\r\n{")
        t0 = time.monotonic()
        uploads = _connect(s.port, SLOW_UPLOADS, head)
        idle = _connect(s.port, IDLE, b"")
        stop = threading.Event()
        drip(uploads, stop, b" ")                   # 1 byte/s on every upload
        try:
            time.sleep(0.5)
            worst, statuses = {}, []
            for i in range(3):                      # while all 384 are open (the slow ones inside their grace)
                if i == 1:                          # a round done with every upload still held, none answered
                    assert not select.select(uploads, [], [], 0)[0], "an upload was answered too early"
                for name, call in (("health", lambda: raw(s.url, "GET", "/health", headers={}, timeout=5)),
                                   ("page", lambda: raw(s.url, "GET", "/", headers={}, timeout=5)),
                                   ("api", lambda: raw(s.url, "POST", "/v1/chat/completions",
                                                       {"messages": user(Q), "max_tokens": 2}, timeout=10))):
                    t = time.monotonic()
                    status = call()[0]
                    statuses.append((name, status))
                    worst[name] = max(worst.get(name, 0.0), time.monotonic() - t)
            assert all(st == 200 for _, st in statuses), statuses
            # the uploads are cut for their rate once the grace is over, each with a 408
            cut = 0
            for u in uploads:
                u.settimeout(15)
                reply = u.recv(4096)
                cut += reply.startswith(b"HTTP/1.1 408") and b"slower than 1024 bytes/s" in reply
            assert cut == SLOW_UPLOADS
            print(f"\n{SLOW_UPLOADS} uploads at 1 byte/s + {IDLE} idle connections: slowest answers "
                  f"{ {k: round(v, 3) for k, v in worst.items()} }; uploads cut for their rate after "
                  f"{time.monotonic() - t0:.1f} s")
        finally:
            stop.set()
            for c in uploads + idle:
                c.close()


def test_idle_connections_past_the_cap_make_room_instead_of_refusing(bundle):
    app = create_app(Pipeline.load(bundle), default_max_tokens=2)
    with ServerThread(app, production={"max_requests": 2, "header_timeout_s": 30.0}) as s:   # max_open 258
        idle = _connect(s.port, 300, b"")
        try:
            time.sleep(0.5)
            for _ in range(5):
                assert raw(s.url, "GET", "/health", headers={}, timeout=5)[0] == 200
            evicted = 0
            for c in idle:
                c.settimeout(0.05)
                try:
                    evicted += c.recv(4096).startswith(b"HTTP/1.1 408")
                except OSError:
                    pass
            assert evicted >= 300 - 258              # the oldest idle ones made room, with a 408
        finally:
            for c in idle:
                c.close()


@pytest.mark.parametrize("host, origin, status, code", [
    ("evil.example:{port}", None, 403, "host_not_allowed"),        # a DNS-rebinding page's request
    ("", None, 403, "host_not_allowed"),
    ("127.0.0.1:{port}", None, 200, None), ("localhost:{port}", None, 200, None),
    ("app.localhost", None, 200, None), ("kiosk.local:8000", None, 200, None),      # --allowed-host kiosk.local
    ("127.0.0.1:{port}", "http://evil.example", 403, "origin_not_allowed"),
    ("127.0.0.1:{port}", "null", 403, "origin_not_allowed"),
    ("127.0.0.1:{port}", "http://127.0.0.1:{port}", 200, None),    # the kiosk page itself
    ("127.0.0.1:{port}", "http://localhost:3000", 200, None),
])
def test_host_and_origin_against_dns_rebinding(bundle, loopback_server, host, origin, status, code):
    s = loopback_server
    h = {"Content-Type": "application/json"}
    if host:
        h["Host"] = host.format(port=s.port)
    if origin:
        h["Origin"] = origin.format(port=s.port)
    got, _, body = _raw_host(s.port, "POST", "/v1/chat/completions", {"messages": user(Q), "max_tokens": 2}, h)
    assert got == status, body
    if code:
        assert body["error"]["code"] == code and body["error"]["type"] == "permission_error"
    if not origin:
        assert _raw_host(s.port, "GET", "/health", b"", {k: v for k, v in h.items() if k == "Host"})[0] == status


@pytest.fixture(scope="module")
def loopback_server(bundle):
    with ServerThread(create_app(Pipeline.load(bundle), default_max_tokens=2, allowed_hosts=["kiosk.local"])) as s:
        yield s


def _raw_host(port: int, method: str, path: str, body, headers: dict):
    """http.client always sends its own Host; this sends exactly ``headers``."""
    data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()),
             f"Content-Length: {len(data)}", "Connection: close"]
    with socket.create_connection(("127.0.0.1", port), timeout=15) as c:
        c.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
        buf = b""
        while chunk := c.recv(65536):
            buf += chunk
    head, _, payload = buf.partition(b"\r\n\r\n")
    try:
        parsed = json.loads(payload)
    except ValueError:
        parsed = None
    return int(head.split()[1]), head, parsed


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _body_14mb() -> bytes:
    """A 14.5 MB chat request whose 10.9 MB "image" is random bytes: parsed and base64-decoded like a real one,
    refused at the image decoder (400), so the test measures what bodies leave behind without spending a minute
    in the model (scripted with decodable 2200x1650 PNGs the figures are in the report of issue 23)."""
    data = b"GIF89a" + np.random.default_rng(0).integers(0, 256, 10_900_000, dtype=np.uint8).tobytes()
    uri = "data:image/gif;base64," + base64.b64encode(data).decode()
    return json.dumps({"messages": user(Q, uri), "max_tokens": 1}).encode()


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_memory_left_by_concurrent_large_bodies_is_bounded(bundle):
    """24 concurrent bodies, not the report's 64, to stay near 10 s on two shared cores; before the fix 24
    peaked at 1078 MiB and left 689 MiB resident (105 MiB at rest), enough to show the effect."""
    body, n = _body_14mb(), 24
    p = subprocess.Popen([sys.executable, "-m", "safeclip.runtime.serve.cli", "--bundle", str(bundle), "--port", "0",
                          "--log-level", "warning", "--threads", "1"],
                         stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        url = p.stderr.readline().split(" on ")[1].split("/ ")[0]
        port = int(url.rsplit(":", 1)[1])
        assert raw(url, "GET", "/health", headers={})[0] == 200
        before = _rss_mb(p.pid)
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        peak = [before]
        done = threading.Event()

        def watch():
            while not done.wait(0.05):
                peak[0] = max(peak[0], _rss_mb(p.pid))
        threading.Thread(target=watch, daemon=True).start()

        def one(_):
            with socket.create_connection(("127.0.0.1", port), timeout=120) as c:
                c.sendall(head + body)
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            return int(reply.split()[1]) if reply else 0

        with concurrent.futures.ThreadPoolExecutor(n) as ex:
            statuses = list(ex.map(one, range(n)))
        time.sleep(2.0)                             # the server trims its heap once idle for 1 s
        done.set()
        after = _rss_mb(p.pid)
        print(f"\n{n} concurrent {len(body) / 1e6:.1f} MB bodies: statuses {sorted(set(statuses))}; server RSS "
              f"{before:.0f} MiB before, peak {peak[0]:.0f} MiB, {after:.0f} MiB after")
        assert set(statuses) == {400}                # every one parsed, its "image" refused
        assert after - before < 100 and peak[0] - before < 450, (before, peak[0], after)
    finally:
        p.terminate()
        p.wait(20)
        p.stderr.close()
