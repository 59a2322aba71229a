"""Progress of a scoring run: a bar on a terminal, a plain line every few seconds otherwise.

On a terminal: tqdm (rows done / total, rows/s, ETA; chunks a resumed run found done count
as done but not in the rate). Elsewhere (a log file, a pipe, CI): one line every
``every`` seconds: ``score: 120000/200000 rows (60.0 %), 24500 rows/s, 0 errors, ETA 3 s``.
"""

from __future__ import annotations

import sys
import time


class _Lines:
    def __init__(self, total: int | None, every: float):
        self.total, self.every = total, every
        self.done = self.errors = self.new = 0
        self.started = self.last = time.monotonic()

    def update(self, rows: int, errors: int, resumed: bool) -> None:
        self.done += rows
        self.errors += errors
        if not resumed:
            self.new += rows
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            print(self.line(now), file=sys.stderr, flush=True)

    def line(self, now: float) -> str:
        rate = self.new / (now - self.started) if now > self.started else 0.0
        text = f"score: {self.done}"
        if self.total:
            text += f"/{self.total} rows ({100 * self.done / self.total:.1f} %)"
        else:
            text += " rows"
        text += f", {rate:.0f} rows/s, {self.errors} errors"
        if self.total and rate:
            text += f", ETA {(self.total - self.done) / rate:.0f} s"
        return text

    def close(self) -> None:
        pass


class _Bar:
    def __init__(self, total: int | None):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="rows", unit_scale=True, dynamic_ncols=True,
                        desc="score")
        self.errors = 0

    def update(self, rows: int, errors: int, resumed: bool) -> None:
        if resumed:  # done before: moves the bar without counting in the rate
            self.bar.n += rows
            self.bar.last_print_n = self.bar.n
            self.bar.refresh()
            return
        self.errors += errors
        if errors:
            self.bar.set_postfix(errors=self.errors, refresh=False)
        self.bar.update(rows)

    def close(self) -> None:
        self.bar.close()


def reporter(total: int | None, every: float):
    """A bar when stderr is a terminal and tqdm is installed, else plain lines."""
    if sys.stderr.isatty():
        try:
            return _Bar(total)
        except ImportError:
            pass
    return _Lines(total, every)
