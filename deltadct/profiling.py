"""Memory figures for run records and tests."""
from __future__ import annotations

import resource
import sys


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
