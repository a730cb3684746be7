"""Progress of long runtime work (``safeclip-scan``) on stderr, so a long scan never looks stuck.

- stderr is a terminal: a tqdm bar (items done, rate, time left; the failures so far as a postfix). tqdm is
  a base dependency: pure Python, no dependencies of its own on Linux, a few hundred KB, and what people
  already read in a terminal.
- otherwise (a log file, CI, journald, a pipe): a plain line every ``PLAIN_EVERY_S`` seconds, as the exporter
  prints its steps; a bar's carriage returns would garble such a log. The summary at the end is the caller's.

Only counts pass through here: the verdicts and rows stay with the caller.
"""
from __future__ import annotations

import sys
import time

PLAIN_EVERY_S = 10.0


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


class Progress:
    """``add(done, failed)`` as items finish; ``close()`` at the end (also after an error or Ctrl-C)."""

    def __init__(self, total: int, prog: str, unit: str = "image", stream=None, clock=time.monotonic):
        self.total, self.prog, self.unit = int(total), prog, unit
        self.stream = stream if stream is not None else sys.stderr
        self.clock, self.done, self.failed = clock, 0, 0
        self.t0 = self.last = clock()
        self.bar = None
        isatty = getattr(self.stream, "isatty", None)
        if self.total and isatty is not None and isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, unit=unit, file=self.stream, desc=prog, dynamic_ncols=True,
                            leave=False)

    def add(self, done: int, failed: int = 0) -> None:
        self.done += int(done)
        self.failed += int(failed)
        if self.bar is not None:
            if failed:
                self.bar.set_postfix(failed=self.failed, refresh=False)
            self.bar.update(int(done))
            return
        now = self.clock()
        if now - self.last >= PLAIN_EVERY_S and self.done < self.total:
            self.last = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def write(self, text: str, file=None) -> None:
        """A result line for stdout: with a bar on the terminal, tqdm lifts the bar off, prints and redraws it,
        so JSON lines and the bar never share a line."""
        file = file if file is not None else sys.stdout
        if self.bar is not None:
            from tqdm import tqdm
            tqdm.write(text, file=file)
        else:
            file.write(text + "\n")
        file.flush()

    def line(self, now: float | None = None) -> str:
        dt = max((self.clock() if now is None else now) - self.t0, 1e-9)
        rate = self.done / dt
        left = f", about {(self.total - self.done) / rate:.0f} s left" if rate > 0 else ""
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"{self.prog}: {self.done}/{plural(self.total, self.unit)} ({100 * self.done / max(self.total, 1):.0f}%)"
                f"{failed}, {rate:.1f} {self.unit}s/s{left}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
