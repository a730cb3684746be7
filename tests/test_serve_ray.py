"""safeclip-serve on Ray Serve (runtime/serve/ray_app.py): two replicas of the server's own app on a local Ray
runtime (half a CPU each, loopback), answering the openai client concurrently, plain and streamed, with the
gate's verdict and the single server's answers; then a replica killed under load: every request either
completes (with its verdict and finish reason) or raises, none is cut off silently, and Serve brings the
replica back. Oracle: a Pipeline on the same bundle (greedy decoding: equal text)."""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("ray", reason="the [ray] extra is not installed (pip install -e '.[ray]')")
pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import Q, data_uri, free_socket, pieces, user  # noqa: E402

N = 8
# answers last a while: the session's Ray workers pause before each text piece (conftest.ray_worker_hook)


def _client(url: str, retries: int = 0):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=retries, timeout=60)


def _replicas() -> list[dict]:
    import ray
    return [a for a in ray.util.list_named_actors(all_namespaces=True) if "SERVE_REPLICA" in a["name"]]


def _running(app: str = "safeclip") -> int:
    from ray import serve
    st = serve.status().applications.get(app)
    if st is None:
        return 0
    return sum(d.replica_states.get("RUNNING", 0) for d in st.deployments.values())


@pytest.fixture(scope="module")
def ray_url(ray_local, bundle):
    from ray import serve

    from safeclip.runtime.serve import ray_app

    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    ray_app.run({"bundle": str(bundle), "num_replicas": 2, "cpus_per_replica": 0.5, "max_ongoing_requests": 2,
                 "default_max_tokens": N, "max_tokens": 64, "threads": 1},
                host="127.0.0.1", port=port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete("safeclip")                     # raises if something else shut Serve down meanwhile


def test_two_replicas_answer_the_openai_client_concurrently(ray_url, oracle, test_images):
    assert _running() == 2
    c = _client(ray_url)
    assert c.models.list().data[0].id == oracle.manifest.name
    red, blue = data_uri(test_images / "red.png"), data_uri(test_images / "blue.jpg", "image/jpeg")
    want = {img: oracle.generate(str(test_images / name), Q, max_new_tokens=N)
            for img, name in ((red, "red.png"), (blue, "blue.jpg"))}

    def ask(i: int):
        img = red if i % 2 else blue
        raw = c.chat.completions.with_raw_response.create(model=oracle.manifest.name, messages=user(Q, img),
                                                          stream=bool(i % 3 == 0))
        replica = raw.headers.get("x-safeclip-replica")
        if i % 3 == 0:
            chunks = list(raw.parse())
            text, first = "".join(pieces(chunks)), chunks[0].model_extra["safeclip"]
            last = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason][0].model_extra["safeclip"]
            return img, text, first, last, replica
        r = raw.parse()
        g = r.model_extra["safeclip"]
        return img, r.choices[0].message.content, g, g, replica

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(12)))
    for img, text, first, last, _ in results:
        w = want[img]
        assert text == w.text
        assert (first["flagged"], first["category"]) == (w.verdict.flagged, w.verdict.category)
        assert first["score"] == pytest.approx(w.verdict.score, abs=1e-5)
        assert last["finish_reason"] == w.finish_reason and last["action"] == w.action
    assert sum(r[0] == red and r[2]["flagged"] for r in results) == 6
    assert len({r[4] for r in results}) == 2, "both replicas should have answered"


def test_a_replica_killed_under_load_loses_no_request_silently(ray_url, oracle, test_images):
    import ray

    c = _client(ray_url, retries=2)                  # the openai client's own retries (5xx, connection errors)
    red, model = data_uri(test_images / "red.png"), oracle.manifest.name
    outcomes, lock, stop = [], threading.Lock(), threading.Event()

    def load(k: int):
        i = 0
        while not stop.is_set():
            i += 1
            stream = (i + k) % 2 == 0
            try:
                if stream:
                    chunks = list(c.chat.completions.create(messages=user(Q, red), model=model, stream=True,
                                                            max_tokens=24))
                    fin = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
                    ok = (len(fin) == 1 and fin[0].model_extra["safeclip"]["flagged"] is True
                          and chunks[0].model_extra["safeclip"]["category"] == "gun")
                    res = ("ok",) if ok else ("silent", len(chunks))
                else:
                    r = c.chat.completions.create(messages=user(Q, red), model=model, max_tokens=24)
                    ok = r.choices[0].finish_reason and r.model_extra["safeclip"]["flagged"] is True
                    res = ("ok",) if ok else ("silent", r.choices[0].finish_reason)
            except openai.APIStatusError as e:
                res = ("refused", e.status_code)
            except (openai.APIConnectionError, openai.APIError) as e:
                res = ("failed", type(e).__name__)
            except Exception as e:                   # a stream cut mid-body: httpx raises from the iterator
                res = ("failed", type(e).__name__)
            with lock:
                outcomes.append((time.monotonic(), stream, res))

    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(3)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    # a stream under way on the victim: its first chunk is here, the rest is still being generated
    probe = c.chat.completions.with_raw_response.create(messages=user(Q, red), model=model, stream=True,
                                                        max_tokens=64)
    replica = probe.headers["x-safeclip-replica"]
    chunks = probe.parse()
    first = next(iter(chunks))
    assert first.model_extra["safeclip"]["flagged"] is True
    victim = [a for a in _replicas() if replica in a["name"]]
    assert len(victim) == 1, (replica, _replicas())
    victim = victim[0]
    t_kill = time.monotonic()
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)
    try:
        rest = list(chunks)
        probe_end = ("silent", len(rest)) if not any(ch.choices and ch.choices[0].finish_reason
                                                    for ch in rest) else ("ok",)
    except Exception as e:
        probe_end = ("failed", type(e).__name__)
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a request hung"
    print("probe stream on the killed replica:", probe_end)
    assert probe_end[0] == "failed", probe_end        # cut mid-answer: the client raises, never a silent end
    kinds = [o[2][0] for o in outcomes]
    assert "silent" not in kinds, [o for o in outcomes if o[2][0] == "silent"]
    assert kinds.count("ok") > 5 and any(o[0] > t_kill and o[2][0] == "ok" for o in outcomes)
    for _, _, res in outcomes:
        assert res[0] == "ok" or res[0] == "failed" or (res[0] == "refused" and res[1] >= 500), res
    print(f"{len(outcomes)} requests: {kinds.count('ok')} answered, {kinds.count('refused')} refused, "
          f"{kinds.count('failed')} failed with an error (after the client's retries)")
    deadline = time.monotonic() + 120                # Serve replaces the dead replica
    while _running() < 2 or victim["name"] in {a["name"] for a in _replicas()}:
        assert time.monotonic() < deadline, "Serve did not bring the replica back"
        time.sleep(1)
    r = _client(ray_url).chat.completions.create(messages=user(Q, red), model=model, max_tokens=4)
    assert r.model_extra["safeclip"]["flagged"] is True


def test_build_app_options_and_cli_errors(bundle, capsys):
    """``serve run``'s key=value strings become typed deployment options; bad ones are one-line errors before
    Ray starts (no Ray runtime needed)."""
    from safeclip.runtime.serve import cli, ray_app

    app = ray_app.build_app({"bundle": str(bundle), "num_replicas": "3", "cpus_per_replica": "0.5",
                             "max_queue": "2", "policy": "refuse", "allow_remote_images": "false"})
    d = app._bound_deployment
    assert d.num_replicas == 3 and d.ray_actor_options["num_cpus"] == 0.5
    assert d.init_args[2] == {"max_queue": 2, "policy": "refuse", "allow_remote_images": False}
    auto = ray_app.build_app({"bundle": str(bundle), "min_replicas": "1", "max_replicas": "4",
                              "target_ongoing_requests": "3"})._bound_deployment
    cfg = auto._deployment_config.autoscaling_config
    assert (cfg.min_replicas, cfg.max_replicas, cfg.target_ongoing_requests) == (1, 4, 3)
    for bad, msg in (({"num_replicas": "2"}, "needs bundle"), ({"bundle": "b", "colour": "red"}, "unknown option"),
                     ({"bundle": "b", "num_replicas": "two"}, "must be a number"),
                     ({"bundle": "b", "min_replicas": 3, "max_replicas": 2}, "min_replicas")):
        with pytest.raises(ValueError, match=msg):
            ray_app.build_app(bad)
    assert cli.main(["--bundle", str(bundle), "--ray", "--replicas", "0"]) == 1
    err = capsys.readouterr().err
    assert cli.main(["--bundle", str(bundle.parent), "--ray"]) == 1            # not a bundle: before Ray starts
    err += capsys.readouterr().err
    assert "safeclip-serve: error: num_replicas must be at least 1" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("safeclip-serve: error")]) == 2
