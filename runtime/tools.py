"""Structured output and function calling as OpenAI clients send them: parsing, the tool convention, the grammar.

    fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "a", "schema": {...}}})
    tools = parse_tools([{"type": "function", "function": {"name": "set_light", "parameters": {...}}}])
    choice = parse_tool_choice("auto", tools)
    grammar = output_grammar(fmt, tools, choice, parallel=True)       # grammar.Grammar, or None: free text
    system = tool_system_prompt(tools, choice, parallel=True)        # appended to the system prompt
    content, calls = parse_output(text, tools, choice)                 # after generation

The tool convention (LLaVA-1.5's and LLaVA-NeXT's chat templates do not render ``tools``), as llama.cpp's
generic tool handler does it: the tool schemas go into the system prompt, with the answer's JSON form, and the
answer is constrained by a grammar to exactly that form:

* ``tool_choice`` ``required``: ``{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}``, every call one
  of the tools with arguments that follow its ``parameters`` schema (one call when ``parallel_tool_calls`` is
  false, at most :data:`MAX_PARALLEL` otherwise); a named function: the same with that function only;
* ``auto``: either of the above or ``{"response": "..."}`` (a plain answer);
* ``none``: free text (or the ``response_format``), the tools are not shown.

Earlier turns go back to the model in the same form: an assistant message's ``tool_calls`` as the JSON above,
``tool`` messages as a user turn ``{"tool_response": {"tool_call_id": ..., "name": ..., "content": ...}}``
(one per line for several). Everything here raises :class:`SpecError` (``param`` names the field at fault).
Standard library + runtime/grammar.py.
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from .grammar import Grammar, GrammarError, check

__all__ = ["SpecError", "ResponseFormat", "Tool", "ToolChoice", "ToolCall", "parse_response_format", "parse_tools",
           "parse_tool_choice", "output_grammar", "tool_system_prompt", "parse_output", "render_tool_calls",
           "render_tool_results", "active_tools", "Structured", "structured", "MAX_PARALLEL", "MAX_TOOLS"]

MAX_TOOLS = 64                  # OpenAI's limit is 128; a small model's prompt cannot hold more anyway
MAX_PARALLEL = 8                # calls in one answer when parallel_tool_calls is true (bounds the grammar)
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")      # OpenAI's function-name rule


class SpecError(ValueError):
    """A bad ``response_format`` / ``tools`` / ``tool_choice`` / tool message; ``param`` names the field,
    ``keyword`` the unsupported JSON Schema keyword where there is one."""

    def __init__(self, message: str, param: str, keyword: str | None = None):
        super().__init__(message)
        self.param, self.keyword = param, keyword


@dataclass(frozen=True)
class ResponseFormat:
    kind: str                       # "text" | "json_object" | "json_schema"
    name: str | None = None
    schema: str | None = None       # the schema as JSON text (the dataclass stays hashable and frozen)
    strict: bool = False

    def grammar(self) -> Grammar | None:
        if self.kind == "json_schema":
            return Grammar.json_schema(json.loads(self.schema))
        return Grammar.json_object() if self.kind == "json_object" else None


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: str                 # JSON Schema of the arguments, as JSON text
    strict: bool = False


@dataclass(frozen=True)
class ToolChoice:
    mode: str                       # "none" | "auto" | "required" | "function"
    name: str | None = None         # the function when mode == "function"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str                  # JSON text, as OpenAI sends it

    def as_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _obj(v, param: str) -> dict:
    if not isinstance(v, dict):
        raise SpecError(f"'{param}' must be an object", param)
    return {k: x for k, x in v.items() if x is not None}


def _only(d: dict, allowed: set, param: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise SpecError(f"unknown field '{extra[0]}' in '{param}'", param)


def _schema(schema, param: str) -> str:
    """A JSON schema checked by the grammar engine, as JSON text; names the unsupported keyword."""
    if not isinstance(schema, dict):
        raise SpecError(f"'{param}' must be a JSON Schema object", param)
    try:
        check(Grammar.json_schema(schema))
    except GrammarError as e:
        raise SpecError(f"'{param}': {e}", param, e.keyword) from None
    return json.dumps(schema, separators=(",", ":"))


def parse_response_format(v) -> ResponseFormat | None:
    """OpenAI's ``response_format``: ``{"type": "text" | "json_object" | "json_schema", ...}`` (None: absent)."""
    if v is None:
        return None
    d = _obj(v, "response_format")
    kind = d.get("type")
    if kind in ("text", "json_object"):
        _only(d, {"type"}, "response_format")
        return ResponseFormat(kind)
    if kind != "json_schema":
        raise SpecError(f"'response_format.type' must be text, json_object or json_schema, got {kind!r}",
                        "response_format.type")
    _only(d, {"type", "json_schema"}, "response_format")
    js = _obj(d.get("json_schema"), "response_format.json_schema")
    _only(js, {"name", "schema", "strict", "description"}, "response_format.json_schema")
    name = js.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise SpecError("'response_format.json_schema.name' must be 1-64 letters, digits, '_' or '-'",
                        "response_format.json_schema.name")
    strict = js.get("strict", False)
    if not isinstance(strict, bool):
        raise SpecError("'response_format.json_schema.strict' must be true or false",
                        "response_format.json_schema.strict")
    schema = _schema(js.get("schema", {"type": "object"}), "response_format.json_schema.schema")
    return ResponseFormat("json_schema", name, schema, strict)


def parse_tools(v) -> tuple[Tool, ...]:
    """OpenAI's ``tools``: a list of ``{"type": "function", "function": {name, description, parameters,
    strict}}`` (other tool types are refused by name)."""
    if v is None:
        return ()
    if not isinstance(v, list) or not v:
        raise SpecError("'tools' must be a non-empty list", "tools")
    if len(v) > MAX_TOOLS:
        raise SpecError(f"at most {MAX_TOOLS} tools are supported, got {len(v)}", "tools")
    out, seen = [], set()
    for i, t in enumerate(v):
        where = f"tools[{i}]"
        t = _obj(t, where)
        if t.get("type") != "function":
            raise SpecError(f"'{where}.type' must be 'function' (got {t.get('type')!r}): only function tools "
                            "are supported", f"{where}.type")
        _only(t, {"type", "function"}, where)
        f = _obj(t.get("function"), f"{where}.function")
        _only(f, {"name", "description", "parameters", "strict"}, f"{where}.function")
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise SpecError(f"'{where}.function.name' must be 1-64 letters, digits, '_' or '-'",
                            f"{where}.function.name")
        if name in seen:
            raise SpecError(f"two tools are named '{name}'", f"{where}.function.name")
        seen.add(name)
        desc = f.get("description", "")
        if not isinstance(desc, str):
            raise SpecError(f"'{where}.function.description' must be a string", f"{where}.function.description")
        strict = f.get("strict", False)
        if not isinstance(strict, bool):
            raise SpecError(f"'{where}.function.strict' must be true or false", f"{where}.function.strict")
        params = _schema(f.get("parameters", {"type": "object", "properties": {}}), f"{where}.function.parameters")
        out.append(Tool(name, desc, params, strict))
    return tuple(out)


def parse_tool_choice(v, tools: tuple[Tool, ...]) -> ToolChoice:
    """OpenAI's ``tool_choice``: ``none`` / ``auto`` / ``required`` / ``{"type": "function", "function":
    {"name": ...}}``; absent: ``auto`` with tools, ``none`` without (OpenAI's defaults)."""
    if v is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(v, str):
        if v not in ("none", "auto", "required"):
            raise SpecError(f"'tool_choice' must be none, auto, required or a function, got {v!r}", "tool_choice")
        if v != "none" and not tools:
            raise SpecError(f"'tool_choice' = '{v}' needs 'tools'", "tool_choice")
        return ToolChoice(v)
    d = _obj(v, "tool_choice")
    _only(d, {"type", "function"}, "tool_choice")
    f = _obj(d.get("function"), "tool_choice.function") if d.get("type") == "function" else None
    if f is None or not isinstance(f.get("name"), str):
        raise SpecError("'tool_choice' must be {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice")
    if f["name"] not in {t.name for t in tools}:
        raise SpecError(f"'tool_choice' names '{f['name']}', which is not in 'tools'", "tool_choice")
    return ToolChoice("function", f["name"])


def _calls_schema(tools: tuple[Tool, ...], parallel: bool) -> dict:
    one = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": t.name}, "arguments": json.loads(t.parameters)}} for t in tools]
    items = one[0] if len(one) == 1 else {"anyOf": one}
    return {"type": "object", "additionalProperties": False, "required": ["tool_calls"],
            "properties": {"tool_calls": {"type": "array", "items": items, "minItems": 1,
                                          "maxItems": MAX_PARALLEL if parallel else 1}}}


_RESPONSE = {"type": "object", "additionalProperties": False, "required": ["response"],
             "properties": {"response": {"type": "string"}}}


def active_tools(tools: tuple[Tool, ...], choice: ToolChoice) -> tuple[Tool, ...]:
    """The tools the answer may call under ``choice`` (none under ``none``, the named one under a function)."""
    if choice.mode == "none":
        return ()
    return tuple(t for t in tools if t.name == choice.name) if choice.mode == "function" else tools


def output_grammar(fmt: ResponseFormat | None, tools: tuple[Tool, ...], choice: ToolChoice,
                   parallel: bool = True) -> Grammar | None:
    """The grammar the answer must follow: the tool-call form where tools may be called, else the
    ``response_format``'s (None: free text)."""
    active = active_tools(tools, choice)
    if not active:
        return fmt.grammar() if fmt is not None else None
    calls = _calls_schema(active, parallel)
    return Grammar.json_schema(calls if choice.mode != "auto" else {"anyOf": [calls, _RESPONSE]})


def tool_system_prompt(tools: tuple[Tool, ...], choice: ToolChoice, parallel: bool = True) -> str:
    """The tool convention's system prompt text ("" when no tool may be called)."""
    active = active_tools(tools, choice)
    if not active:
        return ""
    specs = "\n".join(json.dumps({"name": t.name, "description": t.description,
                                  "parameters": json.loads(t.parameters)}, ensure_ascii=False) for t in active)
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}' + \
        (', ...]}' if parallel else ']}')
    how = {"auto": f'To call tools answer {call}; to answer directly answer {{"response": "<your answer>"}}.',
           "required": f"Answer with one or more tool calls: {call}.",
           "function": f'Answer with a call of {choice.name}: {call}.'}[choice.mode]
    return f"You can call these tools (JSON Schema of each tool's arguments):\n{specs}\n{how} Answer in JSON only."


def parse_output(text: str, tools: tuple[Tool, ...], choice: ToolChoice) -> tuple[str | None, tuple[ToolCall, ...]]:
    """(content, tool calls) from an answer generated under :func:`output_grammar`. Without active tools the text
    is the content. A tool answer that is not whole JSON (cut by ``max_tokens``) is returned as content."""
    if not active_tools(tools, choice):
        return text, ()
    try:
        data = json.loads(text)
    except ValueError:
        return text, ()
    if isinstance(data, dict) and isinstance(data.get("response"), str) and "tool_calls" not in data:
        return data["response"], ()
    calls = data.get("tool_calls") if isinstance(data, dict) else None
    if not isinstance(calls, list):
        return text, ()
    out = tuple(ToolCall(f"call_{uuid.uuid4().hex[:24]}", str(c.get("name")),
                         json.dumps(c.get("arguments", {}), ensure_ascii=False, separators=(",", ":")))
                for c in calls if isinstance(c, dict))
    return None, out


def render_tool_calls(calls: list[dict], param: str) -> str:
    """An assistant message's OpenAI ``tool_calls`` as the convention's JSON (what the model wrote then)."""
    if not isinstance(calls, list) or not calls:
        raise SpecError(f"'{param}' must be a non-empty list", param)
    out = []
    for j, c in enumerate(calls):
        c = _obj(c, f"{param}[{j}]")
        f = _obj(c.get("function"), f"{param}[{j}].function")
        if c.get("type", "function") != "function" or not isinstance(f.get("name"), str):
            raise SpecError(f"'{param}[{j}]' must be a function call with a name", param)
        args = f.get("arguments", "{}")
        try:
            args = json.loads(args) if isinstance(args, str) else args
        except ValueError:
            raise SpecError(f"'{param}[{j}].function.arguments' is not JSON", param) from None
        out.append({"name": f["name"], "arguments": args})
    return json.dumps({"tool_calls": out}, ensure_ascii=False, separators=(",", ":"))


def render_tool_results(results: list[tuple[str | None, str | None, str]]) -> str:
    """``tool`` messages ((tool_call_id, name, content) each) as one user turn, one JSON line per result."""
    return "\n".join(json.dumps({"tool_response": {"tool_call_id": cid, "name": name, "content": content}},
                                ensure_ascii=False) for cid, name, content in results)


@dataclass(frozen=True)
class Structured:
    """What one turn asks for: the answer's grammar (None: free text), the tool convention's system-prompt text
    ("" without callable tools), and the tools and choice that turn the answer into tool calls."""
    grammar: Grammar | None
    system: str
    tools: tuple[Tool, ...]
    choice: ToolChoice

    def parse(self, text: str) -> tuple[str | None, tuple[ToolCall, ...]]:
        return parse_output(text, self.tools, self.choice)


def structured(response_format=None, tools=None, tool_choice=None, parallel_tool_calls: bool = True) -> Structured:
    """:class:`Structured` from OpenAI-shaped values (dicts and lists, as a client sends them) or already parsed
    ones (:class:`ResponseFormat`, a tuple of :class:`Tool`, :class:`ToolChoice`); raises :class:`SpecError`."""
    fmt = response_format if isinstance(response_format, ResponseFormat) or response_format is None \
        else parse_response_format(response_format)
    if tools is None or (isinstance(tools, tuple) and all(isinstance(t, Tool) for t in tools)):
        tools = tools or ()
    else:
        tools = parse_tools(list(tools))
    choice = tool_choice if isinstance(tool_choice, ToolChoice) else parse_tool_choice(tool_choice, tools)
    parallel = parallel_tool_calls is not False
    return Structured(output_grammar(fmt, tools, choice, parallel), tool_system_prompt(tools, choice, parallel),
                      tools, choice)
