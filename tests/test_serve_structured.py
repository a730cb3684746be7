"""safeclip-serve with structured output and tools, through the official openai client, LangChain and LlamaIndex
(issue 25 §2-3).

On the controlled demo bundle (red images flag 'gun', blue are clean), random weights: the answers are nonsense,
but they must validate against their schemas, which is what the grammar guarantees. Oracles: Pydantic parses
``chat.completions.parse``'s answer, plain and streamed; tool calls carry ids, names and JSON arguments that
validate against the tool's parameters, with ``finish_reason`` ``tool_calls``; the tool loop (call, tool message,
answer) goes through; a refused image under ``refuse`` gives ``refusal`` with content null and no tool calls; a
schema the engine cannot compile is a 400 naming the keyword.
"""
from __future__ import annotations

import json
from typing import Literal

import pytest

pytest.importorskip("fastapi", reason="needs the [serve] extra (fastapi, uvicorn)")
pytest.importorskip("openai", reason="needs the openai client (dev extra)")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

from safeclip.runtime.pipeline import Pipeline  # noqa: E402
from safeclip.runtime.serve import create_app  # noqa: E402
from serve_fixtures import bundle  # noqa: E402,F401 (fixture)
from serve_fixtures import ServerThread, client, data_uri, raw, user  # noqa: E402


M = "bundle"                      # the model id the served bundle folder gives


class Pick(pydantic.BaseModel):
    object: Literal["cup", "ball", "box"]
    count: int = pydantic.Field(ge=1, le=5)
    ok: bool


WEATHER = {"type": "function", "function": {"name": "weather", "description": "Forecast", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["days"],
    "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 3}}}}}


@pytest.fixture(scope="module")
def servers(bundle):
    with ServerThread(create_app(Pipeline.load(bundle), max_tokens=96, default_max_tokens=96)) as s, \
            ServerThread(create_app(Pipeline.load(bundle), policy="refuse", max_tokens=96)) as r:
        yield s, r


def test_parse_with_a_pydantic_model_plain_and_streamed(servers):
    c = client(servers[0].url)
    r = c.chat.completions.parse(model=M, messages=user("Pick one."), response_format=Pick)
    msg = r.choices[0].message
    assert isinstance(msg.parsed, Pick) and msg.refusal is None and r.choices[0].finish_reason == "stop"
    with c.chat.completions.stream(model=M, messages=user("Pick another."), response_format=Pick) as s:
        for _ in s:
            pass
        final = s.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Pick)


def test_tool_calls_and_the_tool_loop(servers):
    c = client(servers[0].url)
    r = c.chat.completions.create(model=M, messages=user("Weather?"), tools=[WEATHER], tool_choice="required")
    choice = r.choices[0]
    (call,) = choice.message.tool_calls[:1]
    assert choice.finish_reason == "tool_calls" and call.id.startswith("call_") and call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    history = user("Weather?") + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    r2 = c.chat.completions.create(model=M, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8)
    assert r2.choices[0].message.tool_calls is None and isinstance(r2.choices[0].message.content, str)
    # streamed: the call arrives as OpenAI's tool-call deltas
    chunks = list(c.chat.completions.create(model=M, messages=user("Weather?"), tools=[WEATHER], stream=True,
                                            tool_choice={"type": "function", "function": {"name": "weather"}}))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].function.name == "weather" and deltas[0].id.startswith("call_")
    jsonschema.validate(json.loads(deltas[0].function.arguments), WEATHER["function"]["parameters"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_a_refused_image_is_a_refusal_not_an_answer(servers, test_images):
    c = client(servers[1].url)
    msgs = user("What is it?", data_uri(test_images / "red.png"))
    r = c.chat.completions.create(model=M, messages=msgs, tools=[WEATHER], tool_choice="required",
                                  response_format={"type": "json_object"})
    m = r.choices[0].message
    assert m.content is None and m.refusal and not m.tool_calls
    assert r.model_extra["safeclip"]["flagged"] and r.model_extra["safeclip"]["action"] == "refused"
    chunks = list(c.chat.completions.create(model=M, messages=msgs, response_format={"type": "json_object"},
                                            stream=True))
    assert not any(ch.choices and ch.choices[0].delta.content for ch in chunks)
    assert "".join(ch.choices[0].delta.refusal or "" for ch in chunks if ch.choices) == m.refusal


def test_an_uncompilable_schema_is_a_400_naming_the_keyword(servers):
    body = {"messages": user("x"), "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {"type": "array", "uniqueItems": True}}}}
    status, _, err = raw(servers[0].url, "POST", "/v1/chat/completions", body,
                         {"Content-Type": "application/json"})
    assert status == 400 and err["error"]["code"] == "unsupported_schema" and "uniqueItems" in err["error"]["message"]
    assert err["error"]["param"] == "response_format.json_schema.schema"


def test_instruct_keeps_the_schema(servers, test_images):
    """Under instruct (this server's policy) a flagged image gets the safety instruction and the answer still
    follows the schema."""
    c = client(servers[0].url)
    r = c.chat.completions.parse(model=M, messages=user("What is it?", data_uri(test_images / "red.png")),
                                 response_format=Pick)
    g = r.model_extra["safeclip"]
    assert g["flagged"] and g["action"] == "instructed" and isinstance(r.choices[0].message.parsed, Pick)


def test_langchain_structured_output_and_bind_tools(servers):
    lc = pytest.importorskip("langchain_openai", reason="needs langchain-openai (dev extra)")
    llm = lc.ChatOpenAI(base_url=servers[0].url + "/v1", api_key="unused", model=M, max_retries=0, timeout=60,
                        temperature=0)
    out = llm.with_structured_output(Pick, method="json_schema").invoke("Pick one.")
    assert isinstance(out, Pick)
    msg = llm.bind_tools([WEATHER], tool_choice="weather").invoke("Weather?")
    (call,) = msg.tool_calls[:1]
    assert call["name"] == "weather" and call["id"].startswith("call_")
    jsonschema.validate(call["args"], WEATHER["function"]["parameters"])


def test_llamaindex_openailike_function_calling(servers):
    pytest.importorskip("llama_index.llms.openai_like", reason="needs llama-index-llms-openai-like (dev extra)")
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool
    from llama_index.llms.openai_like import OpenAILike

    def weather(days: int) -> str:
        """Forecast for the next days."""
        return "sunny"

    llm = OpenAILike(api_base=servers[0].url + "/v1", api_key="unused", model=M, is_chat_model=True,
                     is_function_calling_model=True, max_retries=0, timeout=60)
    tool = FunctionTool.from_defaults(fn=weather)
    resp = llm.chat_with_tools([tool], chat_history=[ChatMessage(role="user", content="Weather?")],
                               tool_required=True)
    calls = llm.get_tool_calls_from_response(resp, error_on_no_tool_call=True)
    assert calls and calls[0].tool_name == "weather" and isinstance(calls[0].tool_kwargs.get("days"), int)
