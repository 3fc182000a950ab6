"""Stop at a step boundary with a resumable checkpoint when the user or the scheduler asks.

- Ctrl-C (SIGINT): the first finishes the current step, saves and stops (exit 130); a second interrupts at
  once. One process only: under torchrun every rank would see it at a different step.
- SIGTERM: what SLURM (at the time limit, `scancel`, preemption), Kubernetes (pod eviction), spot/preemptible
  instances and torchrun (forwarding its own SIGTERM to every worker) send before they kill a job; a grace
  period follows (SLURM's KillWait, 30 s by default; Kubernetes' terminationGracePeriodSeconds). The run
  finishes its step, saves a checkpoint and exits 143 (128 + 15, what a SIGTERM'd process reports).
- SIGUSR1: what a scheduler sends ahead of the deadline when asked (`sbatch --signal=USR1@120`), so the
  save happens while there is time left; handled as SIGTERM, exit 138 (128 + 10).

Under torchrun the ranks agree on the step to stop at: each step they OR their flags in one tiny host
all-reduce (`Distributed.all_ok`), so all ranks save the same step together.
"""

from __future__ import annotations

import signal
import threading

PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class GracefulStop:
    """Context manager installing the handlers above in the main thread; `requested` says a stop was asked
    for, `signum` which signal asked. `world_size > 1` leaves SIGINT with its default meaning."""

    def __init__(self, enabled: bool = True, world_size: int = 1):
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.world_size = world_size
        self.requested = False
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if self.enabled:
            wanted = PREEMPTION_SIGNALS + ((signal.SIGINT,) if self.world_size == 1 else ())
            for signum in wanted:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        if self.requested:
            return  # a scheduler repeating its SIGTERM: the save is already on its way
        self.requested, self.signum = True, signum
        name = signal.Signals(signum).name
        more = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        print(f"\nnanoseek: {name}: stopping after this step and saving a checkpoint{more}", flush=True)

    def should_stop(self, dist) -> bool:
        """True on every rank once any rank was asked to stop (a collective when several processes run)."""
        if self.world_size > 1:
            return not dist.all_ok(not self.requested)
        return self.requested

    @property
    def exit_code(self) -> int:
        """The conventional code of a process ended by this signal: 128 + its number."""
        return 128 + (self.signum or signal.SIGINT)

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
