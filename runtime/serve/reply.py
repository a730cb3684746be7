"""The assistant message of a chat completion in OpenAI's shape: content, structured-output refusal, tool calls.

    msg, finish = assistant_message(text, finish_reason, req, refused=answer.action == "refused")
    for delta in tool_call_deltas(msg["tool_calls"]): ...          # streamed: OpenAI's tool-call deltas

Mapping (``runtime/tools.py`` for the tool convention):

* the gate refused (policy ``refuse``): ``content`` null, the refusal text in ``refusal`` (OpenAI's
  structured-output refusal), no ``tool_calls``, whatever the request asked for: a refusal is never dressed up as
  a schema-valid answer or a tool call;
* tools that may be called: the generated JSON becomes ``tool_calls`` (ids ``call_...``, names, arguments as
  JSON text) with ``finish_reason`` ``tool_calls``, or, for ``{"response": ...}`` under ``auto``, the content;
  an answer cut by ``max_tokens`` before its JSON closed stays content with ``finish_reason`` ``length``;
* otherwise the text is the content (JSON under a ``response_format``).

Streaming: the tool-call JSON is held until it is complete (a call is usable only whole, and the text may still
turn out to be a ``{"response": ...}``), then sent as one delta per call (id, name and the whole arguments), as
OpenAI's clients accumulate them. Standard library only.
"""
from __future__ import annotations

from .. import tools as T

__all__ = ["assistant_message", "tool_call_deltas", "holds_text"]

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "refused": "content_filter"}


def holds_text(req) -> bool:
    """Whether a streamed answer must be held until it ends (tool calls may come) instead of sent piece by piece."""
    return bool(T.active_tools(req.tools, req.tool_choice))


def assistant_message(text: str, finish_reason: str, req, *, refused: bool = False) -> tuple[dict, str]:
    """(OpenAI assistant message, OpenAI finish_reason) for a generated ``text`` ended by ``finish_reason``
    (``generate``'s: eos | stop | length | context | refused) under request ``req`` (``request.ChatRequest``)."""
    finish = FINISH.get(finish_reason, "stop")
    if refused:
        return {"role": "assistant", "content": None, "refusal": text}, finish
    content, calls = T.parse_output(text, req.tools, req.tool_choice)
    msg = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        msg["tool_calls"] = [c.as_openai() for c in calls]
        finish = "tool_calls"
    return msg, finish


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    """Streamed deltas of an answer's ``tool_calls`` (OpenAI's shape: ``index``, then id, type and function)."""
    return [{"tool_calls": [{"index": i, "id": c["id"], "type": "function",
                             "function": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}]}
            for i, c in enumerate(calls)]
