"""A small progress bar on standard error for long steps.

On a terminal it redraws one line; otherwise (logs, Airflow) it prints a line
at every tenth of the work, so logs show progress without flooding.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

REDRAW_INTERVAL_S = 0.2
LOG_STEPS = 10


class Progress:
    """Counts units of work towards a known total and reports rate and time left."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 0)
        self.done = 0
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()
        self._last_draw = 0.0
        self._last_step = -1

    def advance(self, units: int = 1) -> None:
        """Record ``units`` more units done and redraw when due."""
        self.done += units
        if not self.enabled:
            return
        now = time.monotonic()
        if self.interactive:
            if now - self._last_draw >= REDRAW_INTERVAL_S or self.done >= self.total:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()
        else:
            step = (self.done * LOG_STEPS // self.total) if self.total else LOG_STEPS
            if step != self._last_step:
                self._last_step = step
                self.stream.write(self._line(now) + "\n")
                self.stream.flush()

    def close(self) -> None:
        """Finish the line."""
        if self.enabled and self.interactive:
            self.stream.write("\r" + self._line(time.monotonic()) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        share = self.done / self.total if self.total else 1.0
        width = 24
        filled = int(share * width)
        rate = self.done / elapsed
        left = (self.total - self.done) / rate if rate > 0 else 0.0
        return (
            f"{self.label:<10} [{'#' * filled}{'.' * (width - filled)}] {self.done:,}/{self.total:,} "
            f"{share:6.1%}  {elapsed:6.1f}s elapsed  ~{left:5.0f}s left"
        )
