"""Ctrl-C while training: finish the step, save a resumable checkpoint, stop."""

from __future__ import annotations

import signal
import threading


class GracefulStop:
    """Ctrl-C while training: the first finishes the current step, saves a checkpoint and stops (resumable);
    a second interrupts at once. Only in a single process's main thread: under torchrun the ranks would
    stop at different steps, so the signal keeps its default meaning there."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.requested = False

    def __enter__(self) -> "GracefulStop":
        if self.enabled:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nnanoseek: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
              flush=True)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            signal.signal(signal.SIGINT, self.previous)
