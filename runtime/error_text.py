"""How an error reaches a user: one line.

Library code raises typed exceptions whose message is one line; where a message comes from elsewhere (a
third-party library, the OS) :func:`one_line` keeps its first line, or the exception's type when it has no
message. Used by every command's ``main()`` and by the library wherever it wraps another library's error.
Torch-free, so both the runtime and the exporter import it.
"""
from __future__ import annotations

__all__ = ["one_line"]


def one_line(e: BaseException) -> str:
    """The first line of ``str(e)`` (stripped), or the exception's type name when the message is empty."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__
