"""SIGTERM (preemption, `scancel`, Slurm's time-limit warning forwarded by the launcher) asks
a training run to checkpoint and stop after the current step. Installed by `xft train`
before anything heavy is imported, so a signal that arrives while the run starts up is
kept, not fatal."""

import signal


class StopOnSignal:
    """Callable flag for `train(should_stop=...)`; set by SIGTERM."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def release(self) -> None:
        """The handler from before, back (a run inside a longer process, e.g. a pipeline's
        training stage, hands SIGTERM back to its caller)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        self.requested = True

    def __call__(self) -> bool:
        return self.requested
