"""Stop at a step boundary with a resumable checkpoint when the user or the scheduler asks.

Ctrl-C (SIGINT): the first finishes the step, saves and stops; a second interrupts at once. One process only:
under torchrun every rank would see it at a different step.
SIGTERM (what SLURM, Kubernetes, spot instances and torchrun send before a kill) and SIGUSR1 (a scheduler's early
warning, `sbatch --signal=USR1@120`): finish the step and save. The exit code is 128 + the signal's number.
Under torchrun the ranks OR their flags each step in one tiny host all-reduce, so all save the same step."""

import signal
import threading

PREEMPTION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)


class GracefulStop:
    """Installs the handlers above in the main thread while entered; `requested` says a stop was asked for,
    `signum` by which signal. `world_size > 1` leaves SIGINT with its default meaning."""

    def __init__(self, world_size: int = 1):
        self.world_size, self.requested = world_size, False
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():  # signal.signal works in the main thread only
            for signum in PREEMPTION_SIGNALS + ((signal.SIGINT,) if self.world_size == 1 else ()):
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
        return not dist.all_ok(not self.requested) if self.world_size > 1 else self.requested

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}
