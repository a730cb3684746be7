"""safeclip-serve with continuous batching (``--max-batch``, runtime/serve/batching.py): concurrent clients
decode together and each gets its solo answer, the waiting list is bounded (503 + Retry-After), /health shows
running and waiting sequences, a client that leaves frees its slot without disturbing the others, a refused
image never takes a slot, and the KV memory is checked at start. Oracle: a second, unbatched Pipeline.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from safeclip.runtime.serve.batching import check_kv_memory, slots_that_fit  # noqa: E402
from safeclip.runtime.serve.cli import default_max_batch  # noqa: E402
from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import (Q, ServerThread, client, data_uri, health, pieces, raw, read_until,  # noqa: E402
                            start_raw, user, wait_until)

QUESTIONS = ["Hi", "What is in the picture?", "Tell me a story about a red bicycle", "Why?", "Name a colour",
             "What is the capital of the moon, and why is it there?"]


def _slow(pipe, delay_s: float):
    """Each batched step takes at least ``delay_s`` (so batches can be observed on the tiny model)."""
    dec = pipe.scheduler.dec
    step = dec.decode

    def slow(x):
        time.sleep(delay_s)
        return step(x)

    dec.decode = slow


def test_concurrent_clients_decode_together_and_each_gets_its_solo_answer(bundle, oracle, test_images):
    pipe = Pipeline.load(bundle)
    srv = ServerThread(create_app(pipe, max_batch=3, max_queue=8, max_tokens=64))
    kinds = [(q, None) for q in QUESTIONS] + [(Q, "blue.jpg"), (Q, "red.png")]
    want = {k: oracle.generate(None if k[1] is None else test_images / k[1], k[0], max_new_tokens=24)
            for k in kinds}
    _slow(pipe, 0.05)                                  # each answer ~1.2 s: the 8 requests overlap
    seen = []

    def one(i):
        q, img = kinds[i]
        body = {"messages": user(q, img and data_uri(test_images / img)), "max_tokens": 24,
                "model": pipe.manifest.name}
        if i % 2:
            return "".join(pieces(client(srv.url).chat.completions.create(stream=True, **body)))
        return client(srv.url).chat.completions.create(**body).choices[0].message.content

    with srv:
        watch = threading.Event()

        def poll():
            while not watch.is_set():
                seen.append(health(srv.url))
                time.sleep(0.01)

        t = threading.Thread(target=poll)
        t.start()
        try:
            with ThreadPoolExecutor(len(kinds)) as pool:
                texts = list(pool.map(one, range(len(kinds)), timeout=120))
        finally:
            watch.set()
            t.join()
        for k, text in zip(kinds, texts):
            assert text == want[k].text, k
        assert max(h["running"] for h in seen) == 3 and max(h["waiting"] for h in seen) >= 1
        h = health(srv.url)
        assert (h["running"], h["waiting"], h["max_batch"]) == (0, 0, 3)
        assert pipe.scheduler.stats()["mean_batch"] > 1.5


def test_full_waiting_list_is_503_with_retry_after_and_a_leaving_client_frees_its_slot(bundle, oracle):
    pipe = Pipeline.load(bundle)
    srv = ServerThread(create_app(pipe, max_batch=2, max_queue=1, max_tokens=400))
    ref = oracle.generate(None, "Hi", max_new_tokens=40).text
    _slow(pipe, 0.05)
    long = {"messages": user("Hi"), "max_tokens": 300, "stream": True}
    with srv, ThreadPoolExecutor(2) as pool:
        a = start_raw(srv.port, long)
        read_until(a, b'"delta":{"content"')
        keep = pool.submit(lambda: "".join(pieces(client(srv.url).chat.completions.create(
            model=pipe.manifest.name, messages=user("Hi"), max_tokens=40, stream=True))))
        wait_until(lambda: health(srv.url)["running"] == 2)
        b = start_raw(srv.port, long)                                            # waits: both slots taken
        wait_until(lambda: health(srv.url)["waiting"] == 1)
        status, headers, err = raw(srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi")})
        assert status == 503 and int(headers["retry-after"]) >= 1 and err["error"]["code"] == "server_busy"
        a.close()                                                                # leaves mid-answer
        wait_until(lambda: health(srv.url)["waiting"] == 0, 5)                  # b took a's slot at once
        read_until(b, b'"delta":{"content"')
        assert keep.result(timeout=60) == ref                                   # undisturbed
        b.close()
        wait_until(lambda: health(srv.url)["running"] == 0, 5)
        r = raw(srv.url, "POST", "/v1/chat/completions", {"messages": user("Hi"), "max_tokens": 3})
        assert r[0] == 200 and r[2]["usage"]["completion_tokens"] == 3


def test_refused_image_never_takes_a_slot(bundle, test_images):
    pipe = Pipeline.load(bundle)
    with ServerThread(create_app(pipe, max_batch=2, policy="refuse")) as srv:
        status, _, body = raw(srv.url, "POST", "/v1/chat/completions",
                              {"messages": user(Q, data_uri(test_images / "red.png"))})
        assert status == 200 and body["safeclip"]["action"] == "refused"
        assert pipe.scheduler.steps == 0 and pipe.scheduler.stats()["running"] == 0


def test_kv_memory_is_checked_at_start(bundle):
    pipe = Pipeline.load(bundle, context=256)
    per = check_kv_memory(pipe, 1, available=1 << 40) // 2                    # one slot + the prefill scratch
    msg = r"--max-batch 8 x --context 256 needs [\d.]+ MiB of KV cache .*\(at most 2 fit\)"
    with pytest.raises(ValueError, match=msg):
        check_kv_memory(pipe, 8, available=3 * per + per // 2)
    assert slots_that_fit(pipe, available=3 * per + per // 2) == 2
    assert default_max_batch(pipe, None) == min(4, slots_that_fit(pipe)) and default_max_batch(pipe, 7) == 7
    r = subprocess.run([sys.executable, "-m", "safeclip.runtime.serve.cli", "--bundle", str(bundle),
                        "--max-batch", "100000000", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "needs" in r.stderr and "MiB are available; lower --max-batch" in r.stderr
    r = subprocess.run([sys.executable, "-m", "safeclip.runtime.serve.cli", "--bundle", str(bundle),
                        "--max-batch", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-batch must be at least 1" in r.stderr


# -- on the TensorRT backend (the stand-in, tests/_fake_trt.py) ------------------------------------------------
@pytest.fixture
def trt_pipe(demo_bundle_traced, monkeypatch, tmp_path):
    """The demo pipeline with its decoder on a TensorRT stand-in plan (the jetson target's profiles: batched
    steps of up to 4, or of ``max_batch``); the vision graph stays on ONNX Runtime. The traced decoder (KV form
    "new", standard operators): what a TensorRT target's bundle holds (the cpu target's fused graph is not)."""
    from _fake_trt import install_fakes, write_plan
    from safeclip.export.bundle import build_plan
    from safeclip.export.targets import TARGETS
    from safeclip.runtime.backends.trt import TrtDecoder

    _, rt = install_fakes(monkeypatch, "10.3.0.30")

    def make(max_batch=None, capacity=256):
        pipe = Pipeline.load(demo_bundle_traced, context=capacity)
        m, kv = pipe.manifest, pipe.language_model.decoder.kv
        profiles = build_plan(TARGETS["jetson"], m.graphs, m.model, max_batch=max_batch)["decoder"]["profiles"]
        plan = write_plan(m.path("decoder.onnx"), tmp_path / f"decoder-{max_batch}.plan", profiles)
        pipe.language_model.decoder = TrtDecoder(plan, kv, capacity=capacity)
        pipe.backend = "tensorrt"
        return pipe

    make.rt = rt
    return make


def test_the_server_batches_on_tensorrt_and_each_client_gets_its_solo_answer(trt_pipe, demo_bundle_traced):
    from safeclip.runtime.backends.trt import TrtSlotDecoder

    oracle = Pipeline.load(demo_bundle_traced)                   # the same graph alone, on ONNX Runtime
    pipe = trt_pipe()
    srv = ServerThread(create_app(pipe, max_batch=3, max_queue=8, max_tokens=64))
    assert isinstance(pipe.scheduler.dec, TrtSlotDecoder)
    want = {q: oracle.generate(None, q, max_new_tokens=20).text for q in QUESTIONS}
    _slow(pipe, 0.05)
    with srv:
        def one(q):
            body = {"messages": user(q, None), "max_tokens": 20, "model": pipe.manifest.name}
            return client(srv.url).chat.completions.create(**body).choices[0].message.content

        with ThreadPoolExecutor(len(QUESTIONS)) as pool:
            texts = list(pool.map(one, QUESTIONS, timeout=120))
        assert dict(zip(QUESTIONS, texts)) == want
        h = health(srv.url)
        assert (h["running"], h["waiting"], h["max_batch"]) == (0, 0, 3)
        assert pipe.scheduler.stats()["mean_batch"] > 1.5


def test_tensorrt_defaults_follow_the_target_the_engine_and_the_device_memory(trt_pipe):
    from types import SimpleNamespace

    from safeclip.runtime.backends.slots import kv_slot_bytes

    def as_target(pipe, name):
        return SimpleNamespace(manifest=SimpleNamespace(target=name), has_language_model=True,
                               language_model=pipe.language_model)

    wide, narrow = trt_pipe(16), trt_pipe(2)
    assert default_max_batch(as_target(wide, "datacenter"), None) == 8       # datacenter default
    assert default_max_batch(as_target(narrow, "datacenter"), None) == 2     # at most what the engine batches
    assert default_max_batch(as_target(wide, "jetson"), None) == 1           # a kiosk: one at a time
    per = kv_slot_bytes(wide.language_model.decoder.kv, 256)
    free = wide.language_model.decoder.cuda.mem_info()[0]                               # the device's, not MemAvailable
    assert slots_that_fit(wide) == free // per - 1
    with pytest.raises(Exception, match="profiles batch at most 2 sequences per decode step, not 3"):
        create_app(narrow, max_batch=3)


def test_a_stateless_client_reuses_the_prefix_cache_under_batching(bundle, test_images):
    """The re-sent history of a conversation is restored from the prefix cache into the request's KV slot; the
    answers equal an unbatched server's without a cache. Another client decodes in the same batch meanwhile."""
    from test_serve_chat import SYSTEM, TURNS, user_msg

    batched = ServerThread(create_app(Pipeline.load(bundle), max_batch=2, default_max_tokens=8, max_tokens=64))
    cold = ServerThread(create_app(Pipeline.load(bundle), default_max_tokens=8, max_tokens=64, prefix_cache_mb=0))
    with batched, cold:
        cb, cc = client(batched.url), client(cold.url)
        model = cb.models.list().data[0].id
        messages, prev = [{"role": "system", "content": SYSTEM}], 0
        with ThreadPoolExecutor(2) as pool:
            for i, (text, image) in enumerate(TURNS):
                messages.append(user_msg(text, image, test_images))
                side = pool.submit(lambda: cb.chat.completions.create(model=model, max_tokens=12,
                                                                      messages=[{"role": "user", "content": "Hi"}]))
                r = cb.chat.completions.create(model=model, messages=messages, max_tokens=8)
                ref = cc.chat.completions.create(model=model, messages=messages, max_tokens=8)
                side.result(timeout=60)
                got, cached = r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens
                assert got == ref.choices[0].message.content and r.usage.prompt_tokens == ref.usage.prompt_tokens
                # turn 0 shares only the template's first tokens with the other client's snapshotted "Hi"
                assert cached < 8 if i == 0 else cached >= prev, (i, cached, prev)
                messages.append({"role": "assistant", "content": got})
                prev = r.usage.prompt_tokens
        h = health(batched.url)
        assert h["prefix_cache"]["hits"] >= 2 and h["max_batch"] == 2
