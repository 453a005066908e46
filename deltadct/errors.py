"""Typed errors: every bad input maps to one of these, with one line saying what and where.

The CLI and the Hydra runner print ``str(err)`` and exit non-zero; they never show a traceback
for a :class:`DeltaDCTError`.
"""
from __future__ import annotations


class DeltaDCTError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(DeltaDCTError, ValueError):
    """A method or policy option is out of range, of the wrong type, or unknown."""


class UnknownNameError(ConfigError, KeyError):
    """A name that is not in a registry (method, adapter, evaluator, zoo family); the message lists the known ones."""

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0] if self.args else "unknown name"


class UnknownMethodError(UnknownNameError):
    """A method name that is not in the registry."""


class CheckpointError(DeltaDCTError):
    """A checkpoint path that cannot be read: missing, unsupported format, unreadable."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint that could only be read by running code from it (pickle)."""


class KeyMismatchError(CheckpointError):
    """Base and fine-tuned checkpoints do not hold the same tensors."""


class ShapeMismatchError(CheckpointError):
    """A tensor has different shapes in base and fine-tuned."""


class NonFiniteError(DeltaDCTError, ValueError):
    """NaN or Inf in a weight or delta."""


class FormatError(DeltaDCTError):
    """A compressed file that is not a valid deltadct file (empty, truncated, tampered, wrong version)."""


class ChecksumError(FormatError):
    """The content checksum in the header does not match the file's tensors."""


class FingerprintMismatchError(DeltaDCTError):
    """A delta file applied to a base checkpoint other than the one it was made from."""


class OutputError(DeltaDCTError, OSError):
    """The output path exists, is not writable, or the disk is full."""
