"""XLA's compiled programs on disk, so that a restarted run (after a preemption, a crash or a
rerun of the same command) loads its programs instead of compiling them again.

Where (``config.compile_cache``, the first that applies):

- a path: that directory; ``""`` or ``"off"``: no persistent cache;
- ``None`` (the default), and the environment already chose one (``JAX_COMPILATION_CACHE_DIR``,
  or ``jax_compilation_cache_dir`` set in this process): that one, as the user asked;
- ``None`` and ``$VGG_FLAX_CACHE`` set: ``$VGG_FLAX_CACHE/xla`` (``vgg_flax.perf``'s default);
- else ``DIR/xla_cache`` in the run's workdir.

Programs over several devices that hold oneDNN convolutions are compiled in every process: JAX
keys their batch partitioning (``custom_partitioning``) by a per-process pointer, so such an
entry is never found again (``vgg_flax/onednn.py``) and each restart stores one more. The cache
is therefore capped (MAX_BYTES, least recently used out first; ``JAX_COMPILATION_CACHE_MAX_SIZE``
overrides). One device, ``conv='xla'`` and every GPU/TPU program are served from the cache.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import jax
from jax.experimental.compilation_cache import compilation_cache as _cc

from train.validation import ConfigError, check_writable_dir

OFF = ("", "off")
MAX_BYTES = 1 << 30  # a VGG-16 training step is ~130 KB on XLA:CPU: room for thousands
_HIT, _MISS = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def resolve(config, workdir: Path) -> Path | None:
    """The cache directory for this run (None: off). ConfigError (one line) for a bad value."""
    value = config.get("compile_cache")
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"compile_cache must be a directory, '' or 'off', got {value!r}; set "
                          "--config.compile_cache=DIR")
    if value is not None and value.strip().lower() in OFF:
        return None
    if value is None:
        chosen = jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR")
        root = os.environ.get("VGG_FLAX_CACHE")
        path = Path(chosen) if chosen else (Path(root) / "xla" if root else workdir / "xla_cache")
    else:
        path = Path(value).expanduser()
    path = path.absolute()
    check_writable_dir(path, "compile_cache",
                       file_fix="pass a directory with --config.compile_cache=DIR, or "
                                "--config.compile_cache=off",
                       unwritable_fix="pass another --config.compile_cache=DIR, or "
                                      "--config.compile_cache=off")
    return path


class _Counter:
    """Persistent-cache hits and misses of this process, from JAX's monitoring events."""

    def __init__(self):
        self.hits = self.misses = 0
        self._lock = threading.Lock()

    def __call__(self, event: str, **_) -> None:
        if event in (_HIT, _MISS):
            with self._lock:
                if event == _HIT:
                    self.hits += 1
                else:
                    self.misses += 1


_COUNTER: _Counter | None = None


def counter() -> _Counter:
    global _COUNTER
    if _COUNTER is None:
        _COUNTER = _Counter()
        jax.monitoring.register_event_listener(_COUNTER)
    return _COUNTER


def use(path: Path | None) -> None:
    """Point JAX's persistent cache at ``path`` (None: off) before the run compiles anything.
    Every program is kept, however fast it compiled (as ``vgg_flax.perf`` does): with a time
    threshold, whether the evaluation step is kept depended on the machine's load that
    second, and a restart compiled it again. The environment's JAX_PERSISTENT_CACHE_* win."""
    counter()
    current = jax.config.jax_compilation_cache_dir
    if path is None:
        if jax.config.jax_enable_compilation_cache:
            jax.config.update("jax_enable_compilation_cache", False)
            _cc.reset_cache()
        return
    path.mkdir(parents=True, exist_ok=True)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:  # read when the cache opens
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    if not jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", True)
    if current != str(path):
        _cc.reset_cache()  # a cache already opened elsewhere in this process (tests, notebooks)
        jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES" not in os.environ:
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def entries(path: Path | None) -> int:
    """Programs stored in the cache directory (JAX writes one ``*-cache`` file per program)."""
    if path is None or not path.is_dir():
        return 0
    return sum(1 for p in path.iterdir() if p.name.endswith("-cache"))
