"""safeclip-serve under pressure: one request at a time, the bounded queue (full, timeout, leaving the line),
clients that leave mid-answer (plain and streamed), and a bounded load test of 50 concurrent clients on a
loopback server. Generation is slowed per text piece (``SlowPipeline``) so queueing can be observed; gate and
answers stay the real pipeline's, checked against a second Pipeline on the same bundle.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import (Q, ServerThread, SlowPipeline, client, data_uri, health,  # noqa: E402
                            pieces, raw, read_until, start_raw, user, wait_until)


LONG = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 300}    # ~150 pieces, no EOS (checked)


@pytest.fixture(scope="module")
def long_ok(oracle):
    a = oracle.generate(None, "Hi", max_new_tokens=300)
    assert a.finish_reason == "length" and len(list(oracle.stream(None, "Hi", max_new_tokens=300))) > 100


def slow_server(bundle, delay_s: float, **kw):
    slow = SlowPipeline(Pipeline.load(bundle), delay_s)
    return slow, ServerThread(create_app(slow, max_tokens=400, default_max_tokens=4, **kw))


@pytest.mark.parametrize("stream", [True, False])
def test_client_leaving_mid_generation_frees_the_slot(bundle, long_ok, stream):
    slow, srv = slow_server(bundle, 0.05)                 # the whole answer would take ~7.5 s
    with srv:
        s = start_raw(srv.port, {**LONG, "stream": stream})
        if stream:
            read_until(s, b'"delta":{"content"')          # text is flowing
        else:
            wait_until(lambda: slow.started == 1)
            time.sleep(0.2)
        assert health(srv.url)["busy"] is True
        s.close()
        assert wait_until(lambda: not health(srv.url)["busy"], 5) < 2.0
        wait_until(lambda: slow.closed == slow.started == 1)        # the generator was closed, not drained
        assert not slow._pipe.language_model.lock.locked()
        r = raw(srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 3})
        assert r[0] == 200 and r[2]["usage"]["completion_tokens"] == 3


def test_queue_full_timeout_and_leaving_the_line(bundle, long_ok):
    slow, srv = slow_server(bundle, 0.05, max_queue=1, queue_timeout_s=1.5)
    with srv, ThreadPoolExecutor(4) as pool:
        a = start_raw(srv.port, {**LONG, "stream": True})
        read_until(a, b'"delta":{"content"')
        b = start_raw(srv.port, {"messages": user("Hi"), "max_tokens": 2})     # waits in line
        wait_until(lambda: health(srv.url)["queued"] == 1)
        status, headers, err = raw(srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi")})
        assert status == 503 and int(headers["retry-after"]) >= 1 and err["error"]["code"] == "server_busy"
        b.close()                                                              # leaves the line
        wait_until(lambda: health(srv.url)["queued"] == 0, 5)
        t0 = time.monotonic()
        status, headers, err = raw(srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi")})
        assert status == 503 and "waited" in err["error"]["message"] and 1.4 < time.monotonic() - t0 < 5
        c = pool.submit(raw, srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2})
        wait_until(lambda: health(srv.url)["queued"] == 1)
        a.close()                                                              # the slot passes to c
        status, _, body = c.result(timeout=10)
        assert status == 200 and body["usage"]["completion_tokens"] == 2
    assert slow.max_active == 1 and slow.started == 2


def test_fifty_concurrent_clients(bundle, oracle, test_images, long_ok):
    """Bounded load: 50 clients at once (text/image/multi-turn, plain/streamed); each is answered correctly or refused
    with 503 + Retry-After, the model never runs two at once, and the server is healthy after."""
    slow, srv = slow_server(bundle, 0.01, max_queue=8)
    kinds = [(None, False), (None, True), ("red.png", False), ("blue.jpg", True), ("multi", False), ("multi", True)]
    want = {k: oracle.generate(None if k[0] is None else str(test_images / k[0]), Q, max_new_tokens=6).text
            for k in kinds if k[0] != "multi"}
    # a multi-turn conversation: system prompt, an image in the first turn, a text follow-up
    first = want[("blue.jpg", True)]
    multi = [{"role": "system", "content": "Be brief."}, *user(Q, data_uri(test_images / "blue.jpg")),
             {"role": "assistant", "content": first}, *user("And its colour?")]
    chat = oracle.chat(system="Be brief.")
    chat.set_history([(Q, [(test_images / "blue.jpg").read_bytes()], first)])
    want[("multi", False)] = want[("multi", True)] = "".join(chat.ask("And its colour?", max_new_tokens=6))

    def one(i: int):
        img, stream = kinds[i % len(kinds)]
        messages = multi if img == "multi" else user(Q, img and data_uri(test_images / img))
        body = {"messages": messages, "max_tokens": 6, "stream": stream}
        if not stream:
            status, headers, data = raw(srv.url, "POST", "/v1/chat/completions", body, timeout=60)
            return status, headers, data and (data["choices"][0]["message"]["content"] if status == 200 else data)
        try:
            text = "".join(pieces(client(srv.url).chat.completions.create(model=oracle.manifest.name, **body)))
            return 200, {}, text
        except openai.APIStatusError as e:
            return e.status_code, {k.lower(): v for k, v in e.response.headers.items()}, e.response.json()

    with srv:
        t0 = time.monotonic()
        with ThreadPoolExecutor(50) as pool:
            results = list(pool.map(one, range(50), timeout=90))
        elapsed = time.monotonic() - t0
        ok = [i for i, r in enumerate(results) if r[0] == 200]
        busy = [r for r in results if r[0] == 503]
        assert len(ok) + len(busy) == 50, [r[0] for r in results]
        assert len(ok) >= 9                                       # the first 1 + max_queue were always let in
        for i in ok:
            assert results[i][2] == want[kinds[i % len(kinds)]], i
        for _, headers, err in busy:
            assert int(headers["retry-after"]) >= 1 and err["error"]["code"] == "server_busy"
        h = {k: v for k, v in health(srv.url).items() if k != "prefix_cache"}
        assert h == {"status": "ok", "model": oracle.manifest.name, "busy": False, "queued": 0, "max_queue": 8,
                     "running": 0, "waiting": 0, "max_batch": 1}
        assert slow.max_active == 1 and slow.started == slow.closed == len(ok)
        assert raw(srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 2})[0] == 200
    assert elapsed < 60
