"""Stop requests. In the training loop (``StopFlag``), SIGTERM (preemption) and SIGINT (Ctrl-C)
finish the current step, save a checkpoint and end the run cleanly; a second Ctrl-C stops at
once without saving.

Everywhere else in the command line (``ExitOnInterrupt``, installed before anything is imported)
Ctrl-C ends the process at once: one line, status 130, no interpreter teardown. Python's default,
a KeyboardInterrupt raised wherever the main thread happens to be, is not safe in this process:
inside one of JAX's garbage-collection callbacks (which run during imports, compilation, any
allocation) it is printed and swallowed, and the run goes on; when it does unwind, teardown then
runs while XLA's and the input pipeline's threads still work, and segfaults. Nothing needs
undoing when the process ends there: checkpoints and train_config.json appear whole (renamed
into place) or not at all, as after a SIGKILL, which a rerun resumes from.

This module imports only the standard library at import time, so the command line can install
its handler first thing.
"""
from __future__ import annotations

import os
import signal
import sys

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


# vgg_flax.convert.atomic has its twin: importing it from there would import vgg_flax, and with
# it jax, before the Ctrl-C handler is installed.
def exit_now(code: int, message: str | None = None) -> None:
    """End the process with ``code`` after flushing stdout/stderr and writing ``message`` (one
    line, stderr), without interpreter teardown (``os._exit``): safe while other threads run."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, RuntimeError):  # closed, or re-entered from a handler
            pass
    if message:
        os.write(2, (message + "\n").encode())
    os._exit(code)


class ExitOnInterrupt:
    """The command line's SIGINT handler: ``exit_now(130, self.message)``. ``message`` may be
    changed as the program learns more (the workdir, once the flags are parsed)."""

    def __init__(self, message: str = "interrupted (Ctrl-C)"):
        self.message = message

    def install(self) -> "ExitOnInterrupt":
        signal.signal(signal.SIGINT, self)
        return self

    def __call__(self, signum, frame):
        exit_now(130, self.message)


class StopFlag:
    """A context manager that turns SIGTERM/SIGINT into a request the loop polls between steps.

    ``signal_name`` is the name of the first signal received ("SIGTERM" or "SIGINT"). A second
    SIGINT goes to the handler that was installed before (the command line's ExitOnInterrupt, or
    Python's KeyboardInterrupt in-process).
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
        if self.requested and signum == signal.SIGINT:  # the user insists: stop, no checkpoint
            # The progress bar (stderr) may be mid-line, redrawn with "\r" since the first
            # Ctrl-C: the line that says what happened starts on a line of its own.
            os.write(2, b"\n")
            previous = self._previous.get(signal.SIGINT)
            if callable(previous):
                previous(signum, frame)
            raise KeyboardInterrupt
        if signum == signal.SIGINT:  # the step may still be compiling: say what happens next
            os.write(2, b"\nCtrl-C: stopping after this step with a checkpoint; Ctrl-C again "
                        b"stops at once without one\n")
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def agreed(self) -> bool:
        """True on every process once any process was asked to stop (they save together)."""
        import jax
        if jax.process_count() == 1:
            return self.requested
        import numpy as np
        from jax.experimental import multihost_utils
        return bool(multihost_utils.process_allgather(np.int32(self.requested)).max())
