"""Output appears whole or not at all: written under a hidden temporary name beside ``out``,
then renamed; Ctrl-C during a write is held until the write ends, so nothing is left behind.

In the command line, Ctrl-C is ``ExitOnInterrupt``'s: the temporary output is removed and the
process ends at once, one line, status 130. Python's default KeyboardInterrupt is raised wherever
the main thread is: inside one of JAX's garbage-collection callbacks it is printed and swallowed,
and the conversion went on to write its output and exit 0; when it does unwind, interpreter
teardown runs while XLA's threads still work.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from vgg_flax.errors import ConversionError


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
    """A command line's SIGINT handler: run ``cleanups`` (``staged`` registers the removal of its
    temporary output), write ``message``, exit 130 (``exit_now``). Inside ``held()`` (a write in
    progress) the exit waits for the block to end."""

    def __init__(self, message: str = "interrupted: nothing was written"):
        self.message = message
        self.cleanups: list[Callable[[], None]] = []
        self._holds, self._pending, self._previous = 0, False, None

    def __enter__(self) -> "ExitOnInterrupt":
        self._previous = signal.signal(signal.SIGINT, self)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def __call__(self, signum, frame) -> None:
        if self._holds:
            self._pending = True
        else:
            self.exit()

    def exit(self) -> None:
        for cleanup in list(self.cleanups):
            cleanup()
        exit_now(130, self.message)

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self._holds += 1
        try:
            yield
        finally:
            self._holds -= 1
            if self._pending and not self._holds:
                self.exit()


def installed() -> ExitOnInterrupt | None:
    """The process's ExitOnInterrupt, if the command line installed one."""
    handler = signal.getsignal(signal.SIGINT)
    return handler if isinstance(handler, ExitOnInterrupt) else None


@contextlib.contextmanager
def on_interrupt(cleanup: Callable[[], None]) -> Iterator[None]:
    """Inside the block, the command line's Ctrl-C (``ExitOnInterrupt``) calls ``cleanup``
    before the process ends (outside the command line, the block's own ``finally`` does)."""
    handler = installed()
    if handler is None:
        yield
        return
    handler.cleanups.append(cleanup)
    try:
        yield
    finally:
        handler.cleanups.remove(cleanup)


@contextlib.contextmanager
def interrupt_after():
    """Ctrl-C inside the block is held until the block ends; then the command line exits
    (``ExitOnInterrupt``), or KeyboardInterrupt is raised.

    orbax writes from background threads that outlive a KeyboardInterrupt in the main thread;
    letting the write finish first means the temporary output can then be removed for good.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = installed()
    if handler is not None:
        with handler.held():
            yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def check_out(out: Path, force: bool) -> None:
    """Fail before any work if ``out`` cannot be written: it exists (without ``force``), or a
    parent on its path is a file, or its nearest existing parent is not writable."""
    if (out.exists() or out.is_symlink()) and not force:
        raise ConversionError(f"{out} exists; pass --force to overwrite it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConversionError(f"--out {out}: {parent} is a file, not a directory; "
                              "pick an output path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(f"--out {out}: cannot write in {parent} (permission denied); "
                              "pick a writable directory")


def tmp_sibling(out: Path, tag: str) -> Path:
    # Hidden, unique, and with out's suffix so that readers pick the same format.
    return out.parent / f".{out.stem}.{tag}-{uuid.uuid4().hex[:8]}{out.suffix}"


@contextlib.contextmanager
def staged(out: Path, on_os_error: Callable[[OSError], Exception]) -> Iterator[Path]:
    """A hidden temporary sibling of ``out`` for the block to write (and ``settle``); if the block
    fails, the temporary is removed, and an OSError comes out as ``on_os_error(err)`` (one line
    for the user) instead."""
    tmp = tmp_sibling(out, "tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with on_interrupt(lambda: remove(tmp)):
            yield tmp
    except OSError as err:
        remove(tmp)
        raise on_os_error(err) from None
    except BaseException:
        remove(tmp)
        raise


def remove(p: Path) -> None:
    """Delete a file or directory if it is there; never raises (it runs while another error is
    being reported, e.g. in a directory that turned out to be read-only)."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        pass


def commit(tmp: Path, out: Path, force: bool) -> None:
    """Move ``tmp`` to ``out``; an existing ``out`` is replaced only with ``force``, and is put
    back if the move fails. Ctrl-C waits for the renames (an existing ``out`` is never left
    moved aside); the command line then says ``out`` was written."""
    handler = installed()
    with interrupt_after():
        _commit(tmp, out, force)
        if handler is not None:
            handler.message = f"interrupted after {out} was written"


def _commit(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise ConversionError(f"{out} exists; pass --force to overwrite it")
        old = tmp_sibling(out, "old")
        os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            raise
        remove(old)
    else:
        os.rename(tmp, out)


def settle(tmp: Path, out: Path, force: bool, result: Any) -> None:
    """Commit the temporary output to ``out``, unless its verification failed: then delete it."""
    if result is not None and not result.ok:
        remove(tmp)
    else:
        commit(tmp, out, force)


def path_size(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
