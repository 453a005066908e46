"""Atomic outputs and a streaming safetensors writer.

Every file this package writes goes through :func:`atomic_path`: written under a temporary name in
the destination directory, fsynced, then renamed over the final name, so a crash or SIGKILL leaves
either nothing or a complete file. :class:`SafetensorsWriter` appends tensors one at a time to a spool
file and assembles a standard ``.safetensors`` file at the end, so a model-sized output never has to
be held in memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import torch

from .errors import OutputError

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_COPY_CHUNK = 1 << 24


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included), without a copy when contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def _fail(path: Path, err: OSError) -> OutputError:
    if err.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Refuse an existing output (unless ``overwrite``) or a missing / unwritable parent, before any work."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"output {path} already exists (pass overwrite=True / --overwrite to replace it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync and rename it to ``path``, else remove it."""
    path = check_output_path(path, overwrite=overwrite)
    try:
        if is_dir:
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        else:
            fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as err:
        raise _fail(path, err) from None
    try:
        yield tmp
        _fsync_tree(tmp)
        # mkstemp/mkdtemp create 0600/0700; give the output the permissions a plain open() would
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())
        if is_dir and path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        _remove(tmp)
        raise _fail(path, err) from None
    except BaseException:
        _remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb+") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_text(text)


def atomic_save_figure(fig, path: str | os.PathLike, **savefig_kwargs) -> None:
    """``fig.savefig`` through a temporary sibling (the format from ``path``'s suffix, e.g. ``.png``)."""
    path = Path(path)
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **savefig_kwargs)


class SafetensorsWriter:
    """Append tensors one by one, then :meth:`finish` into a standard ``.safetensors`` file.

    Tensor data goes to a spool file next to the destination as it arrives (hashed on the way), so
    memory stays at one tensor. ``metadata_fn(data_sha256)`` builds the ``__metadata__`` dict once all
    data is known, which lets the header carry a checksum of the data it precedes.
    """

    def __init__(self, spool_dir: Path | None):
        # spool_dir None keeps the tensors in memory (an in-memory artifact that is never written)
        try:
            self._spool = (tempfile.NamedTemporaryFile(prefix=".spool.", suffix=".tmp", dir=spool_dir, delete=False)
                           if spool_dir is not None else None)
        except OSError as err:  # e.g. a directory that passes os.access for root but refuses new files (/proc)
            raise _fail(Path(spool_dir), err) from None
        self.tensors: dict[str, torch.Tensor] = {}
        self._index: dict[str, dict] = {}
        self._offset = 0
        self._hash = hashlib.sha256()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._index:
            raise ValueError(f"tensor {name!r} written twice")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor {name!r}: dtype {tensor.dtype} cannot be stored in safetensors")
        tensor = tensor.detach().to("cpu").contiguous()
        data = tensor_bytes(tensor)
        if self._spool is not None:
            try:
                self._spool.write(data)
            except OSError as err:  # disk full while spooling, before the output file exists
                self.close()
                raise _fail(Path(self._spool.name).parent, err) from None
        else:
            self.tensors[name] = tensor
        self._hash.update(data)
        end = self._offset + data.nbytes
        self._index[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                             "data_offsets": [self._offset, end]}
        self._offset = end

    @property
    def index(self) -> dict[str, dict]:
        """The safetensors tensor index (name → dtype, shape, data offsets) written so far."""
        return dict(self._index)

    @property
    def data_sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def data_bytes(self) -> int:
        return self._offset

    def header_bytes(self, metadata: dict[str, str] | None) -> bytes:
        return encode_header(self._index, metadata)

    def finish(self, target: Path, metadata: dict[str, str] | None = None) -> None:
        """Write header + spooled data to ``target`` (a path inside an :func:`atomic_path` block)."""
        if self._spool is None:
            raise ValueError("an in-memory writer has no spool to finish; save its tensors instead")
        self._spool.flush()
        header = self.header_bytes(metadata)
        with open(target, "wb") as out, open(self._spool.name, "rb") as data:
            out.write(header)
            out.flush()
            _copy_file(data, out, self._offset)
        self.close()

    def close(self) -> None:
        if self._spool is None:
            return
        with contextlib.suppress(OSError):  # flushing a full disk fails again; the spool goes regardless
            self._spool.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._spool.name)


def _copy_file(src, dst, count: int) -> None:
    """Append ``count`` bytes of ``src`` (from its start) to ``dst`` inside the kernel: no trip through
    Python buffers, and a reflink where the filesystem shares extents (XFS, Btrfs)."""
    done = 0
    try:
        while done < count:
            copied = os.copy_file_range(src.fileno(), dst.fileno(), count - done, done)
            if copied == 0:
                break
            done += copied
    except OSError as err:
        if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    if done < count:  # no copy_file_range here (or a short source): copy through user space
        src.seek(done)
        dst.seek(0, os.SEEK_END)
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


@functools.lru_cache(maxsize=1)
def _sync_file_range():
    """libc's ``sync_file_range`` (Linux), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start writing a just-written range to disk without waiting for it, so the final fsync of a
    model-sized file finds most of it already written instead of all of it dirty."""
    function = _sync_file_range()
    if function is not None:
        function(fd, offset, length, 2)  # SYNC_FILE_RANGE_WRITE; a failure only leaves the work to fsync


class PlannedSafetensorsWriter:
    """A ``.safetensors`` file whose tensor index is known before any data: the header is written
    first and each tensor straight to its planned place, so the data is written once, with no spool.

    ``specs`` lists (name, dtype, shape) in file order. :meth:`add` takes the tensors in any order
    and from any number of threads at once (each lands at its own offset, by ``pwrite``), checks
    that each is exactly the planned dtype and shape (a ValueError otherwise), and :meth:`finish`
    that every one came.
    """

    def __init__(self, target: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self._planned: dict[str, tuple[torch.dtype, tuple[int, ...], int]] = {}
        index, offset = {}, 0
        for name, dtype, shape in specs:
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
            end = offset + torch.Size(shape).numel() * dtype.itemsize
            index[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            self._planned[name] = (dtype, tuple(shape), offset)
            offset = end
        header = encode_header(index, metadata)
        self._data_start = len(header)
        self._missing = set(self._planned)
        self._lock = threading.Lock()
        self._fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        self._pwrite(memoryview(header), 0)
        os.ftruncate(self._fd, self._data_start + offset)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, data[done:], offset + done)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._planned:
            raise ValueError(f"tensor {name!r} is not in the planned index")
        dtype, shape, offset = self._planned[name]
        if (tensor.dtype, tuple(tensor.shape)) != (dtype, shape):
            raise ValueError(f"tensor {name!r} is {dtype_name(tensor.dtype)} {list(tensor.shape)} where "
                             f"{dtype_name(dtype)} {list(shape)} was planned")
        with self._lock:
            if name not in self._missing:
                raise ValueError(f"tensor {name!r} written twice")
            self._missing.discard(name)
        data = tensor_bytes(tensor)
        self._pwrite(data, self._data_start + offset)
        _start_writeback(self._fd, self._data_start + offset, data.nbytes)

    def finish(self) -> None:
        if self._missing:
            first = next(n for n in self._planned if n in self._missing)
            raise ValueError(f"{len(self._missing)} planned tensor(s) were never written, the first {first!r}")
        self.close()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def encode_header(index: dict[str, dict], metadata: dict[str, str] | None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file, padded to 8 bytes like the reference writer."""
    header = dict(index)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":"), sort_keys=False).encode()
    raw += b" " * ((-len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw
