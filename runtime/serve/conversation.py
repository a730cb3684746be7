"""The ``messages`` of a chat-completions request as a conversation, and its answer through ``runtime/chat.py``.

Supported: an optional system prompt (one or more leading ``system`` or ``developer`` messages, joined by a
newline: ``developer`` is OpenAI's newer name for the system role, and these templates have one system slot),
then user and assistant messages alternating, starting and ending with a user message. User content is a
string or parts (text, and at most one ``image_url`` per message; an image with no text is asked
:data:`~.request.IMAGE_ONLY_QUESTION`); images may come in any user turn, at most :data:`MAX_IMAGES` per
request, and every one is gated (the verdicts of all of them are reported). System and assistant content is
text (a string, ``text`` parts, an assistant's ``refusal`` part or field). The whole history is rendered by
the bundle's chat template through :class:`~safeclip.runtime.chat.Chat` (``set_history`` + ``ask``), so the
server and the library render a conversation the same way.

Refused by name (400 ``unsupported_conversation``), because the template cannot express them: a system
message after the conversation began, two user or two assistant messages in a row, an assistant message
first or last (continuing an assistant message is not supported), an image in a system or assistant message,
``tool``/``function`` messages and assistant ``tool_calls`` (no tools here). A conversation whose tokens plus
``max_tokens`` do not fit the context is a 400 ``context_length_exceeded`` naming the numbers (raised by
``Chat.ask`` before any vision or language-model work); history is never truncated.
"""
from __future__ import annotations

from dataclasses import dataclass

from .request import IMAGE_ONLY_QUESTION, RequestError, _bad, _present, _show, _user_content

MAX_IMAGES = 8                   # images in one request's whole conversation (each is decoded and gated)
_FIELDS = {"system": {"role", "content", "name"}, "developer": {"role", "content", "name"},
           "user": {"role", "content", "name"},
           "assistant": {"role", "content", "name", "refusal", "tool_calls", "function_call", "audio"}}


@dataclass(frozen=True)
class Conversation:
    system: str | None
    history: tuple[tuple[str, tuple, str], ...]     # (question, image sources, answer) of each earlier turn
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


def parse_messages(messages, allow_remote: bool) -> Conversation:
    """A validated :class:`Conversation`, or a :class:`RequestError` naming the message at fault."""
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    system: list[str] = []
    turns: list[list] = []                    # [question, sources, answer]
    expect, chars, n_images = "user", 0, 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object, got {type(m).__name__}", "messages")
        m = _present(m)
        role = m.get("role")
        if role in ("tool", "function"):
            raise _unsupported(f"messages[{i}]: role '{role}' is not supported (this server has no tools)")
        if not isinstance(role, str) or role not in _FIELDS:
            raise _bad(f"messages[{i}]: unknown role {_show(role)} (supported: system, developer, user, "
                       "assistant)", "messages")
        extra = set(m) - _FIELDS[role]
        if extra:
            raise _bad(f"unknown field {_show(sorted(extra)[0])} in messages[{i}]", "messages")
        if m.get("tool_calls") is not None or m.get("function_call") is not None:
            raise _unsupported(f"messages[{i}]: assistant tool calls are not supported (this server has no tools)")
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
            if content is None and "refusal" not in m:
                raise _bad(f"messages[{i}] has no 'content'", "messages")
            turns[-1][2] = text
            expect = "user"
        chars += len(text)
    if not turns:
        raise _unsupported("the conversation has no user message")
    if expect == "user":
        raise _unsupported("the last message must be the user's (continuing an assistant message is not "
                           "supported)")
    *history, (text, images, _) = turns
    return Conversation("\n".join(system) if system else None, tuple((q, s, a) for q, s, a in history), text,
                        images, chars)


def start_chat(pipe, conv: Conversation, images: list, *, prefix_cache, policy: str | None, max_pixels: int,
               reserve: int, **sampling):
    """The :class:`~safeclip.runtime.chat.ChatStream` of ``conv``'s new turn; ``images`` are the decoded
    ``conv.sources``. Raises what ``Chat.ask`` raises (before any language-model work)."""
    chat = pipe.chat(system=conv.system, prefix_cache=prefix_cache)
    it = iter(images)
    chat.set_history([(q, [next(it) for _ in srcs], a) for q, srcs, a in conv.history], policy=policy,
                     max_pixels=max_pixels)
    now = [next(it) for _ in conv.images]
    return chat.ask(conv.text, now or None, policy=policy, max_pixels=max_pixels, reserve=reserve, **sampling)


def images_json(conv: Conversation, verdicts) -> list[dict]:
    """The verdict of every image of the conversation, with the index of the message that carried it."""
    out, k = [], 0
    for turn, srcs in enumerate([s for _, s, _ in conv.history] + [conv.images]):
        for _ in srcs:
            v = verdicts[k] if k < len(verdicts) else None
            j = {} if v is None else v.to_json()
            out.append({"turn": turn, "flagged": bool(v is not None and v.flagged),
                        "category": None if v is None else v.category, "score": j.get("score")})
            k += 1
    return out
