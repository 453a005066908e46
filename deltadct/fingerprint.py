"""The base fingerprint: a hash of the base tensors a delta was made against, to refuse a wrong base.

Two algorithms, named in the file header (``base_fingerprint_algorithm``):

* ``sha256`` (files without the field): one sha256 over, per compressed base tensor in file order,
  ``"name|dtype|[shape]\\n"`` and the tensor's raw bytes. Inherently sequential: about 15 s for the
  13 GB of a 7B base on one core.
* ``sha256-chunked-16MiB`` (what new files record): the same stream, except that each tensor's
  bytes are replaced by the concatenated sha256 digests of its consecutive 16 MiB chunks (the last
  one shorter). A hash of hashes over a fixed chunking is exactly as collision resistant as sha256
  itself, and the chunks are hashed in parallel threads (hashlib releases the GIL), overlapping
  the reads and the codec.

:class:`BaseFingerprint` takes tensors as they are read and hashes them in the background; it holds
a bounded number of tensors, so memory does not grow with the model.
"""
from __future__ import annotations

import hashlib
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .errors import FormatError
from .io import dtype_name, tensor_bytes

SEQUENTIAL = "sha256"
CHUNKED = "sha256-chunked-16MiB"
ALGORITHMS = (SEQUENTIAL, CHUNKED)
#: the algorithm of a header that does not name one (files written before the field existed)
DEFAULT_FOR_OLD_FILES = SEQUENTIAL
CHUNK_BYTES = 16 * 2**20


def _tensor_line(name: str, tensor: torch.Tensor) -> bytes:
    return f"{name}|{dtype_name(tensor.dtype)}|{list(tensor.shape)}\n".encode()


def _chunk_digests(data: memoryview) -> bytes:
    return b"".join(hashlib.sha256(data[i:i + CHUNK_BYTES]).digest() for i in range(0, data.nbytes, CHUNK_BYTES))


def algorithm_of(header: dict) -> str:
    """The fingerprint algorithm a file header records (old files: plain sha256)."""
    algorithm = header.get("base_fingerprint_algorithm", DEFAULT_FOR_OLD_FILES)
    if algorithm not in ALGORITHMS:
        raise FormatError(f"unknown base fingerprint algorithm {algorithm!r}; this deltadct knows {list(ALGORITHMS)}")
    return algorithm


class BaseFingerprint:
    """Hash base tensors in the background, in the order given; :meth:`hexdigest` waits for all of them.

    ``update`` returns at once unless ``max_pending`` tensors are still being hashed, in which case
    it waits for the oldest (the bound on what the fingerprint keeps alive). Tensors must be CPU
    tensors that nobody writes to until they are hashed. Use as a context manager, or call
    :meth:`close`, so the threads stop on an error too.
    """

    def __init__(self, algorithm: str = CHUNKED, *, threads: int | None = None, max_pending: int = 4):
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unknown fingerprint algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._digest = hashlib.sha256()
        # sequential sha256 is one ordered stream: one thread; chunks spread over the cores
        workers = 1 if algorithm == SEQUENTIAL else (threads or max(1, min(8, (os.cpu_count() or 2) - 1)))
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="deltadct-fingerprint")
        self._pending: deque[tuple[bytes, list[Future]]] = deque()
        self._max_pending = max_pending

    def update(self, name: str, tensor: torch.Tensor) -> None:
        data = tensor_bytes(tensor)
        if self.algorithm == SEQUENTIAL:
            line = _tensor_line(name, tensor)
            jobs = [self._pool.submit(self._digest.update, line), self._pool.submit(self._digest.update, data)]
            self._pending.append((b"", jobs))
        else:
            # one job per 16 MiB chunk group, so a large tensor spreads over every thread
            step = CHUNK_BYTES * 4
            jobs = [self._pool.submit(_chunk_digests, data[i:i + step]) for i in range(0, data.nbytes, step)]
            self._pending.append((_tensor_line(name, tensor), jobs))
        while len(self._pending) > self._max_pending:
            self._fold_oldest()

    def _fold_oldest(self) -> None:
        line, jobs = self._pending.popleft()
        results = [job.result() for job in jobs]
        if self.algorithm == CHUNKED:
            self._digest.update(line + b"".join(results))

    def hexdigest(self) -> str:
        while self._pending:
            self._fold_oldest()
        return self._digest.hexdigest()

    def close(self) -> None:
        for _, jobs in self._pending:
            for job in jobs:
                job.cancel()
        self._pending.clear()
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "BaseFingerprint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

