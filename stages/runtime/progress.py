"""Progress of a long loop, with an ETA, on stderr: SFT and DPO steps, reward-model steps over its
epochs, PPO updates with the current reward and KL, sampling batches.

A terminal gets one bar that redraws; a log (not a terminal: CI, a scheduled run) gets one line
every `ALIGNFLOW_PROGRESS_SECONDS` (30), so a 10-minute stage writes a handful of lines, not
thousands. `ALIGNFLOW_PROGRESS=0` turns it off.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


class _Lines:
    """tqdm's output for a log: each redraw becomes one line instead of a carriage return."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


# Signals the run received (the flow's handler records them). Python drops a KeyboardInterrupt
# raised while a finalizer or a library's cleanup runs ("Exception ignored in ..."): then the loop's
# next tick raises it again, so Ctrl-C never lets a stage carry on to the end and publish.
STOP: list[int] = []


class _Bar(tqdm):
    def update(self, n: float | None = 1) -> bool | None:
        if STOP:
            raise KeyboardInterrupt(f"stopped by signal {STOP[0]}")
        return super().update(n)


def progress(total: int, desc: str, unit: str = "step") -> tqdm:
    tty = sys.stderr.isatty()
    return _Bar(
        total=total,
        desc=desc,
        unit=unit,
        file=sys.stderr if tty else _Lines(),
        leave=not tty,
        dynamic_ncols=tty,
        mininterval=0.5 if tty else float(os.environ.get("ALIGNFLOW_PROGRESS_SECONDS", "30")),
        disable=os.environ.get("ALIGNFLOW_PROGRESS", "1") == "0",
    )
