"""Reading torch weight files safely and lazily: ``.pth``/``.pt`` and ``.safetensors``.

Safety: ``.pth`` files are opened with ``torch.load(..., weights_only=True)`` only, so a pickle
that names any global outside torch's tensor allow-list (``os.system``, a model class ...) is
refused before anything in it runs. ``.safetensors`` files are plain bytes and a JSON header,
read here with ``os.pread`` after checking every offset against the file size.

Memory: nothing is read until asked for. A ``.pth`` is memory-mapped (``mmap=True``) and each
tensor's pages are handed back to the kernel once read (``release``), so converting a file never
keeps the whole source resident next to the converted copy.
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from vgg_flax.errors import WeightFileError


_REFUSED_HINT = ("refused without running it (weights_only loading); if the file is yours, "
                 "re-save only the weights: torch.save(model.state_dict(), path)")


def _bf16():
    import ml_dtypes  # ships with jax
    return np.dtype(ml_dtypes.bfloat16)


# -- lazily read tensors -------------------------------------------------------------------------
class Tensor:
    """One tensor of a weights file, read on demand.

    ``shape`` and ``dtype`` (numpy, bf16 as ``ml_dtypes.bfloat16``) are known without reading.
    ``rows(sl)`` copies rows ``sl`` of axis 0 into a fresh numpy array; ``torch()`` gives the
    whole tensor as a torch tensor (memory-mapped when the file was, so no copy).
    """

    def __init__(self, shape, dtype, rows: Callable[[slice], np.ndarray],
                 torch_fn: Callable[[], Any], release: Callable[[], None] = lambda: None,
                 mmapped: bool = False):
        self.mmapped = mmapped  # torch() is a view of the file's pages (releasable)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._rows, self._torch, self._release = rows, torch_fn, release

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def rows(self, sl: slice = slice(None)) -> np.ndarray:
        return self._rows(sl)

    def numpy(self) -> np.ndarray:
        return self._rows(slice(None))

    def torch(self):
        return self._torch()

    def release(self) -> None:
        """Drop this tensor's file pages from memory (they are re-read if touched again)."""
        self._release()

    def __repr__(self) -> str:
        return f"Tensor({self.shape}, {self.dtype.name})"


def torch_to_numpy(t) -> np.ndarray:
    """A CPU numpy view of torch tensor ``t``, bfloat16 as ``ml_dtypes.bfloat16``: numpy has no
    bf16 of its own, so the 16-bit patterns are reinterpreted, exactly (no float round trip)."""
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(_bf16())
    return t.numpy()


def numpy_to_torch(a: np.ndarray):
    """A torch tensor on ``a``'s memory (a copy if ``a`` is read-only, which torch cannot share),
    ``ml_dtypes.bfloat16`` as ``torch.bfloat16``: the bits reinterpreted, exactly."""
    import torch
    if not a.flags.writeable:  # e.g. views into a msgpack buffer
        a = a.copy()
    if a.dtype == _bf16():
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


_libc = None


def release_pages(addr: int, nbytes: int) -> None:
    """MADV_DONTNEED on a clean file mapping: the pages leave RSS and are re-read on access.

    Only for memory-mapped file data: on ordinary (anonymous) memory it would zero the pages.
    """
    global _libc
    if nbytes <= 0:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    start = addr - addr % page
    # Only whole pages inside the tensor: a neighbour's partial page stays resident.
    end = (addr + nbytes) - (addr + nbytes) % page
    if start < addr:
        start += page
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)


def _torch_tensor(t, mmapped: bool) -> Tensor:
    import torch

    def rows(sl: slice) -> np.ndarray:
        part = t[sl]
        out = np.array(torch_to_numpy(part), copy=True)
        if mmapped and part.is_contiguous():
            release_pages(part.data_ptr(), part.numel() * part.element_size())
        return out

    def release() -> None:
        if mmapped and t.is_contiguous():
            release_pages(t.data_ptr(), t.numel() * t.element_size())

    dtype = _bf16() if t.dtype == torch.bfloat16 else np.dtype(str(t.dtype).removeprefix("torch."))
    return Tensor(t.shape, dtype, rows, lambda: t, release, mmapped)


# -- .pth / .pt ---------------------------------------------------------------------------------
def _torch_load(path: Path) -> Any:
    import pickle

    import torch
    is_zip = zipfile.is_zipfile(path)
    try:
        # mmap needs the zip format (torch >= 1.6); legacy files are read into memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip), is_zip
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        what = ""
        for marker in ("Unsupported global: GLOBAL ", "Unsupported operand", "Unsupported class "):
            if marker in text:
                what = text.split(marker, 1)[1].split(" ")[0].rstrip(".,")
                break
        if "GLOBAL" in text or "global" in text or what:
            raise WeightFileError(f"{path} pickles code or objects ({what or 'not just tensors'}), "
                                  f"not only weights: {_REFUSED_HINT}") from None
        raise WeightFileError(f"{path} is not a readable torch file ({short_error(err)}); "
                              "pass a state_dict saved with torch.save or a .safetensors file") from None
    # What torch's readers raise on damaged bytes, found by truncating and corrupting saved
    # files (zip and legacy): RuntimeError (zip reader), OSError (mmap of a short file),
    # EOFError/struct.error/IndexError (legacy pickle cut short), ValueError (bad UTF-8 names),
    # KeyError/AssertionError (legacy storage keys that do not match). Only ``torch.load`` is
    # inside this try, so these are about the file; TypeError/AttributeError are not caught and
    # surface as bugs.
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error,
            IndexError, KeyError, AssertionError) as err:
        if "zip" in str(err).lower() or isinstance(err, (EOFError, zipfile.BadZipFile)):
            problem = "is truncated or corrupt"
        else:
            problem = "is not a readable torch weights file"
        raise WeightFileError(f"{path} {problem} ({short_error(err)}); re-download or re-save it "
                              "(torch.save(model.state_dict(), path))") from None


def short_error(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) < 140 else text[:137] + "..."


STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict")


def _is_array(v: Any) -> bool:
    return hasattr(v, "shape") and hasattr(v, "dtype")


def state_dict_in(obj: Any, where: Any, is_tensor: Callable[[Any], bool] = _is_array
                  ) -> Mapping[str, Any]:
    """The state_dict in ``obj``: ``obj`` itself, or a training checkpoint's under
    ``state_dict``/``model``/``model_state_dict`` (one level deeper too: ``{"model":
    {"state_dict": ...}}``). The one place both the converter (a ``.pth``'s contents) and
    ``vgg_flax.from_torch`` (a dict in memory) unwrap checkpoints. ``where`` names ``obj`` in
    the ``WeightFileError`` (one line) raised when there is no state_dict."""
    def is_state_dict(d) -> bool:
        return (isinstance(d, Mapping) and len(d) > 0 and all(isinstance(k, str) for k in d)
                and all(is_tensor(v) for v in d.values()))

    if is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in STATE_DICT_KEYS:
            inner = obj.get(key)
            if is_state_dict(inner):
                return inner
            if isinstance(inner, Mapping):  # {"model": {"state_dict": ...}}
                for key2 in STATE_DICT_KEYS:
                    if is_state_dict(inner.get(key2)):
                        return inner[key2]
        keys = ", ".join(map(repr, list(obj)[:8])) + (" ..." if len(obj) > 8 else "")
        raise WeightFileError(f"{where} holds a dict without a state_dict (keys: {keys or 'none'}); "
                              "pass a state_dict (name -> tensor) or a checkpoint with one under "
                              "'state_dict' or 'model'")
    raise WeightFileError(f"{where} holds a {type(obj).__module__}.{type(obj).__name__}, not a "
                          "state_dict; save one with torch.save(model.state_dict(), path)")


# -- .safetensors --------------------------------------------------------------------------------
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}


def np_dtype(name: str) -> np.dtype:
    return _bf16() if name == "bfloat16" else np.dtype(name)


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensor entries, __metadata__, offset of the data section), every offset checked."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{path} is truncated (no safetensors header); re-download or re-save it")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise WeightFileError(f"{path} is truncated or not a safetensors file (header length "
                                  f"{n} > file size); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise WeightFileError(f"{path} has a corrupt safetensors header ({short_error(err)})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path} has a corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    data_start, data_size = 8 + n, size - 8 - n
    for key, e in header.items():
        try:
            dtype = np_dtype(ST_DTYPES[e["dtype"]])
            begin, end = (int(x) for x in e["data_offsets"])
            count = int(np.prod(e["shape"], dtype=np.int64))
        except (KeyError, TypeError, ValueError) as err:
            raise WeightFileError(f"{path}: tensor {key!r} has an unsupported or corrupt entry "
                                  f"({short_error(err)})") from None
        if not 0 <= begin <= end or end - begin != count * dtype.itemsize:
            raise WeightFileError(f"{path}: tensor {key!r} has inconsistent offsets; the file is corrupt")
        if end > data_size:
            raise WeightFileError(f"{path} is truncated (tensor {key!r} ends past the end of the "
                                  "file); re-download or re-save it")
    return header, meta, data_start


def safetensors_tensors(path: Path) -> dict[str, Tensor]:
    header, _, data_start = read_safetensors_header(path)
    out: dict[str, Tensor] = {}
    for key, e in header.items():
        out[key] = _pread_tensor(path, data_start + e["data_offsets"][0], tuple(e["shape"]),
                                 np_dtype(ST_DTYPES[e["dtype"]]))
    return out


def _pread_tensor(path: Path, offset: int, shape: tuple[int, ...], dtype: np.dtype) -> Tensor:
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize if shape else dtype.itemsize

    def rows(sl: slice) -> np.ndarray:
        if not shape:
            return _read(offset, dtype.itemsize).view(dtype).reshape(())
        start, stop, step = sl.indices(shape[0])
        if step == 1:
            n = max(stop - start, 0)
            return _read(offset + start * row, n * row).view(dtype).reshape((n,) + shape[1:])
        return np.stack([rows(slice(i, i + 1))[0] for i in range(start, stop, step)]) \
            if stop > start else np.empty((0,) + shape[1:], dtype)

    def _read(at: int, n: int) -> np.ndarray:
        buf = np.empty(n, np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            view, done = memoryview(buf), 0
            while done < n:
                got = os.preadv(fd, [view[done:]], at + done)
                if got <= 0:
                    raise WeightFileError(f"{path} is truncated; re-download or re-save it")
                done += got
        finally:
            os.close(fd)
        return buf

    def to_torch():
        return numpy_to_torch(rows(slice(None)))

    return Tensor(shape, dtype, rows, to_torch)


# -- entry point ---------------------------------------------------------------------------------
class WeightFile(Mapping[str, Tensor]):
    """The tensors of a weights file by name (a read-only mapping of lazy ``Tensor``s)."""

    def __init__(self, path: Path, tensors: dict[str, Tensor], kind: str):
        self.path, self.kind, self._tensors = path, kind, tensors
        self.size = path.stat().st_size

    def __getitem__(self, key: str) -> Tensor:
        return self._tensors[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def open_weights(path: str | os.PathLike) -> WeightFile:
    """Open a ``.pth``/``.pt`` state_dict (or a checkpoint dict holding one under ``state_dict``
    or ``model``) or a ``.safetensors`` file, safely and without reading the tensors.

    Raises ``WeightFileError`` (one line) for a missing, empty, truncated or unsafe file, a
    directory, or a pickle that holds something other than a state_dict.
    """
    p = Path(path)
    if not p.exists():
        raise WeightFileError(f"no such file: {p}; pass the path of a .pth, .pt or .safetensors "
                              "weights file")
    if p.is_dir():
        hint = ("it is a vgg_flax checkpoint: convert it back with convert/flax_to_torch.py"
                if (p / "vgg_flax.json").exists() else
                "pass the weights file inside it (.pth, .pt or .safetensors)")
        raise WeightFileError(f"{p} is a directory, not a weights file; {hint}")
    size = p.stat().st_size
    if size == 0:
        raise WeightFileError(f"{p} is empty; re-download or re-save the weights")
    with open(p, "rb") as f:
        magic = f.read(9)
    looks_safetensors = (p.suffix == ".safetensors" or
                         (len(magic) == 9 and magic[8:9] == b"{" and not magic.startswith(b"PK")))
    if looks_safetensors:
        return WeightFile(p, safetensors_tensors(p), "safetensors")
    obj, mmapped = _torch_load(p)
    import torch
    sd = state_dict_in(obj, p, lambda v: isinstance(v, torch.Tensor))
    return WeightFile(p, {k: _torch_tensor(v, mmapped) for k, v in sd.items()}, "pth")
