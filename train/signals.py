"""Stop requests: SIGTERM (preemption) and SIGINT (Ctrl-C) finish the current step, save a
checkpoint and end the run cleanly. A second Ctrl-C interrupts at once (KeyboardInterrupt)."""
from __future__ import annotations

import signal

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopFlag:
    """A context manager that turns SIGTERM/SIGINT into a request the loop polls between steps.

    ``signal_name`` is the name of the first signal received ("SIGTERM" or "SIGINT").
    """

    def __init__(self):
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self):
        for sig in _SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, no preemption support
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the user insists: stop without the checkpoint
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self) -> bool:
        """True on every process once any process was asked to stop (they save together)."""
        if jax.process_count() == 1:
            return self.requested
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
