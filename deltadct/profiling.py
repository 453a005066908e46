"""Memory figures for run records, benchmarks and tests: one probe, :class:`PeakMemory`, plus the
process-wide peaks the kernel keeps."""
from __future__ import annotations

import resource
import sys
import threading
from typing import Any

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``: KiB on Linux, bytes on macOS).

    It counts file pages the process has mapped and touched (memory-mapped checkpoints) as well as
    its own allocations.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def anon_rss_bytes() -> int:
    """Current anonymous (non file-backed) resident memory in bytes, from /proc (Linux); 0 elsewhere.

    Unlike :func:`peak_rss_bytes` this leaves out pages of memory-mapped files, which the kernel
    can drop at any time, so it is what a streamed compression really holds.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakMemory:
    """Peak memory while a block runs: ``with PeakMemory(device) as mem: ...``.

    The process RSS is sampled by a thread every ``interval`` seconds (and at entry and exit):
    ``start_rss_bytes``, ``peak_rss_bytes`` and ``extra_rss_bytes`` (peak above the start), and the
    same for anonymous memory (``*_anon_bytes``, Linux only, else 0). The anonymous figures are what the
    block itself allocated: total RSS also counts file pages (mapped shared libraries, memory-mapped
    checkpoints) that the kernel may reclaim while the block runs, so under memory pressure a 64 MiB
    allocation can leave total RSS flat (seen on a CI machine). On a CUDA
    ``device`` torch's allocator peak is read too: ``cuda_start_bytes``, ``cuda_peak_bytes`` and
    ``cuda_extra_bytes`` (None elsewhere). Sampling needs ``psutil`` (the ``experiments`` extra).
    """

    def __init__(self, device: torch.device | str = "cpu", *, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._device = torch.device(device)
        self._stop = threading.Event()
        self.start_rss_bytes = self.peak_rss_bytes = 0
        self.start_anon_bytes = self.peak_anon_bytes = 0
        self.cuda_start_bytes: int | None = None
        self.cuda_peak_bytes: int | None = None

    def _rss(self) -> int:
        return self._process.memory_info().rss

    def _update_peaks(self) -> None:
        self.peak_rss_bytes = max(self.peak_rss_bytes, self._rss())
        self.peak_anon_bytes = max(self.peak_anon_bytes, anon_rss_bytes())

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._update_peaks()

    def __enter__(self) -> "PeakMemory":
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            torch.cuda.reset_peak_memory_stats(self._device)
            self.cuda_start_bytes = torch.cuda.memory_allocated(self._device)
        self.start_rss_bytes = self.peak_rss_bytes = self._rss()
        self.start_anon_bytes = self.peak_anon_bytes = anon_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._update_peaks()
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
            self.cuda_peak_bytes = torch.cuda.max_memory_allocated(self._device)

    @property
    def extra_rss_bytes(self) -> int:
        return self.peak_rss_bytes - self.start_rss_bytes

    @property
    def extra_anon_bytes(self) -> int:
        return self.peak_anon_bytes - self.start_anon_bytes

    @property
    def cuda_extra_bytes(self) -> int | None:
        return None if self.cuda_peak_bytes is None else self.cuda_peak_bytes - self.cuda_start_bytes
