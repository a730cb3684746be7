"""safeclip-serve: the official ``openai`` client against a real uvicorn server on a free loopback port (plain
and streamed, with and without an image, flagged and clean), raw HTTP for every limit (never a 500), remote
images, the CLI, and runtime isolation. The queue, disconnects and the load test: test_serve_queue.py.

Oracle: a second Pipeline on the same bundle, called directly; greedy decoding makes the server's answers
equal to it token for token. The bundle's gate is controlled: red images flag 'gun', blue ones are clean.
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import (Q, ServerThread, client, data_uri, health, pieces,  # noqa: E402
                            raw, user)

N = 12                     # default max_tokens of the servers here: small keeps the suite fast


@pytest.fixture(scope="module")
def server(bundle):
    app = create_app(Pipeline.load(bundle, context=1024), default_max_tokens=N, max_tokens=64,
                     max_body_bytes=256 * 1024, max_pixels=200_000, max_prompt_chars=4000, body_timeout_s=1.0)
    with ServerThread(app) as s:
        yield s


@pytest.fixture(scope="module")
def refuse_server(bundle):
    with ServerThread(create_app(Pipeline.load(bundle), policy="refuse", default_max_tokens=N,
                                 api_key="s3cret")) as s:
        yield s


# -- the openai client ----------------------------------------------------------------------------------
def test_openai_client_plain_and_streamed(server, oracle, test_images):
    c = client(server.url)
    model = c.models.list().data[0]
    assert model.id == oracle.manifest.name and model.model_extra["safeclip"]["classes"] == oracle.classes

    # text only, plain: not gated
    r = c.chat.completions.create(model=model.id, messages=[{"role": "user", "content": "Hello there"}])
    want = oracle.generate(None, "Hello there", max_new_tokens=N)
    assert r.choices[0].message.content == want.text
    assert r.usage.prompt_tokens == want.prompt_tokens and r.usage.completion_tokens == len(want.token_ids)
    assert r.model_extra["safeclip"]["gated"] is False and r.model_extra["safeclip"]["flagged"] is False

    # clean image, streamed: verdict on the first chunk, text equal to the pipeline's
    want = oracle.generate(str(test_images / "blue.jpg"), Q, max_new_tokens=N)
    chunks = list(c.chat.completions.create(model=model.id, stream=True, stream_options={"include_usage": True},
                                            messages=user(Q, data_uri(test_images / "blue.jpg", "image/jpeg"))))
    first = chunks[0].model_extra["safeclip"]
    assert first["gated"] and not first["flagged"] and first["category"] == "neutral"
    assert first["score"] == pytest.approx(want.verdict.score, abs=1e-5)
    assert pieces(chunks) == list(oracle.stream(str(test_images / "blue.jpg"), Q, max_new_tokens=N))
    assert "".join(pieces(chunks)) == want.text
    finish = [ch for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert finish[0].model_extra["safeclip"]["finish_reason"] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids) and not chunks[-1].choices

    # flagged image, plain and streamed: the bundle's policy (instruct) answers with the safety instruction
    want = oracle.generate(str(test_images / "red.png"), Q, max_new_tokens=N)
    assert want.action == "instructed"
    r = c.chat.completions.create(model=model.id, messages=user(Q, data_uri(test_images / "red.png")))
    g = r.model_extra["safeclip"]
    assert (g["flagged"], g["category"], g["action"], g["policy"]) == (True, "gun", "instructed", "instruct")
    assert g["probs"]["gun"] == pytest.approx(want.verdict.probs["gun"], abs=1e-5)
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens
    chunks = list(c.chat.completions.create(model=model.id, stream=True,
                                            messages=user(Q, data_uri(test_images / "red.png"))))
    assert chunks[0].model_extra["safeclip"]["flagged"] is True
    assert pieces(chunks) == list(oracle.stream(str(test_images / "red.png"), Q, max_new_tokens=N))
    assert len(pieces(chunks)) > 1 and "".join(pieces(chunks)) == want.text


def test_refuse_policy_and_api_key(refuse_server, oracle, test_images):
    c = client(refuse_server.url, "s3cret")
    r = c.chat.completions.create(model=oracle.manifest.name, messages=user(Q, data_uri(test_images / "red.png")))
    refusal = oracle.refusal_for("gun")
    assert r.choices[0].message.content == refusal and r.choices[0].message.refusal == refusal
    assert r.choices[0].finish_reason == "content_filter" and r.usage.completion_tokens == 0
    assert r.model_extra["safeclip"]["action"] == "refused"
    chunks = list(c.chat.completions.create(model=oracle.manifest.name, stream=True,
                                            messages=user(Q, data_uri(test_images / "red.png"))))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == refusal
    # a clean image is answered as usual under the same policy
    r = c.chat.completions.create(model=oracle.manifest.name, messages=user(Q, data_uri(test_images / "blue.jpg")))
    assert r.choices[0].message.content == oracle.generate(str(test_images / "blue.jpg"), Q, max_new_tokens=N).text
    assert r.choices[0].message.refusal is None
    with pytest.raises(openai.AuthenticationError):
        client(refuse_server.url, "wrong").models.list()
    status, headers, body = raw(refuse_server.url, "GET", "/v1/models", headers={})       # no key at all
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, headers, body = raw(refuse_server.url, "POST", "/v1/chat/completions", {"messages": user("hi")}, headers={
        "Content-Type": "application/json", "Authorization": "Bearer wrong"})
    assert status == 401 and headers.get("www-authenticate") == "Bearer" and body["error"]["code"] == "invalid_api_key"
    assert health(refuse_server.url)["status"] == "ok"       # health needs no key



# -- limits, over raw HTTP: each a clear 4xx, never a 500 ----------------------------------------------------
def _png(w: int, h: int) -> bytes:
    import io

    from PIL import Image
    b = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(b, "PNG")
    return b.getvalue()


def _chat(**kw) -> dict:
    return {"messages": user(Q), "max_tokens": 4, **kw}


JSON = {"Content-Type": "application/json"}
LIMITS = {   # name: (body, headers, status, error code)
    "body too large": (b"{" + b" " * 300_000 + b"}", JSON, 413, "request_too_large"),
    "body too large, chunked": (iter([b" " * 100_000] * 3), JSON, 413, "request_too_large"),
    "malformed JSON": (b'{"messages": [', JSON, 400, "invalid_json"),
    "JSON not an object": (b"[1, 2]", JSON, 400, "invalid_json"),
    "not UTF-8": (b'{"model": "\xff"}', JSON, 400, "invalid_json"),
    "NaN": (b'{"temperature": NaN}', JSON, 400, "invalid_json"),
    "nested too deeply": (b"[" * 60_000 + b"]" * 60_000, JSON, 400, "invalid_json"),
    "unknown field": (_chat(frobnicate=1), JSON, 400, "unsupported_field"),
    "empty tools": (_chat(tools=[]), JSON, 400, "invalid_request"),
    "tool_choice without tools": (_chat(tool_choice="auto"), JSON, 400, "invalid_request"),
    "response_format yaml": (_chat(response_format={"type": "yaml"}), JSON, 400, "invalid_request"),
    "uncompilable schema": (_chat(response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "array", "uniqueItems": True}}}), JSON, 400, "unsupported_schema"),
    "logit_bias set": (_chat(logit_bias={"42": 5}), JSON, 400, "unsupported_value"),
    "top_logprobs 2": (_chat(top_logprobs=2), JSON, 400, "unsupported_value"),
    "lone surrogate in the text": (b'{"messages": [{"role": "user", "content": "hi \\ud83d"}]}', JSON, 400,
                                   "invalid_unicode"),
    "lone surrogate in a key": (b'{"\\udc00": 1, "messages": []}', JSON, 400, "invalid_unicode"),
    "null messages": ({"messages": None}, JSON, 400, "invalid_request"),
    "n > 1": (_chat(n=2), JSON, 400, "unsupported_value"),
    "text/plain": (_chat(), {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
    "no content type": (_chat(), {}, 415, "unsupported_media_type"),
    "form data": (b"a=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415, "unsupported_media_type"),
    "no messages": ({"max_tokens": 4}, JSON, 400, "invalid_request"),
    "two user turns": ({"messages": user("a") + user("b")}, JSON, 400, "unsupported_conversation"),
    "system message after a turn": ({"messages": user("a") + [{"role": "system", "content": "x"}] + user("b")}, JSON,
                                    400, "unsupported_conversation"),
    "assistant first": ({"messages": [{"role": "assistant", "content": "x"}] + user("a")}, JSON, 400,
                        "unsupported_conversation"),
    "assistant last": ({"messages": user("a") + [{"role": "assistant", "content": "x"}]}, JSON, 400,
                       "unsupported_conversation"),
    "tool message": ({"messages": user("a") + [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, JSON, 400,
                     "unsupported_conversation"),
    "assistant tool_calls with non-JSON arguments": ({"messages": user("a") + [{"role": "assistant", "content": None,
        "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}]}] + user("b")},
        JSON, 400, "invalid_request"),
    "assistant with an image": ({"messages": user("a") + [{"role": "assistant", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(_png(8, 8))}}]}] + user("b")}, JSON, 400,
        "unsupported_conversation"),
    "image in the system prompt": ({"messages": [{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(_png(8, 8))}}]}] + user("b")}, JSON, 400,
        "unsupported_conversation"),
    "unknown role": ({"messages": [{"role": "narrator", "content": "x"}] + user("a")}, JSON, 400, "invalid_request"),
    "history over the context": ({"messages": user("z " * 700) + [{"role": "assistant", "content": "w " * 700}]
                                  + user("more")}, JSON, 400, "context_length_exceeded"),
    "empty prompt": ({"messages": user("   ")}, JSON, 400, "invalid_request"),
    "unknown part type": ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, JSON, 400,
                          "invalid_request"),
    "prompt over the character limit": ({"messages": user("x" * 4001)}, JSON, 400, "context_length_exceeded"),
    "prompt over the context": ({"messages": user("y " * 1500)}, JSON, 400, "context_length_exceeded"),
    "max_tokens 0": (_chat(max_tokens=0), JSON, 400, "invalid_request"),
    "max_tokens over the limit": (_chat(max_tokens=65), JSON, 400, "invalid_request"),
    "max_tokens a string": (_chat(max_tokens="8"), JSON, 400, "invalid_request"),
    "max_tokens true": (_chat(max_tokens=True), JSON, 400, "invalid_request"),
    "temperature 3": (_chat(temperature=3), JSON, 400, "invalid_request"),
    "top_p 0": (_chat(top_p=0), JSON, 400, "invalid_request"),
    "five stop strings": (_chat(stop=["a", "b", "c", "d", "e"]), JSON, 400, "invalid_request"),
    "stream a string": (_chat(stream="yes"), JSON, 400, "invalid_request"),
    "wrong model": (_chat(model="gpt-4o"), JSON, 404, "model_not_found"),
    "remote image": ({"messages": user(Q, "http://127.0.0.1:9/x.png")}, JSON, 400, "remote_image_refused"),
    "file URL": ({"messages": user(Q, "file:///etc/passwd")}, JSON, 400, "invalid_image"),
    "bad base64": ({"messages": user(Q, "data:image/png;base64,@@@")}, JSON, 400, "invalid_image"),
    "not an image": ({"messages": user(Q, data_uri(b"hello world", "image/png"))}, JSON, 400, "invalid_image"),
    "data URI not an image type": ({"messages": user(Q, data_uri(b"hi", "text/plain"))}, JSON, 400, "invalid_image"),
    "too many pixels": ({"messages": user(Q, data_uri(_png(600, 400)))}, JSON, 400, "invalid_image"),
    "two images": ({"messages": [{"role": "user", "content": [
        {"type": "text", "text": Q}, {"type": "image_url", "image_url": {"url": data_uri(_png(8, 8))}},
        {"type": "image_url", "image_url": {"url": data_uri(_png(8, 8))}}]}]}, JSON, 400, "too_many_images"),
    "nine images in a conversation": ({"messages": [m for _ in range(9) for m in user(Q, data_uri(_png(8, 8))) + [
        {"role": "assistant", "content": "ok"}]][:-1]}, JSON, 400, "too_many_images"),
    "image placeholder typed by the user": ({"messages": user("look <image> here", data_uri(_png(8, 8)))}, JSON,
                                            400, "invalid_prompt"),
}


@pytest.mark.parametrize("case", list(LIMITS))
def test_limits_answer_a_clear_4xx(server, case):
    body, headers, status, code = LIMITS[case]
    got, _, err = raw(server.url, "POST", "/v1/chat/completions", body, headers)
    assert (got, err and err["error"]["code"]) == (status, code), err
    assert err["error"]["message"] and "\n" not in err["error"]["message"]
    assert err["error"]["type"] != "server_error"


def test_routes_methods_and_page(server):
    assert raw(server.url, "GET", "/nope", headers={})[0:3:2] == (404, {"error": {
        "message": "Not Found", "type": "not_found_error", "code": "not_found", "param": None}})
    assert raw(server.url, "GET", "/v1/chat/completions", headers={})[0] == 405
    assert raw(server.url, "GET", "/v1/models/nope", headers={})[0] == 404
    status, headers, _ = raw(server.url, "GET", "/", headers={})
    assert status == 200 and "default-src 'self'" in headers["content-security-policy"]
    static = Path(__import__("safeclip.runtime.serve.app", fromlist=["STATIC"]).STATIC)
    for f in sorted(static.iterdir()):        # every page file is served, and none loads anything from elsewhere
        assert raw(server.url, "GET", f"/static/{f.name}", headers={})[0] == 200
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name


def test_truncated_and_slow_bodies_do_not_hang(server):
    host, port = "127.0.0.1", server.port
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n{\"messages\":")
    with socket.create_connection((host, port), timeout=10) as s:       # half a body, then silence
        s.sendall(head)
        t0 = time.monotonic()
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - t0 < 5
    with socket.create_connection((host, port), timeout=10) as s:       # half a body, then gone
        s.sendall(head)
    s = socket.create_connection((host, port), timeout=10)              # garbage instead of HTTP
    s.sendall(b"\x16\x03\x01 not http at all\r\n\r\n")
    assert s.recv(4096).startswith(b"HTTP/1.1 400")
    s.close()
    h = {k: v for k, v in health(server.url).items() if k != "prefix_cache"}
    assert h == {"status": "ok", "model": server_model(server), "busy": False, "queued": 0, "max_queue": 8,
                 "running": 0, "waiting": 0, "max_batch": 1}


def server_model(server) -> str:
    return raw(server.url, "GET", "/v1/models", headers={})[2]["data"][0]["id"]


ROUNDS = int(os.environ.get("SAFECLIP_FUZZ_ROUNDS", "150"))


def test_mutated_requests_never_500(server, test_images):
    """Random mutations of a valid request (seeded; 150 rounds, SAFECLIP_FUZZ_ROUNDS for more): every answer
    is a 200 or a clear 4xx."""
    rng = random.Random(0)
    base = {"model": server_model(server), "max_tokens": 3,
            "messages": user(Q, data_uri(test_images / "red.png"))}
    values = [None, 0, -1, 1.5, 10 ** 30, "", "x", True, [], {}, [None], {"a": 1}, "data:", "\u0000", "\ud83d",
              {"type": "text"}, {"url": None}]

    def pick():
        return json.loads(json.dumps(rng.choice(values)))      # a fresh copy: no shared lists or dicts

    def mutate(obj, depth=0):
        if isinstance(obj, dict) and obj:
            k = rng.choice(list(obj))
            obj[k] = mutate(obj[k], depth + 1) if rng.random() < 0.6 else pick()
        elif isinstance(obj, list) and obj:
            i = rng.randrange(len(obj))
            obj[i] = mutate(obj[i], depth + 1) if rng.random() < 0.6 else pick()
        else:
            obj = pick()
        return obj

    seen = set()
    for _ in range(ROUNDS):
        body = json.loads(json.dumps(base))
        for _ in range(rng.randint(1, 3)):
            body = mutate(body)
        status, _, err = raw(server.url, "POST", "/v1/chat/completions", body)
        assert status in (200, 400, 404, 413), (status, body)
        assert status == 200 or err["error"]["message"]
        seen.add(status)
    assert {200, 400} <= seen
    assert health(server.url)["busy"] is False


# -- images from elsewhere, orientation ---------------------------------------------------------------------
def test_remote_images_refused_by_default_and_fetched_only_when_allowed(server, bundle, test_images):
    """Against a local image server on 127.0.0.1 only: refused by default, refused as a loopback address with
    --allow-remote-images alone, fetched with --allow-private-image-hosts too; a trickling server is cut at
    the total fetch deadline and an endless body at the size limit, while it is being read."""
    hits = []
    red = (test_images / "red.png").read_bytes()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            if self.path == "/trickle.png":            # one byte every 0.2 s: each read is quick, the whole is not
                self.send_response(200)
                self.send_header("Content-Length", str(len(red)))
                self.end_headers()
                try:
                    for b in red[:40]:
                        self.wfile.write(bytes([b]))
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass
                return
            if self.path == "/endless.png":            # no Content-Length, more than the limit
                self.send_response(200)
                self.end_headers()
                try:
                    for _ in range(64):
                        self.wfile.write(b"\0" * 65536)
                except OSError:
                    pass
                return
            if self.path != "/red.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(red)))
            self.end_headers()
            self.wfile.write(red)

        def log_message(self, *a):
            pass

    images = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=images.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{images.server_address[1]}"

    def ask(s, path):
        return raw(s.url, "POST", "/v1/chat/completions", {"messages": user(Q, url + path)})
    try:
        status, _, err = ask(server, "/red.png")
        assert status == 400 and err["error"]["code"] == "remote_image_refused" and hits == []
        with ServerThread(create_app(Pipeline.load(bundle), allow_remote_images=True, default_max_tokens=2)) as s:
            status, _, err = ask(s, "/red.png")
            assert status == 400 and err["error"]["code"] == "remote_image_refused", err
            assert "loopback or private" in err["error"]["message"] and hits == []
        with ServerThread(create_app(Pipeline.load(bundle), allow_remote_images=True, allow_private_image_hosts=True,
                                     default_max_tokens=2, fetch_timeout_s=1.0, max_body_bytes=256 * 1024)) as s:
            status, _, body = ask(s, "/red.png")
            assert status == 200 and body["safeclip"]["flagged"] and body["safeclip"]["category"] == "gun"
            status, _, err = ask(s, "/gone.png")
            assert status == 400 and err["error"]["code"] == "invalid_image" and "404" in err["error"]["message"]
            t0 = time.monotonic()
            status, _, err = ask(s, "/trickle.png")
            took = time.monotonic() - t0
            assert status == 400 and "did not answer within 1 s" in err["error"]["message"] and took < 2.5, (err, took)
            status, _, err = ask(s, "/endless.png")
            assert status == 413 and err["error"]["code"] == "request_too_large", err
            assert health(s.url)["busy"] is False
        assert hits == ["/red.png", "/gone.png", "/trickle.png", "/endless.png"]
    finally:
        images.shutdown()
        images.server_close()


def test_exif_rotated_photo_is_gated_as_the_pipeline_sees_it(server, oracle, tmp_path):
    import io

    import numpy as np
    from PIL import Image

    arr = np.zeros((120, 240, 3), np.uint8)
    arr[:, :80] = (220, 30, 30)
    arr[:, 80:] = (20, 40, 210)
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6                                            # "rotate 90° clockwise to display"
    b = io.BytesIO()
    im.save(b, "JPEG", exif=exif.tobytes())
    status, _, body = raw(server.url, "POST", "/v1/chat/completions",
                          {"messages": user(Q, data_uri(b.getvalue(), "image/jpeg")), "max_tokens": 1})
    want = oracle.gate(b.getvalue())
    assert status == 200
    assert body["safeclip"]["probs"] == pytest.approx({k: round(v, 6) for k, v in want.probs.items()}, abs=2e-6)


# -- the command line and the runtime rule ------------------------------------------------------------------
def _serve_cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "safeclip.runtime.serve.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)


def test_cli_serves_on_a_free_port_and_stops_cleanly(bundle, oracle):
    import signal

    p = _serve_cli("--bundle", str(bundle), "--port", "0", "--default-max-tokens", "5", "--api-key", "k",
                   "--policy", "refuse", "--log-level", "warning")
    try:
        line = p.stderr.readline()
        assert line.startswith("safeclip-serve: serving ") and "API key required" in line, line
        url = line.split(" on ")[1].split("/ ")[0]
        assert url.startswith("http://127.0.0.1:")
        assert health(url)["model"] == oracle.manifest.name
        r = client(url, "k").chat.completions.create(model=oracle.manifest.name, messages=user("Hi"))
        assert r.choices[0].message.content == oracle.generate(None, "Hi", max_new_tokens=5).text
        assert client(url, "k").models.list().data[0].model_extra["safeclip"]["policy"] == "refuse"
        p.send_signal(signal.SIGINT)                            # graceful shutdown, then the usual 130
        assert p.wait(timeout=20) == 130 and "Traceback" not in p.stderr.read()
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=2).close()
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()


@pytest.mark.parametrize("args, rc, message", [
    (["--bundle", "/nonexistent/bundle"], 1, "safeclip-serve: error: "),
    (["--bundle", "x", "--port", "70000"], 2, "--port must be in 0..65535"),
    (["--bundle", "x", "--max-tokens", "0"], 2, "--max-tokens must be at least 1"),
    (["--bundle", "x", "--header-timeout", "0"], 2, "--header-timeout must be positive"),
    (["--bundle", "x", "--prefix-cache-mb", "-1"], 2, "--prefix-cache-mb must be >= 0"),
    (["--bundle", "x", "--allow-private-image-hosts"], 2, "--allow-private-image-hosts needs --allow-remote-images"),
])
def test_cli_errors_are_one_line(args, rc, message):
    p = _serve_cli(*args)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == rc and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_cli_without_the_serve_extra_says_how_to_install_it():
    code = ("import sys; sys.modules['uvicorn'] = None; from safeclip.runtime.serve.cli import main; "
            "sys.exit(main(['--bundle', 'x']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "pip install 'safeclip-edge[serve]'" in r.stderr and "Traceback" not in r.stderr


def test_cli_port_in_use(bundle):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        p = _serve_cli("--bundle", str(bundle), "--port", str(taken.getsockname()[1]))
        err = p.communicate(timeout=60)[1]
    assert p.returncode == 1 and "cannot listen on 127.0.0.1:" in err and "Traceback" not in err


def test_serving_imports_no_torch_transformers_onnx_or_exporter(bundle):
    code = ("import sys; from safeclip.runtime.pipeline import Pipeline; "
            "from safeclip.runtime.serve import create_app; "
            f"p = Pipeline.load({str(bundle)!r}); app = create_app(p); p.generate(None, 'Hi', max_new_tokens=2); "
            "import safeclip.runtime.serve.cli; "
            "bad = [m for m in ('torch', 'transformers', 'onnx', 'safeclip.export') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

