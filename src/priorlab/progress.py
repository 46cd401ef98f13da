"""Every progress bar priorlab shows, through `progress_bar`: a live bar on a terminal, a few plain lines elsewhere.

On a terminal a bar redraws itself in place (tqdm). Written to a file or a pipe (a study's per-run log, a job's
output on a cluster) the same redraws leave one carriage-return-separated line per update and cursor escapes for
nested bars: a 1,200-step fine-tune wrote 165 KB of them. There a `LineBar` prints one whole line at each tenth of
the work instead (`lines` of them), with the total, and nothing else. What decides is whether the stream the bar
writes to is a terminal (`isatty()`), asked once when the bar is made.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm.auto import tqdm as live_tqdm
from tqdm.std import tqdm as std_tqdm

LINE = "{n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_NO_TOTAL = "{n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


def is_terminal(stream: TextIO | None) -> bool:
    """Whether `stream` is a terminal (False for files, pipes, captured output and streams without `isatty`)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineBar(std_tqdm):
    """A tqdm bar that prints whole lines, no carriage returns or cursor moves: one each time the count passes
    another 1/`lines` of the total, and at close the count it stopped at if that line was not printed yet (a
    total unknown, a run stopped early). `lines=0` prints nothing.

    tqdm's own bookkeeping (count, rate, postfix, `tqdm.write`) is kept; only what reaches the stream changes.
    """

    def __init__(self, *args: Any, lines: int = 10, **kwargs: Any):
        self.lines, self._shown, self._printed_n = lines, None, None
        super().__init__(*args, **kwargs)

    def reset(self, total=None) -> None:
        self._shown = None
        super().reset(total)

    def _tenth(self) -> int | None:
        """How many 1/lines of the total the count has passed (None without a total)."""
        if not self.total or self.lines <= 0:
            return None
        return math.floor(self.lines * min(self.n, self.total) / self.total)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        passed = self._tenth()
        if passed is None:
            return True
        if self._shown is None:  # the first display (at creation or reset): the count it starts from
            self._shown = passed if self.n <= self.initial else passed - 1
        if passed > self._shown:
            self._shown = passed
            self._print()
        return True

    def _print(self) -> None:
        desc = (self.desc or "").removesuffix(": ").replace("{", "{{").replace("}", "}}")
        fmt = (f"{desc}: " if desc else "") + (LINE if self.total else LINE_NO_TOTAL)
        line = self.format_meter(**{**self.format_dict, "bar_format": fmt, "ncols": None, "prefix": ""})
        self.fp.write(line + "\n")
        self.fp.flush()
        self._printed_n = self.n

    def close(self) -> None:
        if self.disable:
            return
        if self.lines > 0 and self._printed_n != self.n and self.n > self.initial:
            self._print()
        self.disable = True
        self._decr_instances(self)

    def clear(self, nolock: bool = False) -> None:
        """Nothing to clear: the lines stay (tqdm.write clears bars before writing its own line)."""

    def moveto(self, n: int) -> None:
        """No cursor moves: nested bars print their lines one after another."""


def progress_bar(iterable: Iterable | None = None, *, file: TextIO | None = None, lines: int = 10,
                 live: type[std_tqdm] = live_tqdm, **kwargs: Any) -> std_tqdm:  # fmt: skip
    """A progress bar over `iterable` (or of `total=` steps, updated by hand) writing to `file` (tqdm's default,
    sys.stderr, when None): `live(...)` (tqdm.auto's bar, or a subclass such as Lightning's) when `file` is a
    terminal, else a `LineBar` printing `lines` lines. Other keywords are tqdm's (desc, total, leave, disable ...)."""
    stream = sys.stderr if file is None else file
    if is_terminal(stream):
        return live(iterable, file=file, **kwargs)
    for key in ("dynamic_ncols", "position", "ncols"):  # a terminal's width and rows mean nothing here
        kwargs.pop(key, None)
    return LineBar(iterable, file=stream, lines=lines, **kwargs)
