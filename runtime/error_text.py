"""How an error reaches a user: one line.

Library code raises typed exceptions whose message is one line; where a message comes from elsewhere (a
third-party library, the OS) :func:`one_line` keeps its first line, or the exception's type when it has no
message. Used by every command's ``main()`` and by the library wherever it wraps another library's error.
Torch-free, so both the runtime and the exporter import it.

Every console command follows one pattern: ``main(argv=None) -> int`` parses its arguments, calls the
library, and turns what the library raises into an exit status through :func:`fail` (``PROG: error: <one
line>`` on stderr: usage :data:`EXIT_USAGE`, a failure :data:`EXIT_FAILED`, Ctrl-C :data:`EXIT_INTERRUPTED`);
only ``main`` exits, through ``sys.exit(main())``. Ctrl-C and missing software are told without the
``error:`` label (``label=None``).
"""
from __future__ import annotations

import sys

__all__ = ["one_line", "fail", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


def one_line(e: BaseException) -> str:
    """The first line of ``str(e)`` (stripped), or the exception's type name when the message is empty."""
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def fail(prog: str, problem: BaseException | str, code: int = EXIT_FAILED, label: str | None = "error") -> int:
    """Tell the user why ``prog`` stops, ``prog: error: <one line>`` on stderr, and return ``code``: how a
    console command's ``main()`` reports any failure, without a traceback. ``label=None`` for what is not an
    error of the input (Ctrl-C, software this machine lacks): ``prog: <one line>``."""
    text = problem if isinstance(problem, str) else one_line(problem)
    print(f"{prog}: {text}" if label is None else f"{prog}: {label}: {text}", file=sys.stderr)
    return code
