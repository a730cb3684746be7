"""safeclip-serve with LlamaIndex's ``OpenAILike`` (llama-index-llms-openai-like, on the official ``openai`` 2.x
client): chat mode (``is_chat_model=True``) with a system prompt and a three-turn history carrying images in
two turns, as ``ChatMessage`` objects with ``TextBlock``/``ImageBlock`` content blocks, through ``chat()`` and
``stream_chat()``; and completion mode (``is_chat_model=False``), which calls ``/v1/completions`` and gets the
server's 404 saying to use chat completions, raised as ``openai.NotFoundError`` (404 is not retried).

Oracle: the library's own ``Chat`` (a second Pipeline on the same bundle, greedy: equal text and prompt
length) on the same history; test_serve_chat checks that ``Chat`` against transformers.
"""
from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")
llama_like = pytest.importorskip("llama_index.llms.openai_like",
                                 reason="needs llama-index-llms-openai-like (dev extra)")

from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock  # noqa: E402

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import ServerThread, raw  # noqa: E402

N = 8
SYSTEM = "You are a careful museum guide."
TURNS = [("What is in the picture?", "blue.jpg"), ("And the colours?", None), ("Compare with this one.", "noise.png")]


@pytest.fixture(scope="module")
def server(bundle):
    with ServerThread(create_app(Pipeline.load(bundle), default_max_tokens=N, max_tokens=64)) as s:
        yield s


def llm(server, **kw):
    model = raw(server.url, "GET", "/v1/models", headers={})[2]["data"][0]["id"]
    return llama_like.OpenAILike(model=model, api_base=server.url + "/v1", api_key="unused", max_tokens=N,
                                 temperature=0.0, timeout=30, **kw)


def test_openai_like_chat_system_prompt_history_and_images_equal_the_library(server, oracle, test_images):
    li = llm(server, is_chat_model=True, max_retries=0)
    msgs = [ChatMessage(role="system", content=SYSTEM)]
    history = []
    for i, (text, image) in enumerate(TURNS):
        blocks = [TextBlock(text=text)] + ([ImageBlock(path=test_images / image)] if image else [])
        msgs.append(ChatMessage(role="user", blocks=blocks))
        chat = oracle.chat(system=SYSTEM)
        chat.set_history([(q, [test_images / im] if im else [], a) for q, im, a in history])
        want = chat.ask(text, None if image is None else test_images / image, max_new_tokens=N)
        want_text = "".join(want)
        assert want_text.strip(), "the oracle answered nothing: the comparison would be empty"
        if i % 2:
            deltas = list(li.stream_chat(msgs))
            got = "".join(d.delta or "" for d in deltas)
            assert deltas[-1].message.content == got                 # LlamaIndex's accumulated message
        else:
            r = li.chat(msgs)
            got = r.message.content
            assert r.raw.usage.prompt_tokens == want.result.prompt_tokens, i
            gate = r.raw.model_extra["safeclip"]["images"]
            assert [im["turn"] for im in gate] == [k for k, (_, im) in enumerate(TURNS[:i + 1]) if im]
        assert got == want_text, i
        history.append((text, image, got))
        msgs.append(ChatMessage(role="assistant", content=got))


def test_openai_like_completion_mode_gets_the_use_chat_completions_404(server):
    li = llm(server, is_chat_model=False)          # LlamaIndex's default retries: a 404 is not retried
    for call in (lambda: li.complete("Hello"), lambda: "".join(r.delta for r in li.stream_complete("Hello")),
                 lambda: li.chat([ChatMessage(role="user", content="Hello")])):
        with pytest.raises(openai.NotFoundError) as e:
            call()
        msg = str(e.value)
        assert "no /v1/completions" in msg and "/v1/chat/completions" in msg and "is_chat_model=True" in msg, msg
