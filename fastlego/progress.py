"""A dependency-free progress bar on stderr, used by `fastlego train` and `fastlego sample`."""

from __future__ import annotations

import math
import sys
import time
from typing import Dict, Optional


class ProgressBar:
    """A dependency-free progress bar on stderr: `[####----] 40/100 1.2it/s loss=0.31`.

    Redraws in place on a terminal (at most every 0.2 s); elsewhere prints a line at most every
    `interval` seconds, so logs stay short."""

    def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None, interval: Optional[float] = None,
                 initial: int = 0, unit: str = "it", seconds: Optional[float] = None):
        self.total, self.desc, self.enabled, self.unit = max(int(total), 0), desc, enabled, unit
        self.seconds = seconds  # a time budget: the bar shows elapsed / budget when it ends first
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.2 if self.tty else 15.0)
        self.n = self.start_n = int(initial)
        self.t0 = self.last = time.perf_counter()
        self.postfix: Dict[str, str] = {}
        self.closed = False
        self._drawn = None  # the count last drawn

    def update(self, n: int = 1, **postfix) -> None:
        self.n += n
        for k, v in postfix.items():
            self.postfix[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if self.enabled and (now - self.last >= self.interval or (self.total and self.n >= self.total)):
            self.last = now
            self._draw()

    def _line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        count = f"{self.n}/{self.total}"
        if self.seconds and (not self.total or math.isnan(eta) or self.seconds - elapsed < eta):
            frac, eta, count = min(elapsed / self.seconds, 1.0), max(self.seconds - elapsed, 0.0), f"{self.n}"
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"{self.desc} [{bar}] {count} {rate:.2f}{self.unit}/s "
                f"elapsed {elapsed:.0f}s eta {eta:.0f}s {extra}").strip()

    def _draw(self) -> None:
        self._drawn = self.n
        if self.tty:
            self.stream.write("\r" + self._line() + "\033[K")
        else:
            self.stream.write(self._line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and not self.closed:
            if self._drawn != self.n:
                self._draw()
            if self.tty:
                self.stream.write("\n")
            self.stream.flush()
        self.closed = True
