"""safeclip-serve conversations: system/developer prompts, multi-turn histories with images in several turns,
the token-id prefix cache (a re-sent history is prefilled only after the longest common prefix), the context
refusal with its numbers, and a seeded mutation test of multi-turn requests.

Oracles: transformers (``apply_chat_template`` + LLaVA ``generate``, greedy, on the same history: test_chat's
``hf_generate``) for the library's ``Chat``, the library for the server (same text, same usage), and a cold
server (``prefix_cache_mb=0``) for the warm one. Clients: the official ``openai`` client and LangChain's
``ChatOpenAI``, plain and streamed, against uvicorn on a free loopback port.
"""
from __future__ import annotations

import json
import random
import time

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="needs the openai client (dev extra)")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle, oracle  # noqa: E402,F401 (fixtures)
from serve_fixtures import ServerThread, client, data_uri, health, pieces, raw  # noqa: E402

N = 8
SYSTEM = "You are a careful museum guide."
TURNS = [("What is in the picture?", "blue.jpg"), ("And the colours?", None), ("Compare with this one.", "noise.png")]


@pytest.fixture(scope="module")
def servers(bundle):
    warm = ServerThread(create_app(Pipeline.load(bundle), default_max_tokens=N, max_tokens=64))
    cold = ServerThread(create_app(Pipeline.load(bundle), default_max_tokens=N, max_tokens=64, prefix_cache_mb=0))
    with warm, cold:
        yield warm, cold


def user_msg(text, image=None, test_images=None):
    if image is None:
        return {"role": "user", "content": text}
    mime = "image/jpeg" if image.endswith(".jpg") else "image/png"
    url = data_uri(test_images / image, mime)
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def stats(url):
    return health(url)["prefix_cache"]


def test_openai_client_history_equals_library_and_transformers_and_prefills_only_new_tokens(
        servers, oracle, test_images, demo_sources):
    from test_chat import hf_generate

    warm, cold = servers
    cw, cc = client(warm.url), client(cold.url)
    model = cw.models.list().data[0].id
    messages = [{"role": "system", "content": SYSTEM}]
    history, images, prev_prompt = [], [], 0
    for i, (text, image) in enumerate(TURNS):
        messages.append(user_msg(text, image, test_images))
        before = stats(warm.url)
        stream = i % 2 == 1
        if stream:
            chunks = list(cw.chat.completions.create(model=model, messages=messages, stream=True, max_tokens=N,
                                                     stream_options={"include_usage": True}))
            got, usage = "".join(pieces(chunks)), chunks[-1].usage
            extra = [c for c in chunks if c.choices and c.choices[0].finish_reason][0].model_extra["safeclip"]
        else:
            r = cw.chat.completions.create(model=model, messages=messages, max_tokens=N)
            got, usage, extra = r.choices[0].message.content, r.usage, r.model_extra["safeclip"]
        after = stats(warm.url)
        ref = cc.chat.completions.create(model=model, messages=messages, max_tokens=N)     # cold: full prefill
        assert got == ref.choices[0].message.content and usage.prompt_tokens == ref.usage.prompt_tokens, i
        assert usage.completion_tokens == ref.usage.completion_tokens
        assert ref.usage.prompt_tokens_details.cached_tokens == 0
        # the library on the same history, and transformers on the library's rendering
        chat = oracle.chat(system=SYSTEM)
        chat.set_history([(q, [test_images / im] if im else [], a) for q, im, a in history])
        s = chat.ask(text, None if image is None else test_images / image, max_new_tokens=N)
        assert "".join(s) == got and s.result.prompt_tokens == usage.prompt_tokens
        images += [test_images / image] if image else []
        hf_tokens, hf_len = hf_generate(demo_sources, oracle, chat.history[:-1], images, max_new_tokens=N)
        assert list(s.result.token_ids) == hf_tokens and hf_len == usage.prompt_tokens, f"turn {i}"
        cached = usage.prompt_tokens_details.cached_tokens
        prefilled = after["prefilled_tokens"] - before["prefilled_tokens"]
        assert prefilled == usage.prompt_tokens - cached                      # counted at the server
        if i == 0:
            assert cached == 0 and after["misses"] == before["misses"] + 1
        else:                                      # the whole earlier prompt and part of the answer are reused
            assert cached >= prev_prompt and after["hits"] == before["hits"] + 1, (cached, prev_prompt)
            print(f"turn {i}: {usage.prompt_tokens} prompt tokens, {prefilled} prefilled (cold: "
                  f"{ref.usage.prompt_tokens})")
        assert [im["flagged"] for im in extra["images"]] == [False] * len(images)
        assert [im["turn"] for im in extra["images"]] == [k for k, (_, im) in enumerate(TURNS[:i + 1]) if im]
        history.append((text, image, got))
        messages.append({"role": "assistant", "content": got})
        prev_prompt = usage.prompt_tokens
    s = stats(warm.url)
    assert 0 < s["entries"] and 0 < s["bytes"] <= s["max_bytes"] == 256 * 2 ** 20
    models = raw(warm.url, "GET", "/v1/models", headers={})[2]["data"][0]["safeclip"]["prefix_cache"]
    assert models["entries"] == s["entries"] and models["hits"] == s["hits"]
    assert stats(cold.url)["entries"] == 0 and stats(cold.url)["max_bytes"] == 0


def test_developer_role_is_the_system_prompt_and_flagged_history_images_are_reported(servers, test_images):
    warm, _ = servers
    c = client(warm.url)
    base = [user_msg("What is in the picture?", "red.png", test_images), {"role": "assistant", "content": "A thing."},
            user_msg("Is it safe?")]
    a = c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=N,
                                  messages=[{"role": "developer", "content": SYSTEM}] + base)
    b = c.chat.completions.create(model=c.models.list().data[0].id, max_tokens=N,
                                  messages=[{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}] + base)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens
    gate = a.model_extra["safeclip"]
    assert gate["images"] == [{"turn": 0, "flagged": True, "category": "gun", "score": gate["images"][0]["score"]}]
    assert gate["gated"] is False                 # this turn carries no image; the flagged one is reported above


def test_context_error_names_the_numbers(servers):
    warm, _ = servers
    ctx = raw(warm.url, "GET", "/v1/models", headers={})[2]["data"][0]["safeclip"]["context_length"]
    body = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                         {"role": "user", "content": "Tell me more."}], "max_tokens": 64}
    status, _, ok = raw(warm.url, "POST", "/v1/chat/completions", body)
    assert status == 200
    n = ok["usage"]["prompt_tokens"]
    long = {**body, "messages": body["messages"][:1] + [{"role": "assistant", "content": "a " * (ctx - 40)}]
            + body["messages"][2:]}
    status, _, err = raw(warm.url, "POST", "/v1/chat/completions", long)
    assert status == 400 and err["error"]["code"] == "context_length_exceeded", err
    msg = err["error"]["message"]
    assert f"context is {ctx} tokens" in msg and "max_tokens asks for 64 more" in msg and n < ctx, msg


def test_langchain_system_prompt_history_and_images(servers, test_images):
    lc = pytest.importorskip("langchain_openai", reason="needs langchain-openai (dev extra)")
    from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

    warm, cold = servers
    c = client(cold.url)
    model = c.models.list().data[0].id
    llm = lc.ChatOpenAI(base_url=warm.url + "/v1", api_key="unused", model=model, max_tokens=N, temperature=0,
                        max_retries=0, timeout=30)
    lc_msgs, oa_msgs = [SystemMessage(content=SYSTEM)], [{"role": "system", "content": SYSTEM}]
    for i, (text, image) in enumerate(TURNS):
        m = user_msg(text, image, test_images)
        oa_msgs.append(m)
        lc_msgs.append(HumanMessage(content=m["content"]))
        want = c.chat.completions.create(model=model, messages=oa_msgs, max_tokens=N).choices[0].message.content
        got = "".join(ch.content for ch in llm.stream(lc_msgs)) if i % 2 else llm.invoke(lc_msgs).content
        assert got == want, i
        lc_msgs.append(AIMessage(content=got))
        oa_msgs.append({"role": "assistant", "content": got})


# -- a randomised mutation test of multi-turn requests ---------------------------------------------------------
def test_mutated_multi_turn_requests_never_5xx(servers, test_images):
    """Seeded, bounded (~4 s): valid multi-turn requests with messages dropped, duplicated, reordered, roles
    swapped, fields nulled or retyped, huge strings, bad images, lone surrogates; every answer is a 200 or an
    OpenAI-shaped 4xx, never a 5xx, and the server is idle and healthy after."""
    warm, _ = servers
    rng = random.Random(12)
    img = data_uri(test_images / "blue.jpg", "image/jpeg")
    valid = {"max_tokens": 2, "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}, {"type": "image_url",
                                                                                 "image_url": {"url": img}}]},
        {"role": "assistant", "content": "A colour."},
        {"role": "user", "content": "And now?"}]}
    junk = [None, 0, -1, 2.5, True, "", "x" * 20_000, "\ud83d", [], {}, [None], {"type": "image_url"},
            "data:image/png;base64,@@", {"url": "data:image/png;base64,AAAA"}, "tool", "developer", "assistant"]

    def mutate(body):
        msgs = body["messages"]
        op = rng.randrange(8)
        if op == 0 and msgs:
            del msgs[rng.randrange(len(msgs))]
        elif op == 1 and msgs:
            msgs.insert(rng.randrange(len(msgs) + 1), json.loads(json.dumps(rng.choice(msgs))))
        elif op == 2:
            rng.shuffle(msgs)
        elif op == 3 and msgs:
            m = rng.choice(msgs)
            if isinstance(m, dict):
                m["role"] = rng.choice(["user", "assistant", "system", "developer", "tool", "function", "x", None, 3])
        elif op == 4 and msgs:
            m = rng.choice(msgs)
            if isinstance(m, dict) and m:
                m[rng.choice(list(m) + ["name", "tool_calls", "refusal"])] = json.loads(json.dumps(rng.choice(junk)))
        elif op == 5:
            body[rng.choice(["max_tokens", "messages", "stream", "temperature", "stop"])] = rng.choice(junk)
        elif op == 6 and msgs:
            msgs[rng.randrange(len(msgs))] = rng.choice(junk)
        else:                                                    # an image part somewhere, good or bad
            m = rng.choice(msgs) if msgs else None
            if isinstance(m, dict):
                m["content"] = [{"type": "text", "text": "Q"},
                                {"type": "image_url", "image_url": {"url": rng.choice([img, junk[12], "\ud800"])}}]
        return body

    seen, t0, rounds = set(), time.monotonic(), 0
    while time.monotonic() - t0 < 4 and rounds < 400:
        body = json.loads(json.dumps(valid))
        for _ in range(rng.randint(1, 3)):
            if not isinstance(body.get("messages"), list):
                break
            body = mutate(body)
        status, _, data = raw(warm.url, "POST", "/v1/chat/completions", body)
        assert status < 500, (status, body)
        if status != 200:
            e = data["error"]
            assert e["message"] and "\n" not in e["message"] and e["type"] != "server_error" and e["code"], data
        seen.add(status)
        rounds += 1
    assert {200, 400} <= seen and rounds > 20
    h = health(warm.url)
    assert h["busy"] is False and h["queued"] == 0
