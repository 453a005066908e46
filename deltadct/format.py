"""The compressed file: one ``.safetensors`` file with a JSON header under ``__metadata__["deltadct"]``.

Tensors are named ``"<tensor name>::<field>"``: a compressed tensor's fields are whatever its method
wrote (packed codes, side information, scales); a kept or new tensor has one field, ``value``, holding
the fine-tuned tensor exactly. The header records the format version, the method and its full config,
the tensor policy, each entry's kind/shape/dtype, the base-checkpoint fingerprint (sha256 of the base
tensors that were compressed, by name, dtype, shape and bytes), and a content checksum (sha256 of the
header without the checksum, the safetensors tensor index, then every tensor byte). Loading goes through ``safetensors`` only, so
reading a file never unpickles anything.

``bits_per_param`` is measured, not computed from ratios: the file's size in bytes on disk, minus the
bytes of kept/new tensors, × 8, divided by the number of compressed parameters. Everything else the
file holds — side information, allocation maps, the JSON header — is counted.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ChecksumError, DeltaDCTError, FormatError
from .io import SafetensorsWriter, atomic_path, dtype_from_name
from .methods import Compressed, Method, create_method
from .pipeline import surely_finite

FORMAT_NAME = "deltadct"
FORMAT_VERSION = 1
FIELD_SEP = "::"
VALUE_FIELD = "value"
ENTRY_KINDS = ("compressed", "kept", "new")
_HEADER_LIMIT = 100 * 1024 * 1024  # the safetensors reference reader's own cap


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def content_checksum(header: dict, data_sha256: str, index: dict[str, dict]) -> str:
    """sha256 over the deltadct header (minus this checksum), the safetensors tensor index and the data.

    The index (dtype, shape, offsets of every tensor) is covered too: otherwise retyping a tensor
    (F32 → I32) or swapping two equal-sized tensors' offsets would pass as an intact file.
    """
    body = {k: v for k, v in header.items() if k != "content_sha256"}
    index_json = json.dumps(index, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical_json(body).encode() + b"\n" + index_json.encode() + b"\n"
                          + data_sha256.encode()).hexdigest()


def tensor_name(entry: str, field: str) -> str:
    return f"{entry}{FIELD_SEP}{field}"


class DeltaFile:
    """A compressed delta, on disk or in memory: header plus its tensors, read on demand."""

    def __init__(self, header: dict, get_tensor: Callable[[str], torch.Tensor], *, size_bytes: int,
                 path: Path | None = None, tensors: dict[str, torch.Tensor] | None = None):
        self.header = header
        self._get = get_tensor
        self.size_bytes = size_bytes
        self.path = path
        self._tensors = tensors  # set for in-memory artifacts, so they can be saved
        self._method: Method | None = None

    # -- header views --------------------------------------------------------------------------
    @property
    def method_name(self) -> str:
        return self.header["method"]

    @property
    def config(self) -> dict:
        return self.header["config"]

    @property
    def entries(self) -> dict[str, dict]:
        return self.header["entries"]

    def names(self, kind: str | None = None) -> list[str]:
        return [n for n, e in self.entries.items() if kind is None or e["kind"] == kind]

    @property
    def method(self) -> Method:
        if self._method is None:
            self._method = create_method(self.method_name, self.config)
        return self._method

    # -- tensors -------------------------------------------------------------------------------
    def fields(self, name: str, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        entry = self._entry(name)
        return {f: self._get(tensor_name(name, f)).to(device) for f in entry["fields"]}

    def compressed(self, name: str, device: torch.device | str = "cpu") -> Compressed:
        return Compressed(self.fields(name, device), dict(self._entry(name).get("meta", {})))

    def reconstruct(self, name: str, device: torch.device | str = "cpu", *, check_finite: bool = True) -> torch.Tensor:
        """The reconstructed float32 delta of a compressed entry.

        ``check_finite=False`` leaves the NaN/Inf check to the caller (a streaming caller checks
        later, so the host need not wait for the device on every tensor).
        """
        entry = self._entry(name)
        if entry["kind"] != "compressed":
            raise FormatError(f"{name!r} is a {entry['kind']} tensor, not a compressed delta")
        try:
            out = self.method.reconstruct(self.compressed(name, device), tuple(entry["shape"]))
        except DeltaDCTError:
            raise
        except (KeyError, ValueError, IndexError, TypeError, RuntimeError) as err:
            # fields that do not fit the shape/config (a hand-edited or foreign file): a typed error, not a crash
            raise FormatError(f"{self._where()}: entry {name!r} cannot be decoded with its recorded method and "
                              f"config ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
        if tuple(out.shape) != tuple(entry["shape"]) or (check_finite and not bool(surely_finite(out))):
            raise FormatError(f"{self._where()}: entry {name!r} does not decode to a finite tensor of shape "
                              f"{entry['shape']}")
        return out

    def value(self, name: str) -> torch.Tensor:
        """The stored fine-tuned value of a kept or new entry."""
        entry = self._entry(name)
        if entry["kind"] == "compressed":
            raise FormatError(f"{name!r} is compressed; use reconstruct()")
        return self._get(tensor_name(name, VALUE_FIELD))

    def _entry(self, name: str) -> dict:
        try:
            return self.entries[name]
        except KeyError:
            raise FormatError(f"{self._where()} has no tensor {name!r}") from None

    def _where(self) -> str:
        return str(self.path) if self.path else "in-memory delta"

    # -- accounting ----------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        comp = {n: e for n, e in self.entries.items() if e["kind"] == "compressed"}
        num_params = sum(_numel(e["shape"]) for e in comp.values())
        kept_bytes = sum(e["bytes"] for e in self.entries.values() if e["kind"] != "compressed")
        kept_params = sum(_numel(e["shape"]) for e in self.entries.values() if e["kind"] != "compressed")
        compressed_bytes = self.size_bytes - kept_bytes
        layers = {n: {"shape": e["shape"], "bits_per_param": round(e["bytes"] * 8 / max(_numel(e["shape"]), 1), 5),
                      **({"rel_error": e["rel_error"]} if "rel_error" in e else {})} for n, e in comp.items()}
        return {
            "path": str(self.path) if self.path else None,
            "format_version": self.header["format_version"],
            "method": self.method_name,
            "config": self.config,
            "policy": self.header.get("policy", {}),
            "num_params": num_params,
            "bits_per_param": compressed_bytes * 8 / num_params if num_params else 0.0,
            "total_bits_per_param": self.size_bytes * 8 / num_params if num_params else 0.0,
            "file_bytes": self.size_bytes,
            "compressed_bytes": compressed_bytes,
            "kept_bytes": kept_bytes,
            "kept_params": kept_params,
            "num_compressed": len(comp),
            "num_kept": sum(1 for e in self.entries.values() if e["kind"] == "kept"),
            "num_new": sum(1 for e in self.entries.values() if e["kind"] == "new"),
            "base_fingerprint": self.header["base_fingerprint"],
            "layers": layers,
        }

    # -- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        if self._tensors is None:
            raise FormatError(f"{self._where()} is already a file; copy it instead")
        writer = SafetensorsWriter(Path(path).parent if str(Path(path).parent) else Path("."))
        try:
            for name, tensor in self._tensors.items():
                writer.add(name, tensor)
            with atomic_path(path, overwrite=overwrite) as tmp:
                writer.finish(tmp, {FORMAT_NAME: canonical_json(self.header)})
        finally:
            writer.close()
        return Path(path)


def _numel(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def finalize_header(header: dict, writer: SafetensorsWriter) -> dict:
    """Add the content checksum for the data the writer holds."""
    header = dict(header)
    header.pop("content_sha256", None)
    header["content_sha256"] = content_checksum(header, writer.data_sha256, writer.index)
    return header


def in_memory(header: dict, writer: SafetensorsWriter) -> DeltaFile:
    size = len(writer.header_bytes({FORMAT_NAME: canonical_json(header)})) + writer.data_bytes
    tensors = writer.tensors
    return DeltaFile(header, tensors.__getitem__, size_bytes=size, tensors=tensors)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def read_header(path: Path) -> tuple[dict, int, dict]:
    """Parse and validate the container; return (deltadct header, data offset, safetensors index)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise FormatError(f"{path} does not exist") from None
    if path.is_dir():
        raise FormatError(f"{path} is a directory, not a deltadct file")
    if size == 0:
        raise FormatError(f"{path} is empty")
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise FormatError(f"{path} is truncated ({size} bytes): not a deltadct file")
        n = int.from_bytes(head, "little")
        if n > min(size - 8, _HEADER_LIMIT):
            raise FormatError(f"{path} is truncated or not a safetensors file (header of {n} bytes in a "
                              f"{size}-byte file)")
        raw = fh.read(n)
    try:  # RecursionError: deeply nested JSON arrays in a hostile header
        index = json.loads(raw)
        meta = index.pop("__metadata__", None) or {}
        header = json.loads(meta[FORMAT_NAME])
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise FormatError(f"{path} is not a deltadct file (no valid deltadct header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise FormatError(f"{path} is not a deltadct file (header format {header.get('format') if isinstance(header, dict) else None!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {version!r}; this deltadct reads version {FORMAT_VERSION}")
    for key in ("method", "config", "entries", "base_fingerprint", "content_sha256"):
        if key not in header:
            raise FormatError(f"{path}: header lacks {key!r}")
    if not isinstance(index, dict) or not all(isinstance(v, dict) and "data_offsets" in v for v in index.values()):
        raise FormatError(f"{path}: malformed tensor index")
    try:
        data_end = max((int(v["data_offsets"][1]) for v in index.values()), default=0)
    except (TypeError, ValueError, KeyError, IndexError, OverflowError):  # OverflowError: an offset of 1e400
        raise FormatError(f"{path}: malformed tensor index") from None
    _check_header_structure(path, header)
    if 8 + n + data_end != size:
        raise FormatError(f"{path} is truncated or has trailing bytes: {size} bytes on disk, "
                          f"{8 + n + data_end} expected")
    return header, 8 + n, index


def _check_header_structure(path: Path, header: dict) -> None:
    """Types of the header fields readers index into, so a malformed header is a FormatError, not a crash."""
    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: malformed header ({what})")

    if not isinstance(header["method"], str) or not isinstance(header["config"], dict):
        raise bad("method must be a string and config an object")
    if not isinstance(header["entries"], dict):
        raise bad("entries must be an object")
    for name, entry in header["entries"].items():
        if not (isinstance(entry, dict) and entry.get("kind") in ENTRY_KINDS and isinstance(entry.get("dtype"), str)
                and isinstance(entry.get("bytes"), int) and isinstance(entry.get("shape"), list)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in entry["shape"])
                and isinstance(entry.get("fields"), list) and all(isinstance(f, str) for f in entry["fields"])
                and isinstance(entry.get("meta", {}), dict)):
            raise bad(f"entry {name!r} needs a known kind, a dtype, a byte count, a shape of non-negative "
                      "integers and a list of field names")
    if not (isinstance(header.get("from_base", []), list) and all(isinstance(n, str) for n in header.get("from_base", []))):
        raise bad("from_base must be a list of tensor names")
    key_map = header.get("key_map", {})
    if not (isinstance(key_map, dict) and all(isinstance(v, str) for v in key_map.values())):
        raise bad("key_map must map to strings")


def data_checksum(path: Path, offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path, header: dict, offset: int, index: dict[str, dict]) -> None:
    expected = header["content_sha256"]
    if content_checksum(header, data_checksum(path, offset), index) != expected:
        raise ChecksumError(f"{path}: content checksum mismatch — the file is corrupt or was modified")


def load(path: str | os.PathLike, *, verify: bool = True) -> DeltaFile:
    """Open a deltadct file; with ``verify`` (default) check its content checksum first."""
    from safetensors import safe_open

    path = Path(path)
    header, offset, index = read_header(path)
    if verify:
        verify_checksum(path, header, offset, index)
    expected = {tensor_name(n, f) for n, e in header["entries"].items() for f in e.get("fields", [])}
    if expected != set(index):
        raise FormatError(f"{path}: tensors in the file do not match the header's entries")
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as err:
        raise FormatError(f"{path} is not a readable safetensors file: {err}") from None

    def get(name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as err:
            raise FormatError(f"{path}: cannot read tensor {name!r}: {err}") from None

    for name, entry in header["entries"].items():
        if entry.get("kind") not in ENTRY_KINDS:
            raise FormatError(f"{path}: entry {name!r} has unknown kind {entry.get('kind')!r}")
        try:
            dtype_from_name(str(entry.get("dtype")))
        except ValueError:
            raise FormatError(f"{path}: entry {name!r} has unknown dtype {entry.get('dtype')!r}") from None
    return DeltaFile(header, get, size_bytes=path.stat().st_size, path=path)
