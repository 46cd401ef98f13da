"""What a study shows while it runs: its fine-tunes done, with the time elapsed and an estimate of the time left."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path


def duration(seconds: float) -> str:
    """A duration as people read it: 45s, 2m10s, 1h05m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _show(line: str) -> None:
    """Print a line at the start of a line of its own. The fine-tunes share this output and draw progress bars on it
    without ending their line (a validation bar ends with the cursor moved up), so the line starts with a carriage
    return, on a terminal also erasing what the bar left there."""
    sys.stdout.write(("\r\x1b[K" if sys.stdout.isatty() else "\r") + line + "\n")
    sys.stdout.flush()


class StudyProgress:
    """Prints `fine-tune k of N done (p=0.1, seed=2) · 2m10s elapsed · about 6m left` as a study's fine-tunes
    finish, seen by their done.json appearing under `root` (the study's finetune/ folder), so that it works
    whether the fine-tunes run as one Hydra multirun, one command per point, or several at once.

    The estimate is the time spent running fine-tunes in this session per fine-tune finished in it, times the
    fine-tunes left; fine-tunes finished before the session count as done and not in the estimate.
    """

    def __init__(self, tag: str, root: Path, total: int, started: float, every_s: float = 1.0,
                 clock: Callable[[], float] = time.time):  # fmt: skip
        """`started`: when the study started, by `clock` (the wall clock, which the study records it by)."""
        self.tag, self.root, self.total, self.started, self.every_s = tag, root, total, started, every_s
        self.clock = clock
        self.seen = self._done()
        self.new = 0
        self.busy = 0.0  # seconds spent in `watching` (running fine-tunes), this session
        if self.seen:
            print(f"[study {tag}] {len(self.seen)} of {total} fine-tunes done already", flush=True)

    def _done(self) -> set[Path]:
        return {p.parent for p in self.root.rglob("done.json")} if self.root.exists() else set()

    def poll(self, busy: float) -> None:
        """Print a line for each fine-tune finished since the last poll."""
        for run in sorted(self._done() - self.seen):
            self.seen.add(run)
            self.new += 1
            left = max(0, self.total - len(self.seen))
            label = ", ".join(run.relative_to(self.root).parts)
            line = (f"[study {self.tag}] fine-tune {len(self.seen)} of {self.total} done ({label}) · "
                    f"{duration(self.clock() - self.started)} elapsed")  # fmt: skip
            if left:
                line += f" · about {duration(busy / self.new * left)} left"
            _show(line)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Poll for finished fine-tunes while the body runs them, and once more at its end."""
        start, stop = self.clock(), threading.Event()

        def loop() -> None:
            while not stop.wait(self.every_s):
                self.poll(self.busy + self.clock() - start)

        thread = threading.Thread(target=loop, daemon=True, name="study-progress")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.busy += self.clock() - start
            self.poll(self.busy)
