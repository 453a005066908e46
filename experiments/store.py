"""The result store: one JSON object per line, append-only, safe under parallel writers.

Each record is appended with a single ``os.write`` on an ``O_APPEND`` descriptor, followed by
``fsync``, while holding an exclusive ``fcntl`` lock on a sibling ``.lock`` file, so joblib or Slurm
workers sharing the file never interleave and a SIGKILL leaves at most one unparsable last line
(skipped on read). Records are keyed by ``key``: the hash of the resolved config minus volatile keys,
plus the task, so a re-run can tell what is done and a killed sweep resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

#: the ``method`` of records that score the uncompressed fine-tuned model (the reference row)
REFERENCE_METHOD = "finetuned"


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ResultStore:
    """Append-only JSON-lines file of result records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def records(self) -> list[dict[str, Any]]:
        """Every complete record, in the order written."""
        if not self.path.is_file():
            return []
        out = []
        with open(self.path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    warnings.warn(f"{self.path}:{number}: skipping an incomplete record", stacklevel=2)
        return out

    def keys(self) -> set[str]:
        return {r["key"] for r in self.records() if "key" in r}

    def append(self, record: Mapping[str, Any], *, unless_present: bool = True) -> bool:
        """Append ``record`` (which must have a ``key``); with ``unless_present`` skip it if that key is
        already stored (checked under the lock, so two workers racing on one key store it once).
        Returns whether it was written."""
        line = (json.dumps(record, sort_keys=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._locked():
            if unless_present and record["key"] in self.keys():
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):  # never seen for regular files; refuse to leave half a record
                    os.ftruncate(fd, os.fstat(fd).st_size - written)
                    raise OSError(f"short write to {self.path}")
                os.fsync(fd)
            finally:
                os.close(fd)
        return True
