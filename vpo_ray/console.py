"""A readable terminal for long commands: everything else goes to a log file, the terminal
gets one line per stage and a table at the end.

`output_to_file(path)` points the process's stdout and stderr (file descriptors 1 and 2,
so also Ray's, DeepSpeed's and C++ libraries' output, and that of the processes started
meanwhile, such as Ray's workers) at `path`, and hands back a stream to the real terminal.
`StageLine` writes "[2/5] train SFT ... 8 steps, loss 6.93 -> 6.10 (61 s)" as one line.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import IO, Iterator, Sequence


@contextlib.contextmanager
def output_to_file(path: str) -> Iterator[IO[str]]:
    """Inside: fds 1 and 2 append to `path`; yields a line-buffered stream to the old stdout."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    console = os.fdopen(os.dup(saved[0]), "w", buffering=1)
    with open(path, "ab", buffering=0) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            yield console
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            console.close()


class StageLine:
    """One terminal line per stage: its number, what it does, then what came out and how long."""

    def __init__(self, out: IO[str], total: int):
        self.out, self.total, self.n = out, total, 0
        self.t0 = 0.0

    def begin(self, what: str) -> None:
        self.n += 1
        self.t0 = time.perf_counter()
        self.out.write(f"[{self.n}/{self.total}] {what} ... ")
        self.out.flush()

    def end(self, result: str) -> float:
        seconds = time.perf_counter() - self.t0
        self.out.write(f"{result} ({seconds:.0f} s)\n")
        self.out.flush()
        return seconds


def table(rows: Sequence[Sequence[object]]) -> str:
    """Rows (the first is the header) as aligned text columns; numbers right-aligned."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]

    def fmt(row: list[str], header: bool) -> str:
        out = []
        for i, v in enumerate(row):
            numeric = not header and i > 0 and v.replace(".", "", 1).lstrip("-").isdigit()
            out.append(v.rjust(widths[i]) if numeric else v.ljust(widths[i]))
        return "  ".join(out).rstrip()

    return "\n".join(fmt(r, i == 0) for i, r in enumerate(cells))
