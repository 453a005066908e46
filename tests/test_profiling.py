"""The memory probe behind run records and benchmarks: a block that holds 64 MiB shows about 64 MiB."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deltadct.profiling import PeakMemory


# Run in a fresh interpreter: the suite's process holds state of earlier tests (mapped checkpoints, freed
# heap, worker threads) that can move its RSS while the block runs; a CI run saw +4 KiB for this block.
MEASURE_A_64_MIB_BLOCK = """
import json, time
import torch
from deltadct.profiling import PeakMemory, peak_rss_bytes
with PeakMemory("cpu") as memory:
    block = torch.ones(64 * 2**20 // 4, dtype=torch.float32, device="cpu")  # written, so resident
    block += 1
    # the probe samples every 10 ms from a thread: on a loaded machine keep the block alive until a
    # sample has seen it (5 s at most)
    deadline = time.monotonic() + 5
    while memory.extra_anon_bytes < 48 * 2**20 and time.monotonic() < deadline:
        time.sleep(0.01)
    del block
print(json.dumps({name: getattr(memory, name) for name in (
    "start_rss_bytes", "peak_rss_bytes", "extra_rss_bytes", "start_anon_bytes", "extra_anon_bytes",
    "cuda_peak_bytes", "cuda_extra_bytes")} | {"process_peak_rss_bytes": peak_rss_bytes()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous RSS is read from Linux's /proc")
def test_peak_memory_sees_a_block_that_holds_64_mib():
    run = subprocess.run([sys.executable, "-c", MEASURE_A_64_MIB_BLOCK], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr
    memory = json.loads(run.stdout.splitlines()[-1])
    assert memory["start_rss_bytes"] > 0 and memory["peak_rss_bytes"] >= memory["start_rss_bytes"]
    # the block is anonymous memory; total RSS also counts file pages (shared libraries) that the kernel
    # may reclaim meanwhile, so the block's size is checked on the anonymous figure
    assert memory["start_anon_bytes"] > 0
    assert 48 * 2**20 <= memory["extra_anon_bytes"] <= 200 * 2**20
    assert memory["cuda_peak_bytes"] is None and memory["cuda_extra_bytes"] is None  # a CPU block reads no CUDA
    # the kernel's process-wide peak (KiB pages, counted a little differently) is at least as high
    assert memory["process_peak_rss_bytes"] >= memory["peak_rss_bytes"] - 2**20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_reads_the_cuda_allocator_peak():
    with PeakMemory("cuda") as memory:
        block = torch.ones(16 * 2**20 // 4, device="cuda")
        del block
    assert memory.cuda_extra_bytes >= 16 * 2**20
