"""safeclip-serve with what real clients send: typed clients' nulls and neutral fields, an image without text,
``/v1/completions`` callers, CORS, ``OPTIONS`` and ``HEAD``, uncut error messages, LangChain's ``ChatOpenAI``.

Oracle: a second Pipeline on the same bundle (greedy decoding: equal token for token). LlamaIndex's
``OpenAILike`` is in test_serve_llamaindex.py.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("uvicorn", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import Q, ServerThread, client, data_uri, raw, user  # noqa: E402

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(bundle):
    with ServerThread(create_app(Pipeline.load(bundle), default_max_tokens=6, max_tokens=64)) as s:
        yield s


def server_model(server) -> str:
    return raw(server.url, "GET", "/v1/models", headers={})[2]["data"][0]["id"]


def _chat(**kw) -> dict:
    return {"messages": user(Q), "max_tokens": 4, **kw}


def test_error_messages_are_never_cut_mid_json(server):
    big = {"x" * 200: 5}
    status, _, err = raw(server.url, "POST", "/v1/chat/completions", _chat(logit_bias=big))
    assert status == 400 and "a dict of 2" in err["error"]["message"] and '"xxx' not in err["error"]["message"]
    status, _, err = raw(server.url, "POST", "/v1/chat/completions", _chat(n=2))
    assert status == 400 and "'n' = 2 is not supported" in err["error"]["message"]


def test_nulls_mean_absent_and_neutral_fields_are_ignored(server, oracle, test_images):
    """What typed clients send (every unset field as null) and fields that change nothing here: the same
    answer as the plain request."""
    img = data_uri(test_images / "blue.jpg", "image/jpeg")
    plain = raw(server.url, "POST", "/v1/chat/completions", {"messages": user(Q, img), "max_tokens": 5})
    assert plain[0] == 200
    noisy = {"model": None, "messages": [{"role": "user", "name": None, "tool_calls": None, "function_call": None,
                                          "content": [{"type": "text", "text": Q, "cache_control": {"type": "x"}},
                                                      {"type": "image_url", "cache_control": None,
                                                       "image_url": {"url": img, "detail": None}}]}],
             "max_tokens": 5, "max_completion_tokens": None, "temperature": None, "top_p": None, "seed": None,
             "stop": None, "tools": None, "tool_choice": None, "functions": None, "response_format": None,
             "stream": None, "stream_options": None, "store": False, "service_tier": "auto",
             "parallel_tool_calls": True, "logit_bias": {}, "top_logprobs": 0, "metadata": {"k": "v"}, "n": None,
             "presence_penalty": None, "frequency_penalty": None, "logprobs": None, "user": None}
    status, _, body = raw(server.url, "POST", "/v1/chat/completions", noisy)
    assert status == 200, body
    assert body["choices"][0]["message"]["content"] == plain[2]["choices"][0]["message"]["content"]
    assert body["safeclip"]["category"] == "neutral"
    with server_stream(server, {**noisy, "stream": True, "stream_options": {"include_usage": True,
                                                                            "include_obfuscation": False}}) as text:
        assert "".join(text) == body["choices"][0]["message"]["content"]


class server_stream:
    """``with server_stream(server, body) as pieces``: a streamed request's text pieces over raw HTTP."""

    def __init__(self, server, body):
        self.server, self.body = server, body

    def __enter__(self):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(self.body), JSON)
        r = conn.getresponse()
        assert r.status == 200, r.read()
        events = [json.loads(line[6:]) for line in r.read().decode().split("\n\n")
                  if line.startswith("data: {")]
        conn.close()
        assert events[-1]["usage"]["completion_tokens"] > 0
        return [e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]]

    def __exit__(self, *exc):
        return False


def test_an_image_without_text_is_asked_the_default_question(server, oracle, test_images):
    from safeclip.runtime.serve.request import IMAGE_ONLY_QUESTION
    img = test_images / "blue.jpg"
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(img)}}]}]
    r = client(server.url).chat.completions.create(model=server_model(server), messages=msg, max_tokens=6)
    want = oracle.stream(str(img), IMAGE_ONLY_QUESTION, max_new_tokens=6)
    assert r.choices[0].message.content == "".join(want)
    assert r.model_extra["safeclip"]["gated"] is True


def test_legacy_completions_cors_options_and_head(server, bundle):
    for method in ("POST", "GET"):
        status, _, err = raw(server.url, method, "/v1/completions", {"prompt": "hi"} if method == "POST" else b"",
                             headers=JSON if method == "POST" else {})
        assert status == 404 and "/v1/chat/completions" in err["error"]["message"], err
        assert err["error"]["type"] == "not_found_error"
    status, headers, _ = raw(server.url, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["allow"] == "POST, OPTIONS" and "access-control-allow-origin" not in headers
    assert raw(server.url, "OPTIONS", "/health", headers={})[1]["allow"] == "GET, HEAD, OPTIONS"
    assert raw(server.url, "OPTIONS", "/nope", headers={})[0] == 404
    for path in ("/", "/health", "/v1/models"):
        status, headers, body = raw(server.url, "HEAD", path, headers={})
        assert status == 200 and body is None, path
    status, headers, _ = raw(server.url, "HEAD", "/v1/chat/completions", headers={})
    assert status == 405 and "POST" in headers["allow"]
    assert "access-control-allow-origin" not in raw(server.url, "GET", "/health", headers={"Origin": "http://a.b"})[1]
    page = "http://kiosk.local:3000"
    with ServerThread(create_app(Pipeline.load(bundle), cors_origins=[page], default_max_tokens=2)) as s:
        status, headers, _ = raw(s.url, "OPTIONS", "/v1/chat/completions", headers={
            "Origin": page, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert status == 204 and headers["access-control-allow-origin"] == page
        assert "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"]
        status, headers, body = raw(s.url, "POST", "/v1/chat/completions", {"messages": user(Q)},
                                    headers={**JSON, "Origin": page})
        assert status == 200 and headers["access-control-allow-origin"] == page and headers["vary"] == "Origin"
        status, headers, err = raw(s.url, "POST", "/v1/chat/completions", {"messages": user(Q)},
                                   headers={**JSON, "Origin": "http://evil.example"})       # hosts.py: refused
        assert status == 403 and "access-control-allow-origin" not in headers
        assert err["error"]["code"] == "origin_not_allowed"
        status, headers, _ = raw(s.url, "OPTIONS", "/v1/models", headers={
            "Origin": "http://evil.example", "Access-Control-Request-Method": "GET"})
        assert status == 204 and "access-control-allow-origin" not in headers


def test_langchain_chat_openai_with_an_image(server, oracle, test_images):
    """LangChain's ChatOpenAI (a typed client) against the server: a question about an image, plain and
    streamed, equal to the pipeline's answer."""
    lc = pytest.importorskip("langchain_openai", reason="needs langchain-openai (dev extra)")
    from langchain_core.messages import HumanMessage

    img = test_images / "blue.jpg"
    llm = lc.ChatOpenAI(base_url=server.url + "/v1", api_key="unused", model=server_model(server), max_tokens=6,
                        temperature=0, max_retries=0, timeout=30)
    msg = HumanMessage(content=[{"type": "text", "text": Q},
                                {"type": "image_url", "image_url": {"url": data_uri(img, "image/jpeg")}}])
    want = oracle.generate(str(img), Q, max_new_tokens=6).text
    assert llm.invoke([msg]).content == want
    assert "".join(chunk.content for chunk in llm.stream([msg])) == want
