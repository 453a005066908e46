"""Safe outputs: one guard for every path this package writes, atomic commits, a streaming safetensors writer.

:func:`check_output_path` is the guard: an output may not be, contain or lie inside an input (compared by
real path and by inode, so symlinks and hard links count), may not be the current directory or one of
its parents, and with ``overwrite`` may replace only a regular file or a directory this package wrote
(one holding an :data:`OUTPUT_MARKER` file). :func:`atomic_path` writes under a temporary name in the
destination directory, fsyncs, then renames over the final name, so a crash or SIGKILL leaves either
nothing or a complete output. Temporary names all match :data:`TEMP_NAME`; a live writer holds an
``flock`` on each, so the next write into that folder removes those left by killed runs.
:func:`_replace_or_remove` is the package's only caller of ``os.replace``, ``shutil.rmtree`` and
``os.unlink``, and re-checks that it touches nothing but those temporaries and guarded outputs.
:class:`SafetensorsWriter` appends tensors one at a time to a spool file and assembles a standard
``.safetensors`` file at the end, so a model-sized output never has to be held in memory.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import stat
import tempfile
import threading
import time
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


def refuse_json_constant(constant: str):
    """``json.loads(parse_constant=...)``: Python's json reads NaN/Infinity, which JSON does not have."""
    raise ValueError(f"{constant} is not valid JSON")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included), without a copy when contiguous."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


#: a file in every directory this package writes (``apply``'s model directories); only a directory holding
#: one may be replaced by ``overwrite``
OUTPUT_MARKER = ".deltadct-output"
_TEMP_PREFIX = ".deltadct-"
#: every temporary this package creates: ``.deltadct-<output name or "spool">.<8 random characters>.tmp``
#: (the random part is what :mod:`tempfile` draws), so no other program's file matches it by accident
TEMP_NAME = re.compile(r"^\.deltadct-.+\.[a-z0-9_]{8}\.tmp$")
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # renameat2 flag: swap two paths atomically (Linux ≥ 3.15)


#: temporaries older than this (and not locked) belong to runs that were killed; reset in forked children
_process_start = time.time()


def _restart_clock() -> None:
    global _process_start
    _process_start = time.time()


os.register_at_fork(after_in_child=_restart_clock)


def _fail(path: Path, err: OSError) -> OutputError:
    if err.errno == errno.ENOSPC:
        return OutputError(f"disk full while writing {path}")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return OutputError(f"cannot write {path}: permission denied")
    return OutputError(f"cannot write {path}: {err.strerror or err}")


def _input_identities(inputs) -> tuple[list[Path], set[tuple[int, int]]]:
    """Real paths and (device, inode) of every input and of the entries of input directories (their
    shards and sidecars, which may be symlinks, e.g. into a hub cache's blob store)."""
    paths, inodes = [], set()
    for item in inputs:
        if item is None:
            continue
        members = [Path(item)]
        if members[0].is_dir():
            with contextlib.suppress(OSError):
                members += list(members[0].iterdir())
        for member in members:
            try:
                st = member.stat()
            except OSError:
                continue
            paths.append(Path(os.path.realpath(member)))
            inodes.add((st.st_dev, st.st_ino))
    return paths, inodes


def _check_replaceable(path: Path, st: os.stat_result, *, is_dir: bool) -> None:
    """An existing output may be replaced only if it is a regular file, or a directory this package wrote."""
    if is_dir:
        marker = path / OUTPUT_MARKER
        if not stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output {path} exists and is not a directory; refusing to replace it")
        if not (marker.exists() and stat.S_ISREG(os.lstat(marker).st_mode)):
            raise OutputError(f"output {path} is a directory deltadct did not write (it has no {OUTPUT_MARKER} "
                              "file); refusing to replace it: remove it yourself or choose another output")
    elif not stat.S_ISREG(st.st_mode):
        kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode)
                else "a special file (device, FIFO or socket)")
        raise OutputError(f"output {path} is {kind}, not a regular file; refusing to replace it")


def check_output_path(path: str | os.PathLike, *, overwrite: bool = False, inputs=(), is_dir: bool = False) -> Path:
    """The output guard, run before any work and again just before the output is committed.

    Refuses an output that is, contains or lies inside one of ``inputs`` (by real path, and by inode
    for hard links); that is the current directory or a parent of it; that exists (unless
    ``overwrite``) or, with ``overwrite``, is anything but a regular file (a directory this package
    wrote, for ``is_dir`` outputs); or whose parent is missing or not writable.
    """
    path = Path(path)
    if TEMP_NAME.match(path.name):
        raise OutputError(f"output {path}: names like this are deltadct's temporaries (removed as stale); "
                          "choose another name")
    real = Path(os.path.realpath(path))
    try:
        cwd = Path(os.path.realpath(os.getcwd()))
    except OSError:  # a deleted working directory has no parents to protect
        cwd = None
    if cwd is not None and cwd.is_relative_to(real):
        where = "the current directory" if cwd == real else f"a parent of the current directory {cwd}"
        raise OutputError(f"output {path} is {where}; refusing to write there")
    input_paths, input_inodes = _input_identities(inputs)
    if real in input_paths:
        raise OutputError(f"output {path} is an input ({real}); choose another output")
    for source in input_paths:
        if source.is_relative_to(real):
            raise OutputError(f"output {path} contains the input {source}; choose another output")
        if real.is_relative_to(source):
            raise OutputError(f"output {path} lies inside the input {source}; choose another output")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as err:  # e.g. a parent that is a regular file: ENOTDIR
        if err.errno != errno.ENOTDIR:
            raise _fail(path, err) from None
        st = None
    if st is not None:
        if (st.st_dev, st.st_ino) in input_inodes:
            raise OutputError(f"output {path} is a hard link to an input; choose another output")
        if not overwrite:
            raise OutputError(f"output {path} already exists (pass overwrite=True / --overwrite to replace it)")
        _check_replaceable(path, st, is_dir=is_dir)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write {path}: directory {parent} is not writable")
    return path


def _replace_or_remove(temporary: Path, onto: Path | None = None) -> None:
    """The package's only caller of ``os.replace``, ``os.rename``, ``shutil.rmtree`` and ``os.unlink``.

    ``temporary`` must be one of this package's temporaries (its name matches :data:`TEMP_NAME`).
    Without ``onto`` it is removed. With ``onto`` it replaces ``onto`` atomically, after ``onto`` passes
    the replaceability check once more: absent, a regular file for a file, a directory holding
    :data:`OUTPUT_MARKER` for a directory. A directory is swapped in with one ``renameat2`` exchange
    (the old one then goes as a temporary), or where the filesystem cannot, moved aside first.
    """
    if not TEMP_NAME.match(temporary.name):
        raise OutputError(f"refusing to remove or rename {temporary}: it is not a deltadct temporary")
    temp_st = os.lstat(temporary)
    if onto is None:
        if stat.S_ISDIR(temp_st.st_mode):
            shutil.rmtree(temporary)
        else:
            os.unlink(temporary)
        return
    try:
        st = os.lstat(onto)
    except FileNotFoundError:
        st = None
    if st is None:
        os.rename(temporary, onto)
        return
    _check_replaceable(onto, st, is_dir=stat.S_ISDIR(temp_st.st_mode))
    if not stat.S_ISDIR(st.st_mode):
        os.replace(temporary, onto)
        return
    if _exchange(temporary, onto):
        shutil.rmtree(temporary)  # now the old directory
        return
    aside = temporary.with_name(f"{_TEMP_PREFIX}{onto.name}.{secrets.token_hex(4)}.tmp")
    os.rename(onto, aside)
    os.rename(temporary, onto)
    shutil.rmtree(aside)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically with Linux ``renameat2(RENAME_EXCHANGE)``; False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _discard(temporary: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        _replace_or_remove(temporary)


def remove_stale_temps(folder: Path) -> None:
    """Remove what killed runs left in ``folder``: entries named like this package's temporaries, last
    modified before this process started, and not locked by a live writer. Never fails the caller."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if not TEMP_NAME.match(entry.name):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)) or st.st_mtime >= _process_start:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer is alive
                _replace_or_remove(Path(entry.path))
            finally:
                os.close(fd)


def _make_temp(folder: Path, label: str, *, is_dir: bool) -> tuple[Path, int]:
    """A new temporary in ``folder`` and a descriptor holding an ``flock`` on it while this process lives."""
    prefix = f"{_TEMP_PREFIX}{label}."
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder))
        fd = os.open(tmp, os.O_RDONLY)
    else:
        fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        tmp = Path(name)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return tmp, fd


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, is_dir: bool = False, overwrite: bool = False,
                inputs=()) -> Iterator[Path]:
    """Yield a temporary sibling path; on success fsync and rename it to ``path``, else remove it.

    ``path`` passes :func:`check_output_path` (with ``inputs``) before and again just before the rename.
    A directory output gets the :data:`OUTPUT_MARKER` file, so a later ``overwrite`` may replace it.
    """
    path = check_output_path(path, overwrite=overwrite, inputs=inputs, is_dir=is_dir)
    remove_stale_temps(path.parent if str(path.parent) else Path("."))
    try:
        tmp, lock = _make_temp(path.parent, path.name, is_dir=is_dir)
    except OSError as err:
        raise _fail(path, err) from None
    try:
        if is_dir:
            (tmp / OUTPUT_MARKER).write_text("written by deltadct; `--overwrite` may replace this directory\n")
        yield tmp
        _fsync_tree(tmp)
        # mkstemp/mkdtemp create 0600/0700; give the output the permissions a plain open() would
        os.chmod(tmp, (0o777 if is_dir else 0o666) & ~_umask())
        check_output_path(path, overwrite=overwrite, inputs=inputs, is_dir=is_dir)
        _replace_or_remove(tmp, onto=path)
        _fsync_dir(path.parent)
    except OutputError:
        _discard(tmp)
        raise
    except OSError as err:
        _discard(tmp)
        raise _fail(path, err) from None
    except BaseException:
        _discard(tmp)
        raise
    finally:
        os.close(lock)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def atomic_write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True, inputs=()) -> None:
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_text(text)


def atomic_save_figure(fig, path: str | os.PathLike, *, inputs=(), **savefig_kwargs) -> None:
    """``fig.savefig`` through a temporary sibling (the format from ``path``'s suffix, e.g. ``.png``)."""
    path = Path(path)
    with atomic_path(path, overwrite=True, inputs=inputs) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or None, **savefig_kwargs)


class SafetensorsWriter:
    """Append tensors one by one, then :meth:`finish` into a standard ``.safetensors`` file.

    Tensor data goes to a spool file next to the destination as it arrives (hashed on the way), so
    memory stays at one tensor. ``metadata_fn(data_sha256)`` builds the ``__metadata__`` dict once all
    data is known, which lets the header carry a checksum of the data it precedes.
    """

    def __init__(self, spool_dir: Path | None):
        # spool_dir None keeps the tensors in memory (an in-memory artifact that is never written)
        self._spool = None
        if spool_dir is not None:
            remove_stale_temps(spool_dir)
            try:
                self._spool = tempfile.NamedTemporaryFile(prefix=f"{_TEMP_PREFIX}spool.", suffix=".tmp",
                                                          dir=spool_dir, delete=False)
                fcntl.flock(self._spool.fileno(), fcntl.LOCK_EX)  # marks it live for remove_stale_temps
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
        _discard(Path(self._spool.name))


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
