"""The compressed file: one ``.safetensors`` file with a JSON header under ``__metadata__["deltadct"]``.

Tensors are named ``"<tensor name>::<field>"``: a compressed tensor's fields are whatever its method
wrote (packed codes, side information, scales); a kept or new tensor has one field, ``value``, holding
the fine-tuned tensor exactly. The header records the format version, the method and its full config,
the config version, the deltadct version and base model that made it, the tensor policy, each entry's
kind/shape/dtype, the base-checkpoint fingerprint (sha256 of the base tensors that were compressed, by name,
dtype, shape and bytes), and a content checksum (sha256 of the header without the checksum, the safetensors
tensor index, then every tensor byte). Loading goes through ``safetensors`` only, so reading a file never
unpickles anything.

``bits_per_param`` is measured, not computed from ratios: the file's size in bytes on disk, minus the
bytes of kept/new tensors, × 8, divided by the number of compressed parameters. Everything else the
file holds — side information, allocation maps, the JSON header — is counted.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .errors import ChecksumError, DeltaDCTError, FormatError
from .io import SAFETENSORS_DTYPES, SafetensorsWriter, atomic_path, check_output_path, dtype_name, refuse_json_constant
from .methods import Compressed, Method, get_method_class
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
    def config_version(self) -> int:
        """Version of the method's config the file was written with (files before versioning: 1)."""
        return self.header.get("config_version", 1)

    @property
    def method(self) -> Method:
        """The method that decodes the file, configured as recorded: options the file lacks (added to
        the method after it was written) take the value files of its config version implied."""
        if self._method is None:
            self._method = get_method_class(self.method_name).from_recorded(self.config, self.config_version)
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
                              f"config ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                              ) from None
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
        check_output_path(path, overwrite=overwrite)
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


def describe_base(path: str | os.PathLike, config: dict | None) -> dict:
    """Name and revision of the base model, each None when unknown: the hub id and commit of a Hugging
    Face cache snapshot (``…/models--<org>--<name>/snapshots/<commit>/…``), else the name its
    ``config.json`` gives (``_name_or_path``)."""
    parts = Path(path).absolute().parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "snapshots" and parts[i - 1].startswith("models--"):
            return {"name": parts[i - 1][len("models--"):].replace("--", "/"), "revision": parts[i + 1]}
    name = (config or {}).get("_name_or_path")
    return {"name": name if isinstance(name, str) and name else None, "revision": None}


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
        header = json.loads(meta[FORMAT_NAME], parse_constant=refuse_json_constant)  # canonical JSON has no NaN
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise FormatError(f"{path} is not a deltadct file (no valid deltadct header)") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        found = header.get("format") if isinstance(header, dict) else None
        raise FormatError(f"{path} is not a deltadct file (header format {found!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(f"{path} has format version {version!r}; this deltadct reads version {FORMAT_VERSION}")
    for key in ("method", "config", "entries", "base_fingerprint", "content_sha256"):
        if key not in header:
            raise FormatError(f"{path}: header lacks {key!r}")
    if not isinstance(index, dict):
        raise FormatError(f"{path}: malformed tensor index")
    data_end = _check_index(path, index)
    _check_header_structure(path, header, index)
    if 8 + n + data_end != size:
        raise FormatError(f"{path} is truncated or has trailing bytes: {size} bytes on disk, "
                          f"{8 + n + data_end} expected")
    return header, 8 + n, index


#: bytes per element of each safetensors dtype code; the code of each storable torch dtype name
_ITEM_BYTES = {code: dtype.itemsize for dtype, code in SAFETENSORS_DTYPES.items()}
_STORABLE = {dtype_name(dtype): code for dtype, code in SAFETENSORS_DTYPES.items()}
#: what a compressed entry's dtype may be: apply adds the delta in float32 and casts to it
_DELTA_DTYPES = tuple(name for name in _STORABLE if getattr(torch, name).is_floating_point)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(s) and s >= 0 for s in value)


def _check_index(path: Path, index: dict) -> int:
    """Every tensor's dtype, shape and byte span agree, and the spans tile the data from 0; returns its end."""
    spans = []
    for name, spec in index.items():
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(spec, dict) and isinstance(spec.get("dtype"), str) and spec["dtype"] in _ITEM_BYTES
                and _is_shape(spec.get("shape"))
                and isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and offsets[1] - offsets[0] == _numel(spec["shape"]) * _ITEM_BYTES[spec["dtype"]]):
            raise FormatError(f"{path}: malformed tensor index (tensor {name!r} needs a known dtype, a shape and "
                              "data offsets spanning exactly its bytes)")
        spans.append(offsets)
    end = 0
    for begin, stop in sorted(spans):
        if begin != end:
            raise FormatError(f"{path}: malformed tensor index (tensor data overlaps or leaves gaps)")
        end = stop
    return end


def _check_header_structure(path: Path, header: dict, index: dict) -> None:
    """Type and value of every header field a reader uses, against the tensor index where they meet.

    Unknown top-level keys are allowed (newer writers may add some); known ones must be well-formed.
    """
    def bad(what: str) -> FormatError:
        return FormatError(f"{path}: malformed header ({what})")

    if not isinstance(header["method"], str) or not isinstance(header["config"], dict):
        raise bad("method must be a string and config an object")
    try:
        get_method_class(header["method"]).from_recorded(header["config"], header.get("config_version", 1))
    except DeltaDCTError as err:
        raise FormatError(f"{path}: the header's method {header['method']!r} and config cannot be used "
                          f"({err})") from None
    for key in ("base_fingerprint", "content_sha256"):
        if not (isinstance(header[key], str) and _SHA256.match(header[key])):
            raise bad(f"{key} must be a sha256 hex digest")
    if not isinstance(header["entries"], dict):
        raise bad("entries must be an object")
    for name, entry in header["entries"].items():
        _check_entry(name, entry, index, bad)
    from_base = header.get("from_base", [])
    if not (isinstance(from_base, list) and all(isinstance(n, str) for n in from_base)):
        raise bad("from_base must be a list of tensor names")
    if len(set(from_base)) != len(from_base) or set(from_base) & set(header["entries"]):
        twice = sorted({n for n in from_base if from_base.count(n) > 1} | (set(from_base) & set(header["entries"])))
        raise bad(f"from_base names {twice[:3]} more than once or also as stored entries")
    key_map = header.get("key_map", {})
    if not (isinstance(key_map, dict) and all(isinstance(v, str) for v in key_map.values())):
        raise bad("key_map must map to strings")
    if not isinstance(header.get("policy", {}), dict):
        raise bad("policy must be an object")
    if not isinstance(header.get("model_config"), (dict, type(None))):
        raise bad("model_config must be an object or null")


def _check_entry(name: str, entry: Any, index: dict, bad: Callable[[str], FormatError]) -> None:
    if not (isinstance(entry, dict) and entry.get("kind") in ENTRY_KINDS and isinstance(entry.get("dtype"), str)
            and _is_int(entry.get("bytes")) and entry["bytes"] >= 0 and _is_shape(entry.get("shape"))
            and isinstance(entry.get("fields"), list) and entry["fields"]
            and all(isinstance(f, str) and f for f in entry["fields"])
            and len(set(entry["fields"])) == len(entry["fields"]) and isinstance(entry.get("meta", {}), dict)):
        raise bad(f"entry {name!r} needs a known kind, a dtype, a byte count, a shape of non-negative "
                  "integers and a list of distinct field names")
    if entry["kind"] == "compressed":
        if entry["dtype"] not in _DELTA_DTYPES:
            raise bad(f"compressed entry {name!r} has dtype {entry['dtype']!r}; a delta is applied in one of "
                      f"{list(_DELTA_DTYPES)}")
    else:
        if entry["fields"] != [VALUE_FIELD] or entry["dtype"] not in _STORABLE:
            raise bad(f"{entry['kind']} entry {name!r} must have the one field {VALUE_FIELD!r} and a storable dtype")
        spec = index.get(tensor_name(name, VALUE_FIELD))
        if spec is not None and (spec["dtype"] != _STORABLE[entry["dtype"]] or spec["shape"] != entry["shape"]):
            raise bad(f"entry {name!r} records dtype {entry['dtype']} and shape {entry['shape']} but its tensor is "
                      f"{spec['dtype']} {spec['shape']}")
    specs = [index.get(tensor_name(name, f)) for f in entry["fields"]]
    if all(specs) and entry["bytes"] != sum(s["data_offsets"][1] - s["data_offsets"][0] for s in specs):
        raise bad(f"entry {name!r} records {entry['bytes']} bytes but its tensors hold "
                  f"{sum(s['data_offsets'][1] - s['data_offsets'][0] for s in specs)}")
    rel_error = entry.get("rel_error", 0.0)
    if not (isinstance(rel_error, (int, float)) and not isinstance(rel_error, bool) and math.isfinite(rel_error)
            and rel_error >= 0):
        raise bad(f"entry {name!r} has rel_error {rel_error!r}; expected a finite non-negative number")


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
    except Exception as err:  # noqa: BLE001 - safetensors' own error types (SafetensorError, Rust panics)
        raise FormatError(f"{path} is not a readable safetensors file: {err}") from None

    def get(name: str) -> torch.Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as err:  # noqa: BLE001 - safetensors' own error types (SafetensorError, Rust panics)
            raise FormatError(f"{path}: cannot read tensor {name!r}: {err}") from None

    return DeltaFile(header, get, size_bytes=path.stat().st_size, path=path)
