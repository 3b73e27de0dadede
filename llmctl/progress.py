"""Progress on stderr: training (a rich live bar on a terminal, plain log lines otherwise) and a plain bar for
evaluation and encoding (on a terminal only)."""

from __future__ import annotations

import contextlib
import sys
import time


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Shows step, loss, tok/s, MFU and ETA. Only the main process should create an enabled one."""

    def __init__(self, total: int, start: int = 0, enabled: bool = True, stream=None):
        self.total, self.start, self.enabled = total, start, enabled
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self._live = None
        if enabled and self.stream.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, \
                TimeRemainingColumn

            self._live = RichProgress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(), console=Console(file=self.stream), transient=False)
            self._task = self._live.add_task("train", total=total, completed=start, info="")
            self._live.start()

    def _eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return 0.0
        return (time.perf_counter() - self.t0) / done * (self.total - step)

    def update(self, step: int, loss: float, tok_per_s: float, mfu: float | None, log: bool):
        if not self.enabled:
            return
        mfu_s = f" mfu {mfu * 100:.1f}%" if mfu is not None else ""
        info = f"loss {loss:.4f} {tok_per_s:,.0f} tok/s{mfu_s}"
        if self._live is not None:
            self._live.update(self._task, completed=step, info=info)
        elif log:
            print(f"step {step}/{self.total} {info} eta {_fmt_eta(self._eta(step))}", file=self.stream, flush=True)

    def message(self, text: str):
        if not self.enabled:
            return
        if self._live is not None:
            self._live.console.print(text)
        else:
            print(text, file=self.stream, flush=True)

    def close(self):
        if self._live is not None:
            self._live.stop()
            self._live = None


@contextlib.contextmanager
def progress_bar(total: int, desc: str, enabled: bool = True):
    """Yields advance(n): a rich progress bar on stderr, only when stderr is a terminal (and enabled)."""
    if not enabled or not sys.stderr.isatty() or total <= 0:
        yield lambda n=1: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(desc), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:  # fmt: skip
        task = bar.add_task(desc, total=total)
        yield lambda n=1: bar.advance(task, n)
