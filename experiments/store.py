"""The result store: one JSON object per line, append-only, safe under parallel writers, losing nothing.

Each record is appended with a single ``os.write`` on an ``O_APPEND`` descriptor, followed by
``fsync``, while holding an exclusive ``fcntl`` lock on a sibling ``.lock`` file, so joblib or Slurm
workers sharing the file never interleave. A line that is not a JSON object (a writer killed
mid-line, a hand edit, bytes that are not UTF-8) is never silently dropped and never glued to the
next record: the next read or append moves it, verbatim, to the ``<store>.corrupt`` sidecar with a
warning naming its line, and rewrites the store atomically without it. Records are keyed by ``key``:
the hash of the resolved config minus volatile keys, plus the task, so a re-run can tell what is
done and a killed sweep resumes where it stopped.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import stat
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping

from deltadct.errors import OutputError
from deltadct.io import atomic_path, check_output_path

#: the ``method`` of records that score the uncompressed fine-tuned model (the reference row)
REFERENCE_METHOD = "finetuned"


def config_hash(config: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _parse(data: bytes) -> tuple[list[tuple[bytes, dict]], list[tuple[int, bytes, str]]]:
    """(raw line, record) for every JSON-object line, and (line number, raw line, why) for every other one."""
    good, bad = [], []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            bad.append((number, raw, "not UTF-8"))
            continue
        except (ValueError, RecursionError):
            bad.append((number, raw, "incomplete line" if number == len(lines) else "not JSON"))
            continue
        if isinstance(record, dict):
            good.append((raw, record))
        else:
            bad.append((number, raw, f"a JSON {type(record).__name__}, not an object"))
    return good, bad


class ResultStore:
    """Append-only JSON-lines file of result records."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock_path = self.path.with_name(self.path.name + ".lock")
        #: where lines that are not records are moved, verbatim, one per line
        self.corrupt_path = self.path.with_name(self.path.name + ".corrupt")

    def check_writable(self) -> None:
        """Raise :class:`OutputError` now, before any work, if records could not be appended here."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(self.path):
                if not stat.S_ISREG(os.stat(self.path).st_mode):
                    raise OutputError(f"result store {self.path} is not a regular file")
                os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND))
            os.close(os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644))
        except OutputError:
            raise
        except (FileExistsError, NotADirectoryError) as err:  # a file where a folder of the path should be
            raise OutputError(f"result store {self.path} is not writable: {err.filename} is not a directory") from None
        except OSError as err:
            raise OutputError(f"result store {self.path} is not writable: {err.strerror or err}"
                              f"{f' ({err.filename})' if err.filename else ''}") from None

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
        """Every record, in the order written; lines that are not records are quarantined first."""
        if not self.path.is_file():
            return []
        good, bad = _parse(self.path.read_bytes())
        if bad:
            try:
                with self._locked():
                    good = self._clean()
            except OSError as err:  # a read-only store: report the lines, leave the file as it is
                for number, _, why in bad:
                    warnings.warn(f"{self.path}:{number}: skipping a line that is not a record ({why}); it could "
                                  f"not be moved to {self.corrupt_path}: {err}", stacklevel=2)
                return [record for _, record in good]
        return [record for _, record in good]

    def _clean(self) -> list[tuple[bytes, dict]]:
        """Under the lock: quarantine every line that is not a record and end the file with a newline."""
        data = self.path.read_bytes() if self.path.is_file() else b""
        good, bad = _parse(data)
        if bad:
            check_output_path(self.corrupt_path, overwrite=True, inputs=(self.path,))
            fd = os.open(self.corrupt_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, b"".join(raw + b"\n" for _, raw, _ in bad))
                os.fsync(fd)
            finally:
                os.close(fd)
            with atomic_path(self.path, overwrite=True) as tmp:
                tmp.write_bytes(b"".join(raw + b"\n" for raw, _ in good))
            for number, _, why in bad:
                warnings.warn(f"{self.path}:{number}: moved a line that is not a record ({why}) to "
                              f"{self.corrupt_path}", stacklevel=3)
        elif data and not data.endswith(b"\n"):  # a complete last record whose newline is missing
            self._write(b"\n")
        return good

    def keys(self) -> set[str]:
        return {r["key"] for r in self.records() if "key" in r}

    def append(self, record: Mapping[str, Any], *, unless_present: bool = True) -> bool:
        """Append ``record`` (which must have a ``key``); with ``unless_present`` skip it if that key is
        already stored (checked under the lock, so two workers racing on one key store it once).
        Returns whether it was written."""
        line = (json.dumps(record, sort_keys=False, separators=(",", ":"), default=str) + "\n").encode()
        with self._locked():
            stored = self._clean()
            if unless_present and record["key"] in {r["key"] for _, r in stored if "key" in r}:
                return False
            self._write(line)
        return True

    def _write(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
            if written != len(data):  # never seen for regular files; refuse to leave half a record
                os.ftruncate(fd, os.fstat(fd).st_size - written)
                raise OSError(f"short write to {self.path}")
            os.fsync(fd)
        finally:
            os.close(fd)
