"""The memory probe behind run records and benchmarks: a block that holds 64 MiB shows about 64 MiB."""
from __future__ import annotations

import time

import pytest
import torch

from deltadct.profiling import PeakMemory, peak_rss_bytes


def test_peak_memory_sees_a_block_that_holds_64_mib():
    with PeakMemory("cpu") as memory:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, written so its pages are resident
        block += 1
        # the probe samples every 10 ms from a thread: on a loaded machine a block that lives a few ms can
        # fall between two samples (a loaded 2-core run here saw 4 KiB once), so keep it alive until a
        # sample sees it (5 s at most)
        deadline = time.monotonic() + 5
        while memory.peak_rss_bytes - memory.start_rss_bytes < 48 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.01)
        del block
    assert memory.start_rss_bytes > 0 and memory.peak_rss_bytes >= memory.start_rss_bytes
    assert 48 * 2**20 <= memory.extra_rss_bytes <= 200 * 2**20
    assert memory.cuda_peak_bytes is None and memory.cuda_extra_bytes is None  # a CPU block reads no CUDA stats
    # the kernel's process-wide peak (KiB pages, counted a little differently) is at least as high
    assert peak_rss_bytes() >= memory.peak_rss_bytes - 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_reads_the_cuda_allocator_peak():
    with PeakMemory("cuda") as memory:
        block = torch.ones(16 * 2**20 // 4, device="cuda")
        del block
    assert memory.cuda_extra_bytes >= 16 * 2**20
