"""Parsing and validation of ``POST /v1/chat/completions`` bodies (OpenAI chat format), without a web framework.

Supported: a conversation (``conversation.py``: system/developer prompt, alternating user and assistant turns,
ending with a user message). A user message's ``content`` is a string or a list of parts:
``{"type": "text", "text": ...}`` (joined with newlines) and at most one
``{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`` (``cache_control`` on a part is ignored).
An image with no text is asked :data:`IMAGE_ONLY_QUESTION` (the pipeline refuses an empty prompt).
Images come inline as base64 ``data:`` URIs; ``http(s)`` URLs only when the server allows remote images
(refused by default: an offline kiosk must not fetch the network, and a server that fetches what a client
names is an SSRF hole; see ``runtime/fetch.py``); other schemes never.

Sampling fields: ``max_tokens`` / ``max_completion_tokens``, ``temperature`` (default 0 = greedy, unlike
OpenAI's 1: a kiosk wants the same answer twice), ``top_p``, ``seed``, ``stop``, ``stream``,
``stream_options.include_usage``. Structured output and tools (``runtime/tools.py``, only where the caller
passes ``structured=True``, else refused unless neutral): ``response_format`` (text / json_object /
json_schema, the schema checked by the grammar engine: a 400 ``unsupported_schema`` names the keyword it cannot
compile), ``tools`` (function tools), ``tool_choice``, ``parallel_tool_calls``; in the history, an assistant
message's ``tool_calls`` and ``tool`` messages answering them (rendered back in the tool convention's form).
OpenAI fields that change nothing here are accepted only at their neutral value (``n`` = 1, penalties 0,
``logprobs`` false, ``top_logprobs`` 0, ``logit_bias`` {}, text-only ``modalities``); ``user``, ``metadata``,
``safety_identifier``, ``store`` and ``service_tier`` are accepted and ignored, as are unknown
``stream_options`` keys. ``null`` for an
optional field means absent, in the body, in a message and in a content part (typed clients such as LangChain
and LlamaIndex send ``tools: null``, ``tool_calls: null``). Any other field is refused by name, so a client
never believes a setting took effect when it did not. Text that is not valid Unicode (a lone surrogate, as a
browser sends when it cuts a string mid-emoji) is a 400.

Every problem raises :class:`RequestError` (HTTP status, one-line message, OpenAI error code and param).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

from .. import tools as T

SUPPORTED_FIELDS = ("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                    "temperature", "top_p", "seed", "stop", "n", "presence_penalty", "frequency_penalty",
                    "logprobs", "top_logprobs", "logit_bias", "response_format", "modalities", "user", "metadata",
                    "safety_identifier", "store", "service_tier", "parallel_tool_calls", "tools", "tool_choice")
IMAGE_ONLY_QUESTION = "Describe this image."     # the question an image sent without text is asked
_NEUTRAL = {                     # accepted only at the value that changes nothing (null is always neutral)
    "n": lambda v: v == 1 and not isinstance(v, bool),
    "presence_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "frequency_penalty": lambda v: v == 0 and not isinstance(v, bool),
    "logprobs": lambda v: v is False,
    "top_logprobs": lambda v: v == 0 and not isinstance(v, bool),
    "logit_bias": lambda v: v == {},
    "modalities": lambda v: v == ["text"],
}
# Server limits (create_app / safeclip-serve flags); here so the CLI can show them without importing FastAPI.
DEFAULTS = dict(max_body_bytes=16 * 1024 * 1024, max_pixels=16_000_000, max_queue=8, max_tokens=1024,
                default_max_tokens=256, max_prompt_chars=16_000, queue_timeout_s=120.0, body_timeout_s=30.0,
                fetch_timeout_s=10.0, prefix_cache_mb=256)
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_DATA_HEADER = 256             # "data:image/png;base64," and parameters: the comma must come this early
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 503: "service_unavailable"}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape; a 4xx is never typed ``server_error``."""
    kind = _ERROR_TYPES.get(status, "invalid_request_error" if 400 <= status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


class RequestError(ValueError):
    """A request the server answers with a 4xx: ``status``, one-line message, OpenAI ``code`` and ``param``."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


@dataclass(frozen=True)
class ChatRequest:
    model: str | None
    conversation: "Conversation"     # system, history, the new question and its images
    stream: bool
    include_usage: bool
    max_tokens: int | None           # None: the server's default
    temperature: float
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...]
    response_format: T.ResponseFormat | None = None     # None: absent (free text)
    tools: tuple[T.Tool, ...] = ()
    tool_choice: T.ToolChoice = T.ToolChoice("none")
    parallel_tool_calls: bool = True

    def grammar(self):
        """The ``grammar.Grammar`` the answer must follow (None: free text): ``tools.output_grammar``."""
        return T.output_grammar(self.response_format, self.tools, self.tool_choice, self.parallel_tool_calls)

    def tool_prompt(self) -> str:
        """The tool convention's system prompt text ("" without callable tools): ``tools.tool_system_prompt``."""
        return T.tool_system_prompt(self.tools, self.tool_choice, self.parallel_tool_calls)


def _show(v, limit: int = 60) -> str:
    """``v`` as JSON for an error message: whole, or described when long (never cut mid-JSON)."""
    text = json.dumps(v, ensure_ascii=True)
    return text if len(text) <= limit else f"a {type(v).__name__} of {len(text)} JSON characters"


def _present(obj: dict) -> dict:
    """``obj`` without its null-valued keys: null for an optional field means absent."""
    return {k: v for k, v in obj.items() if v is not None}


def _bad(message: str, param: str | None = None, code: str = "invalid_request", status: int = 400):
    return RequestError(status, message, code, param)


def parse_json_body(body: bytes) -> dict:
    """The body as a JSON object, or a 400 naming what is wrong with it."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        text = body.decode("utf-8")
        data = json.loads(text, parse_constant=no_constants)
    except UnicodeDecodeError:
        raise _bad("malformed JSON: the body is not UTF-8", code="invalid_json") from None
    except RecursionError:
        raise _bad("malformed JSON: nested too deeply", code="invalid_json") from None
    except ValueError as e:                           # json.JSONDecodeError is a ValueError
        raise _bad(f"malformed JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise _bad(f"the body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:                                              # "\ud800" parses, but no text that holds it can be encoded
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise _bad("invalid Unicode: the body holds a lone surrogate (a string cut mid-character?)",
                   code="invalid_unicode") from None
    return data


def _int(v, name: str, lo: int, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"'{name}' must be an integer", name)
    if v < lo or (hi is not None and v > hi):
        raise _bad(f"'{name}' must be between {lo} and {hi}, got {v}" if hi is not None
                   else f"'{name}' must be at least {lo}, got {v}", name)
    return v


def _number(v, name: str, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"'{name}' must be a number", name)
    if v > hi or v < lo or (lo_open and v == lo):
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return float(v)


def decode_data_uri(url: str, param: str = "messages.content.image_url") -> bytes:
    """The bytes of a base64 ``data:image/...;base64,...`` URI (400 on anything else). Linear time."""
    comma = url.find(",", 0, MAX_DATA_HEADER)
    if not url[:5].lower() == "data:" or comma < 0:
        raise _bad("malformed data: URI (expected data:image/<type>;base64,<data>)", param, "invalid_image")
    mime, *params = [p.strip().lower() for p in url[5:comma].split(";")]
    if mime and not mime.startswith("image/"):
        raise _bad(f"data: URI of type '{mime[:40]}' is not an image", param, "invalid_image")
    if "base64" not in params:
        raise _bad("data: URI must be base64-encoded (';base64,')", param, "invalid_image")
    payload = url[comma + 1:].encode("ascii", "replace").translate(None, b" \t\r\n\f\v")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("data: URI holds invalid base64", param, "invalid_image") from None
    if not data:
        raise _bad("data: URI holds an empty image", param, "invalid_image")
    return data


def _image_source(part: dict, allow_remote: bool, where: str):
    spec = part.get("image_url")
    if isinstance(spec, dict):
        spec = _present(spec)
        extra = set(spec) - {"url", "detail"}
        if extra:
            raise _bad(f"unknown field '{sorted(extra)[0]}' in {where}.image_url", f"{where}.image_url")
        url = spec.get("url")
        if spec.get("detail") not in (None, "auto", "low", "high"):
            raise _bad("'detail' must be auto, low or high", f"{where}.image_url.detail")
    else:
        url = spec                                    # some clients send the URL itself
    if not isinstance(url, str) or not url:
        raise _bad(f"{where}.image_url needs a 'url' string", f"{where}.image_url")
    scheme = url.split(":", 1)[0].strip().lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_uri(url, f"{where}.image_url")
    if scheme in ("http", "https"):
        if not allow_remote:
            raise _bad("remote image URLs are refused: this server does not fetch the network; send the image "
                       "inline as a data: URI (data:image/jpeg;base64,...)", f"{where}.image_url",
                       "remote_image_refused")
        return url
    raise _bad(f"unsupported image URL scheme '{scheme or url[:16]}' (use a data: URI)", f"{where}.image_url",
               "invalid_image")


def _user_content(content, allow_remote: bool) -> tuple[str, bytes | str | None]:
    if isinstance(content, str):
        return content, None
    if not isinstance(content, list) or not content:
        raise _bad("message 'content' must be a string or a non-empty list of parts", "messages.content")
    texts: list[str] = []
    image = None
    for i, part in enumerate(content):
        where = f"messages.content[{i}]"
        if not isinstance(part, dict):
            raise _bad(f"{where} must be an object", where)
        part = _present(part)
        kind = part.get("type")
        allowed = {"text": {"type", "text", "cache_control"},
                   "image_url": {"type", "image_url", "cache_control"}}.get(kind if isinstance(kind, str)
                                                                                      else None)
        if allowed is None:
            raise _bad(f"{where}: unsupported content part type {kind!r} (supported: text, image_url)", where)
        extra = set(part) - allowed
        if extra:
            raise _bad(f"unknown field {_show(sorted(extra)[0])} in {where}", where)
        if kind == "text":
            if not isinstance(part.get("text"), str):
                raise _bad(f"{where}.text must be a string", where)
            texts.append(part["text"])
        else:
            if image is not None:
                raise _bad("only one image per message is supported", where, "too_many_images")
            image = _image_source(part, allow_remote, where)
    return "\n".join(texts), image


# -- the conversation (its rules: conversation.py's docstring) ----------------------------------------------
MAX_IMAGES = 8                   # images in one request's whole conversation (each is decoded and gated)
_FIELDS = {"system": {"role", "content", "name"}, "developer": {"role", "content", "name"},
           "user": {"role", "content", "name"},
           "assistant": {"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"},
           "tool": {"role", "content", "tool_call_id", "name"}}


@dataclass(frozen=True)
class Conversation:
    system: str | None
    history: tuple[tuple[str, tuple, str], ...]     # (question, image sources, answer) of each earlier turn; tool
    #   results are a question (tools.render_tool_results), assistant tool calls an answer (render_tool_calls)
    text: str                                        # the new question
    images: tuple                                    # its image sources (data-URI bytes or remote URLs)
    chars: int                                       # characters of text in all messages

    @property
    def sources(self) -> list:
        """Every image source in conversation order (history first)."""
        return [src for _, srcs, _ in self.history for src in srcs] + list(self.images)


def _unsupported(message: str) -> RequestError:
    return _bad(message, "messages", "unsupported_conversation")


def _text_content(content, i: int, role: str) -> str:
    """The text of a system or assistant message (images and other parts refused by name)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
    texts = []
    for j, part in enumerate(content):
        part = _present(part) if isinstance(part, dict) else part
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("image_url", "input_image", "image"):
            raise _unsupported(f"messages[{i}]: a {role} message cannot hold an image (the chat template renders "
                               "images in user turns only)")
        key = "refusal" if kind == "refusal" and role == "assistant" else "text" if kind == "text" else None
        if key is None or not isinstance(part.get(key), str) or set(part) - {"type", key, "cache_control"}:
            raise _bad(f"messages[{i}].content[{j}] must be a text part ({{\"type\": \"text\", \"text\": ...}})",
                       "messages")
        texts.append(part[key])
    return "\n".join(texts)


def parse_messages(messages, allow_remote: bool, tools: bool = False) -> Conversation:
    """A validated :class:`Conversation`, or a :class:`RequestError` naming the message at fault; ``tools``:
    assistant ``tool_calls`` and ``tool`` messages are accepted (else refused: the route has no tools)."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[list] = []                    # [question, sources, answer]
    expect, chars, n_images = "user", 0, 0
    calls: dict[str, str] = {}                # the last assistant message's tool calls: id -> function name
    results: list | None = None               # the tool results of the turn being read
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {type(m).__name__}", "messages")
        m = _present(m)
        role = m.get("role")
        if role == "function":
            raise _unsupported(f"messages[{i}]: role 'function' (the deprecated function-calling API) is not "
                               "supported: use 'tool' messages")
        if not isinstance(role, str) or role not in _FIELDS:
            raise _bad(f"messages[{i}]: unknown role {_show(role)} (supported: system, developer, user, "
                       "assistant, tool)", "messages")
        extra = set(m) - _FIELDS[role]
        if extra:
            raise _bad(f"unknown field {_show(sorted(extra)[0])} in messages[{i}]", "messages")
        if not tools and (role == "tool" or m.get("tool_calls") is not None):
            raise _unsupported(f"messages[{i}]: tool messages and assistant tool calls are not supported here")
        if m.get("function_call") is not None:
            raise _unsupported(f"messages[{i}]: assistant 'function_call' (deprecated) is not supported: use "
                               "'tool_calls'")
        if role == "tool":
            cid, content = m.get("tool_call_id"), m.get("content")
            if cid not in calls:
                raise _unsupported(f"messages[{i}]: a tool message must answer a tool call of the assistant "
                                   f"message before it (unknown tool_call_id {_show(cid)})")
            text = content if isinstance(content, str) else _text_content(content, i, role) \
                if content is not None else ""
            if results is None:                    # the results of one assistant message make one user turn
                if expect != "user":
                    raise _unsupported(f"messages[{i}]: tool results must follow the assistant's tool calls")
                results = []
                turns.append(["", (), None])
                expect = "assistant"
            results.append((cid, calls[cid], text))
            turns[-1][0] = T.render_tool_results(results)
            chars += len(text)
            continue
        if role == "user" and results is not None and turns and turns[-1][2] is None:
            # a user message right after tool results joins their turn (the template alternates roles)
            text, image = _user_content(m["content"], allow_remote) if "content" in m else ("", None)
            if image is not None:
                raise _unsupported(f"messages[{i}]: an image right after tool results is not supported")
            turns[-1][0] += "\n" + text
            chars += len(text)
            results = None
            continue
        results = None
        if m.get("audio") is not None:
            raise _unsupported(f"messages[{i}]: assistant audio is not supported")
        if role in ("system", "developer"):
            if turns:
                raise _unsupported(f"messages[{i}]: a {role} message must come before the conversation (the chat "
                                   "template has one system prompt, at the start)")
            if "content" not in m:
                raise _bad(f"messages[{i}] has no 'content'", "messages")
            system.append(_text_content(m["content"], i, role))
            chars += len(system[-1])
            continue
        if role != expect:
            if not turns:
                raise _unsupported(f"messages[{i}]: the conversation must begin with a user message, got "
                                   f"'{role}'")
            raise _unsupported(f"messages[{i}]: two {role} messages in a row (the chat template alternates user "
                               "and assistant turns)")
        if role == "user":
            if "content" not in m:
                raise _bad(f"messages[{i}] has no 'content'", "messages")
            text, image = _user_content(m["content"], allow_remote)
            images = () if image is None else (image,)
            n_images += len(images)
            if n_images > MAX_IMAGES:
                raise _bad(f"a request may carry at most {MAX_IMAGES} images", "messages", "too_many_images")
            if not text.strip():
                if not images:
                    raise _bad(f"messages[{i}]: the user message is empty: add a text part with the question"
                               if len(messages) > 1 else "the prompt is empty: add a text part with the question",
                               "messages")
                text = IMAGE_ONLY_QUESTION
            turns.append([text, images, None])
            expect = "assistant"
        else:
            content = m.get("content")
            text = "" if content is None else _text_content(content, i, role)
            if not text and isinstance(m.get("refusal"), str):
                text = m["refusal"]
            calls = {}
            if m.get("tool_calls") is not None:
                try:
                    text = T.render_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
                except T.SpecError as e:
                    raise _bad(str(e), "messages") from None
                calls = {c["id"]: c["function"]["name"] for c in m["tool_calls"] if isinstance(c.get("id"), str)}
            elif content is None and "refusal" not in m:
                raise _bad(f"messages[{i}] has no 'content'", "messages")
            turns[-1][2] = text
            expect = "user"
        chars += len(text)
    if not turns:
        raise _unsupported("the conversation has no user message")
    if expect == "user":
        raise _unsupported("the last message must be the user's or a tool result (continuing an assistant "
                           "message is not supported)")
    *history, (text, images, _) = turns
    return Conversation("\n".join(system) if system else None, tuple((q, s, a) for q, s, a in history), text,
                        images, chars)


def parse_chat_request(data: dict, *, allow_remote_images: bool, max_prompt_chars: int,
                       max_tokens_limit: int, structured: bool = False) -> ChatRequest:
    """A validated :class:`ChatRequest` from a parsed JSON body, or :class:`RequestError`.

    ``structured``: the caller applies ``ChatRequest.grammar()`` and the tool convention; without it a non-text
    ``response_format``, ``tools`` and a ``tool_choice`` other than none are refused by name (a route that
    would ignore them must not let a client believe they took effect)."""
    data = _present(data)
    if not structured:
        for name, off, code in (("response_format", lambda v: v == {"type": "text"}, "unsupported_value"),
                                ("tools", lambda v: False, "unsupported_field"),
                                ("tool_choice", lambda v: v == "none", "unsupported_field")):
            if data.get(name) is not None and not off(data[name]):
                raise _bad(f"'{name}' = {_show(data[name])} is not supported by this server", name, code)
    unknown = [k for k in data if k not in SUPPORTED_FIELDS]
    if unknown:
        raise _bad(f"unsupported field {_show(unknown[0])} (this server accepts: {', '.join(SUPPORTED_FIELDS)})",
                   unknown[0], "unsupported_field")
    for name, neutral in _NEUTRAL.items():
        if data.get(name) is not None and not neutral(data[name]):
            raise _bad(f"'{name}' = {_show(data[name])} is not supported by this server", name,
                       "unsupported_value")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("'model' must be a string", "model")
    if "messages" not in data:
        raise _bad("'messages' is required", "messages")
    conv = parse_messages(data["messages"], allow_remote_images, tools=structured)
    if conv.chars > max_prompt_chars:
        raise _bad(f"messages of {conv.chars} characters exceed the limit of {max_prompt_chars}", "messages",
                   "context_length_exceeded")
    stream = data.get("stream")
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    include_usage = False
    opts = data.get("stream_options")
    if opts is not None:
        if not stream:
            raise _bad("'stream_options' is only allowed with stream: true", "stream_options")
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        if opts.get("include_usage") not in (None, True, False):
            raise _bad("'stream_options.include_usage' must be true or false", "stream_options")
        include_usage = opts.get("include_usage") is True
    mt, mct = data.get("max_tokens"), data.get("max_completion_tokens")
    if mt is not None and mct is not None and mt != mct:
        raise _bad("'max_tokens' and 'max_completion_tokens' disagree", "max_tokens")
    name = "max_tokens" if mt is not None else "max_completion_tokens"
    max_tokens = None if (mt if mt is not None else mct) is None else \
        _int(mt if mt is not None else mct, name, 1, max_tokens_limit)
    t = data.get("temperature")
    temperature = 0.0 if t is None else _number(t, "temperature", 0.0, 2.0)
    tp = data.get("top_p")
    top_p = None if tp is None else _number(tp, "top_p", 0.0, 1.0, lo_open=True)
    seed = data.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("'seed' must be an integer", "seed")
        seed &= (1 << 64) - 1                        # numpy wants a non-negative seed; OpenAI allows any int
    stop = data.get("stop")
    stops: tuple[str, ...] = ()
    if stop is not None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
        if stops is None or not all(isinstance(s, str) and s for s in stops):
            raise _bad("'stop' must be a non-empty string or a list of them", "stop")
        if len(stops) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise _bad(f"'stop' takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters", "stop")
    for name in ("user", "safety_identifier"):
        if data.get(name) is not None and not isinstance(data[name], str):
            raise _bad(f"'{name}' must be a string", name)
    if data.get("metadata") is not None and not isinstance(data["metadata"], dict):
        raise _bad("'metadata' must be an object", "metadata")
    for name in ("store", "parallel_tool_calls"):
        if data.get(name) is not None and not isinstance(data[name], bool):
            raise _bad(f"'{name}' must be true or false", name)
    if data.get("service_tier") is not None and not isinstance(data["service_tier"], str):
        raise _bad("'service_tier' must be a string", "service_tier")
    try:
        fmt = T.parse_response_format(data.get("response_format"))
        tools = T.parse_tools(data.get("tools"))
        choice = T.parse_tool_choice(data.get("tool_choice"), tools)
    except T.SpecError as e:
        raise _bad(str(e), e.param, "unsupported_schema" if e.keyword else "invalid_request") from None
    return ChatRequest(model, conv, stream, include_usage, max_tokens, temperature, top_p, seed, stops, fmt, tools,
                       choice, data.get("parallel_tool_calls") is not False)
