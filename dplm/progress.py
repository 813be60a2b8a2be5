"""Progress of a long loop (training steps, sampled rows): a bar on a terminal, lines in a log.

A bar repainted at every step is right on a terminal and wrong in a log file, which would hold
one carriage-return update per step. When the output is not a terminal, `progress` prints a
plain line whenever another tenth of the work is done or `LOG_SECONDS` have passed since the
last line, whichever comes first.
"""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

LOG_SECONDS = 10.0  # at most this long between two lines in a log
LOG_SHARE = 0.1  # a line at least every tenth of the work


def progress(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0, stream=None):
    """A progress display with tqdm's `update`, `set_postfix` and `close`: a tqdm bar when
    `stream` (default stderr) is a terminal, `LogLines` otherwise; nothing when not `enabled`."""
    stream = stream or sys.stderr
    if enabled and not stream.isatty():
        return LogLines(total, desc, unit, initial, stream)
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True,
                file=stream)


class LogLines:
    """Progress as plain lines: `desc: done/total unit (share), postfix, seconds`."""

    def __init__(self, total: int, desc: str, unit: str, initial: int, stream):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.done = self.last_done = initial
        self.postfix = ""
        self.start = self.last_time = time.monotonic()

    def set_postfix(self, values: dict) -> None:
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        step = max(1, round(self.total * LOG_SHARE)) if self.total else 1
        if self.done - self.last_done >= step or now - self.last_time >= LOG_SECONDS or self.done == self.total:
            self._line(now)

    def close(self) -> None:
        if self.done != self.last_done:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}{share}{extra}, {now - self.start:.0f} s",
              file=self.stream, flush=True)
        self.last_done, self.last_time = self.done, now
