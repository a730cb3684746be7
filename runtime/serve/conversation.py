"""The ``messages`` of a chat-completions request as a conversation, and its answer through ``runtime/chat.py``.

Parsing (``request.parse_messages``, in ``request.py`` with the other request checks) gives a
:class:`~.request.Conversation`; :func:`start_chat` answers it with a :class:`~safeclip.runtime.chat.Chat`.

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
``function`` messages (the deprecated API). Assistant ``tool_calls`` and the ``tool`` messages answering them
are rendered back in the tool convention's form (``runtime/tools.py``): the calls as the assistant's answer,
the results as a user turn, so the conversation may end with tool results. A conversation whose tokens plus
``max_tokens`` do not fit the context is a 400 ``context_length_exceeded`` naming the numbers (raised by
``Chat.ask`` before any vision or language-model work); history is never truncated.
"""
from __future__ import annotations

from .request import MAX_IMAGES, Conversation, parse_messages  # noqa: F401  (re-exported)

__all__ = ["MAX_IMAGES", "Conversation", "parse_messages", "start_chat", "images_json"]


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
