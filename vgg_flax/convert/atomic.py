"""Output appears whole or not at all: written under a hidden temporary name beside ``out``,
then renamed; Ctrl-C during a write is held until the write ends, so nothing is left behind."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from vgg_flax.convert.errors import ConversionError


@contextlib.contextmanager
def interrupt_after():
    """Ctrl-C inside the block is held until the block ends, then raised as KeyboardInterrupt.

    orbax writes from background threads that outlive a KeyboardInterrupt in the main thread;
    letting the write finish first means the temporary output can then be removed for good.
    """
    if threading.current_thread() is not threading.main_thread():
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
    back if the move fails."""
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
