"""SIGINT and SIGTERM as a request to checkpoint and stop, rather than an abrupt end."""
from __future__ import annotations

import signal
from pathlib import Path


class Interrupted(Exception):
    def __init__(self, signum: int, run: str, checkpoint_dir: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name} during the {run} run: checkpoint written to {checkpoint_dir}")
        self.signum = signum


class StopSignals:
    """Turns SIGINT and SIGTERM into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
