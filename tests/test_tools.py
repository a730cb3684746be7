"""Structured output and tools as clients send them: request parsing (serve/request.py), the tool convention
(runtime/tools.py), the reply's shape (serve/reply.py); and, on the demo model, tool calls generated under the
convention's grammar that parse into OpenAI tool_calls whose arguments validate against the tool's schema."""
from __future__ import annotations

import json

import pytest

from safeclip.runtime import tools as T
from safeclip.runtime.serve.reply import assistant_message, tool_call_deltas
from safeclip.runtime.serve.request import RequestError, parse_chat_request

LIGHT = {"type": "function", "function": {"name": "set_light", "description": "Switch a light",
         "parameters": {"type": "object", "additionalProperties": False, "required": ["room", "on"],
                        "properties": {"room": {"type": "string", "enum": ["kitchen", "hall"]},
                                       "on": {"type": "boolean"}}}}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["days"],
    "properties": {"days": {"type": "integer", "minimum": 1, "maximum": 3}}}}}
SCHEMA = {"type": "json_schema", "json_schema": {"name": "pick", "strict": True, "schema": {
    "type": "object", "additionalProperties": False, "required": ["object"],
    "properties": {"object": {"type": "string", "enum": ["cup", "box"]}}}}}


def parse(structured=True, **body):
    body.setdefault("messages", [{"role": "user", "content": "hi"}])
    return parse_chat_request(body, allow_remote_images=False, max_prompt_chars=10_000, max_tokens_limit=100,
                              structured=structured)


# --- request parsing ------------------------------------------------------------------------------------
def test_response_formats_parse_into_typed_fields():
    assert parse().response_format is None and parse().grammar() is None
    assert parse(response_format={"type": "text"}).grammar() is None
    assert parse(response_format={"type": "json_object"}).grammar().kind == "json_object"
    r = parse(response_format=SCHEMA)
    assert r.response_format.name == "pick" and r.response_format.strict
    assert json.loads(r.grammar().source) == SCHEMA["json_schema"]["schema"]


@pytest.mark.parametrize("body,param,code,words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", "unsupported_schema",
     "uniqueItems"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "string", "format": "bogus"}}}}, "response_format.json_schema.schema", "unsupported_schema", "bogus"),
    ({"response_format": {"type": "yaml"}}, "response_format.type", "invalid_request", "yaml"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "response_format.json_schema.name",
     "invalid_request", "name"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type", "invalid_request", "only function tools"),
    ({"tools": [LIGHT, LIGHT]}, "tools[1].function.name", "invalid_request", "two tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]},
     "tools[0].function.parameters", "unsupported_schema", "not"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_request", "needs 'tools'"),
    ({"tools": [LIGHT], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "invalid_request", "not in 'tools'"),
    ({"tools": [LIGHT], "tool_choice": "sometimes"}, "tool_choice", "invalid_request", "sometimes"),
])
def test_bad_structured_fields_are_400s_naming_the_field(body, param, code, words):
    with pytest.raises(RequestError) as e:
        parse(**body)
    assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
    assert words in e.value.message and "\n" not in e.value.message


def test_a_route_without_structured_output_still_refuses_it():
    for body in ({"response_format": {"type": "json_object"}}, {"tools": [LIGHT]}, {"tool_choice": "auto"}):
        with pytest.raises(RequestError):
            parse(structured=False, **body)
    assert parse(structured=False, response_format={"type": "text"}, tool_choice="none").grammar() is None


def test_tools_and_tool_choice():
    r = parse(tools=[LIGHT, WEATHER])
    assert [t.name for t in r.tools] == ["set_light", "weather"] and r.tool_choice == T.ToolChoice("auto")
    assert r.parallel_tool_calls
    assert parse(tools=[LIGHT], tool_choice="none").grammar() is None
    r = parse(tools=[LIGHT, WEATHER], tool_choice={"type": "function", "function": {"name": "weather"}},
              parallel_tool_calls=False)
    assert r.tool_choice == T.ToolChoice("function", "weather") and not r.parallel_tool_calls
    schema = json.loads(r.grammar().source)
    calls = schema["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and calls["items"]["properties"]["name"] == {"const": "weather"}
    assert "weather" in r.tool_prompt() and "set_light" not in r.tool_prompt()


def test_tool_history_is_rendered_back():
    msgs = [{"role": "user", "content": "lights?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "set_light",
                                                                  "arguments": '{"room":"hall","on":true}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    r = parse(messages=msgs, tools=[LIGHT])
    (q, imgs, a), = r.conversation.history
    assert json.loads(a) == {"tool_calls": [{"name": "set_light", "arguments": {"room": "hall", "on": True}}]}
    assert json.loads(r.conversation.text) == {"tool_response": {"tool_call_id": "call_1", "name": "set_light",
                                                                   "content": "done"}}
    r = parse(messages=msgs + [{"role": "user", "content": "and now?"}], tools=[LIGHT])
    assert r.conversation.text.endswith("\nand now?") and "tool_response" in r.conversation.text
    with pytest.raises(RequestError, match="unknown tool_call_id"):
        parse(messages=msgs[:2] + [{"role": "tool", "tool_call_id": "call_9", "content": "x"}], tools=[LIGHT])
    with pytest.raises(RequestError, match="not supported here"):
        parse(structured=False, messages=msgs)


# --- the convention and the reply -----------------------------------------------------------------------
def test_output_becomes_openai_tool_calls_or_content():
    tools = T.parse_tools([LIGHT])
    req = parse(tools=[LIGHT])
    msg, finish = assistant_message('{"tool_calls":[{"name":"set_light","arguments":{"room":"hall","on":false}}]}',
                                    "eos", req)
    (call,) = msg["tool_calls"]
    assert finish == "tool_calls" and msg["content"] is None and call["id"].startswith("call_")
    assert call["function"]["name"] == "set_light" and call["function"]["arguments"] == '{"room":"hall","on":false}'
    assert assistant_message('{"response":"hello"}', "eos", req) == (
        {"role": "assistant", "content": "hello", "refusal": None}, "stop")
    assert assistant_message('{"tool_calls":[{"na', "length", req)[0]["content"] == '{"tool_calls":[{"na'
    assert assistant_message("I cannot help with this image.", "refused", req, refused=True) == (
        {"role": "assistant", "content": None, "refusal": "I cannot help with this image."}, "content_filter")
    deltas = tool_call_deltas(msg["tool_calls"])
    assert deltas[0]["tool_calls"][0]["index"] == 0 and deltas[0]["tool_calls"][0]["id"] == call["id"]
    assert T.parse_output("free text", tools, T.ToolChoice("none")) == ("free text", ())


# --- on the demo model: calls generated under the grammar validate --------------------------------------
@pytest.mark.parametrize("choice,parallel", [("required", True), ("auto", False),
                                              ({"type": "function", "function": {"name": "weather"}}, True)])
def test_generated_tool_calls_validate(choice, parallel):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("torch")
    from test_grammar import Demo
    demo = _demo(Demo)
    req = parse(tools=[LIGHT, WEATHER], tool_choice=choice, parallel_tool_calls=parallel)
    res = demo.run(req.tool_prompt() + "\nTurn on the hall light.", req.grammar(), max_new_tokens=120)
    msg, finish = assistant_message(res.text, res.finish_reason, req)
    if res.finish_reason == "length":           # auto's free-text answer is an unbounded string: random weights
        assert choice == "auto" and res.text.startswith('{"response":"') and finish == "length"
        assert "tool_calls" not in msg and msg["content"] == res.text
        return
    assert res.finish_reason == "eos", res.text
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (LIGHT, WEATHER)}
    if msg.get("tool_calls"):
        assert finish == "tool_calls" and (parallel or len(msg["tool_calls"]) == 1)
        for c in msg["tool_calls"]:
            jsonschema.validate(json.loads(c["function"]["arguments"]), schemas[c["function"]["name"]])
            assert not isinstance(choice, dict) or c["function"]["name"] == "weather"
    else:
        assert choice == "auto" and isinstance(msg["content"], str)


_DEMO = []


def _demo(cls):
    if not _DEMO:
        _DEMO.append(cls())
    return _DEMO[0]
