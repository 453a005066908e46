"""The streaming machinery behind :func:`deltadct.compress` and :func:`deltadct.apply`.

Three stages run at once, so a command takes about as long as its slowest stage (reading the
checkpoints) rather than the sum of all of them:

* :func:`prefetch`: worker threads read the next tensors (``pread`` into page-locked buffers when
  the device is a GPU), a bounded number ahead of the consumer;
* the caller's thread: copies to the device (asynchronous from page-locked memory), forms the
  delta there and runs the codec, without waiting for the device;
* :class:`BackgroundWriter`: copies results back to the host (the only place that waits for the
  device) and writes them, while :class:`deltadct.fingerprint.BaseFingerprint` hashes the base.

Memory is bounded by the queues: ``depth`` read-ahead items, ``max_queued`` results waiting to be
written, a few tensors being hashed, whatever the model size.
"""
from __future__ import annotations

import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

#: tensors read ahead (four layers' base + fine-tuned pairs)
PREFETCH_DEPTH = 8


def reader_threads() -> int:
    """Threads reading checkpoints: reads from the page cache are memory copies, which scale with cores
    (half of them, leaving the rest to the fingerprint, the writer and the caller)."""
    return max(2, min(8, (os.cpu_count() or 2) // 2))


def prefetch(fn: Callable[[T], R], items: Iterable[T], *, depth: int = PREFETCH_DEPTH,
             workers: int | None = None) -> Iterator[R]:
    """``fn(item)`` for every item, computed up to ``depth`` items ahead in worker threads, yielded in order.

    An exception raised by ``fn`` is raised here, at its item; items after it are cancelled.
    Leaving the loop early (an error in the consumer) cancels what is queued and waits for the
    reads in flight, so no thread outlives the call.
    """
    pool = ThreadPoolExecutor(workers or reader_threads(), thread_name_prefix="deltadct-read")
    pending: deque[Future] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                break
        while pending:
            result = pending.popleft().result()
            for item in source:
                pending.append(pool.submit(fn, item))
                break
            yield result
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to ``device`` in the tensor's own dtype (conversions then run on the device, not the host);
    asynchronous from page-locked memory. (Not asked for a CPU target: on a machine without a GPU the
    question costs about 0.5 ms a tensor, 5 % of a RoBERTa-base compress.)"""
    return tensor.to(device, non_blocking=device.type != "cpu" and tensor.is_pinned())


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of a CUDA tensor through a page-locked buffer (the host allocator reuses those, where
    a fresh pageable buffer costs a page fault per 4 KiB); CPU tensors as they are. Waits for the
    copy only, not for work queued after it."""
    if tensor.device.type != "cuda":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return host


def delta_of(finetuned: torch.Tensor, base: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``float32(finetuned) − float32(base)`` on ``device``, in two passes (the base is converted on the fly)."""
    return to_device(finetuned, device).to(torch.float32).sub_(to_device(base, device))


def surely_finite(tensor: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on the tensor's device: True when every element is finite.

    On the CPU, where ``isfinite`` runs at a fraction of memory speed, the sum decides first: a
    finite sum implies finite elements (NaN and ±inf propagate; +inf and −inf give NaN). Only a
    non-finite sum, which an overflow of large finite values can also give, takes the exact test.
    """
    if tensor.device.type == "cuda":
        return torch.isfinite(tensor).all()
    total = torch.isfinite(tensor.sum())
    return total if bool(total) else torch.isfinite(tensor).all()


class LaggedChecks:
    """Device-side checks read back a few items late, so the host never waits for the device on them.

    ``add(flag, on_failure)`` queues a 0-dim bool tensor; once more than ``lag`` are queued the
    oldest is read (by then long computed) and ``on_failure()`` runs if it is False; it is expected
    to raise. :meth:`drain` reads all the rest.
    """

    def __init__(self, lag: int = 2):
        self._queued: deque[tuple[torch.Tensor, Callable[[], None]]] = deque()
        self._lag = lag

    def add(self, flag: torch.Tensor, on_failure: Callable[[], None]) -> None:
        if flag.device.type != "cuda":  # nothing to wait for: check now
            if not bool(flag):
                on_failure()
            return
        self._queued.append((flag, on_failure))
        while len(self._queued) > self._lag:
            self._check_oldest()

    def _check_oldest(self) -> None:
        flag, on_failure = self._queued.popleft()
        if not bool(flag):
            on_failure()

    def drain(self) -> None:
        while self._queued:
            self._check_oldest()


class BackgroundWriter:
    """Runs ``write(name, tensor)`` on background threads, with tensors moved to the host there.

    One thread (the default) writes in the order of :meth:`put`, as an appending writer needs;
    ``threads > 1`` suits a writer that places each tensor itself (``PlannedSafetensorsWriter``).
    ``put`` returns at once unless ``max_queued`` items wait (the memory bound). The first error of
    a thread is raised by the next ``put`` or by :meth:`finish`; after it nothing more is written.
    """

    _DONE = object()

    def __init__(self, write: Callable[[str, torch.Tensor], Any], *, threads: int = 1, max_queued: int = 8):
        self._write = write
        self._queue: queue.Queue = queue.Queue(max_queued)
        self._error: BaseException | None = None
        self._threads = [threading.Thread(target=self._run, name="deltadct-write", daemon=True)
                         for _ in range(threads)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._DONE:
                return
            if self._error is not None:
                continue  # drain what is queued so put() never blocks forever
            try:
                name, tensor = item
                self._write(name, to_host(tensor.detach()))
            except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, re-raised there
                self._error = err

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, name: str, tensor: torch.Tensor) -> None:
        self._raise()
        self._queue.put((name, tensor))

    def finish(self) -> None:
        """Wait until everything queued is written; raise a thread's error if there was one."""
        self.close()
        self._raise()

    def close(self) -> None:
        alive = [thread for thread in self._threads if thread.is_alive()]
        for _ in alive:
            self._queue.put(self._DONE)
        for thread in alive:
            thread.join()


def relative_error(delta: torch.Tensor, approx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """‖Δ̂ − Δ‖ and ‖Δ‖ as device scalars (read later with :func:`rounded_relative_error`)."""
    return torch.linalg.vector_norm(approx - delta), torch.linalg.vector_norm(delta)


def rounded_relative_error(err: torch.Tensor, norm: torch.Tensor) -> float:
    err, norm = float(err), float(norm)
    return round(err / norm, 6) if norm > 0 else (0.0 if err == 0 else 1.0)


__all__ = ["prefetch", "to_device", "delta_of", "surely_finite", "LaggedChecks", "BackgroundWriter",
           "relative_error", "rounded_relative_error", "PREFETCH_DEPTH"]
