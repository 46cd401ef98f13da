"""`priorlab.progress`: a live bar on a terminal, a few whole lines elsewhere."""

import io
import re
import sys

from priorlab.progress import LineBar, progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_bar_prints_one_line_per_tenth_with_the_total():
    out = io.StringIO()
    for _ in progress_bar(range(95), desc="sampling", file=out, leave=False, mininterval=0):
        pass
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [f"sampling: {n}/95" for n in (10, 19, 29, 38, 48, 57, 67, 76,
                                                                                      86, 95)]  # fmt: skip
    assert lines[-1].startswith("sampling: 95/95 (100%) [")
    assert "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_a_bar_stopped_early_or_resumed_prints_where_it_is():
    out = io.StringIO()
    bar = progress_bar(total=1200, desc="step", file=out)
    bar.initial = bar.n = 600  # a resumed run: its count starts at the checkpoint's step
    for step in range(601, 800):
        bar.n = step
        bar.refresh()
    bar.close()  # stopped at step 799 (a divergence, Ctrl-C)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["step: 601/1200", "step: 720/1200",
                                                                            "step: 799/1200"]  # fmt: skip


def test_on_a_terminal_the_bar_is_tqdms_live_bar(monkeypatch):
    tty = Terminal()
    bar = progress_bar(range(5), desc="sampling", file=tty, mininterval=0)
    assert not isinstance(bar, LineBar)
    list(bar)
    assert re.search(r"\rsampling:  20%.*\rsampling: 100%\|\S+\| 5/5", tty.getvalue())  # redrawn in place
    monkeypatch.setattr(sys, "stderr", Terminal())  # tqdm's default stream, when no file is given
    assert not isinstance(progress_bar(total=3, disable=True), LineBar)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(progress_bar(total=3, disable=True), LineBar)
