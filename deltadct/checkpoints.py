"""Lazy, safe reading of checkpoints and matching base ↔ fine-tuned tensors.

Readers open HF model directories (``model.safetensors``, sharded ``*.safetensors`` with an index,
``pytorch_model.bin`` shards), single ``.safetensors`` files, and torch state-dict files
(``.bin/.pt/.pth/.ckpt``, loaded with ``weights_only=True`` and memory-mapped). Safetensors are
memory-mapped and read one tensor at a time, so a 13B pair never has to fit in RAM. Nothing is ever
unpickled with code execution: a file that needs it is refused with :class:`UnsafeCheckpointError`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .errors import CheckpointError, KeyMismatchError, ShapeMismatchError, UnsafeCheckpointError
from .io import SAFETENSORS_DTYPES, refuse_json_constant

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
#: small files copied from a model directory into an applied checkpoint (configs, tokenizers, processors)
SIDECAR_PATTERNS = ("*.json", "*.txt", "*.model", "*.tiktoken", "*.py", "merges.txt", "vocab.*")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointReader:
    """Tensors of one checkpoint by name, loaded on demand."""

    def __init__(self, path: Path, files: dict[str, Path], model_dir: Path | None):
        self.path = path
        self.model_dir = model_dir
        self._file_of = files  # tensor name -> file holding it
        self._handles: dict[Path, object] = {}
        self._state: dict[Path, dict[str, torch.Tensor]] = {}
        self._layouts: dict[Path, dict[str, tuple[torch.dtype, list[int], int, int]]] = {}

    # -- discovery -----------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return sorted(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def __len__(self) -> int:
        return len(self._file_of)

    def _meta(self, key: str) -> tuple[torch.Size, torch.dtype]:
        file = self._file_of[key]
        if file.suffix in SAFETENSORS_SUFFIXES:
            handle = self._handle(file)
            sl = handle.get_slice(key)
            return torch.Size(sl.get_shape()), _st_dtype(sl.get_dtype(), key, file)
        tensor = self._torch_state(file)[key]
        return tensor.shape, tensor.dtype

    def shape(self, key: str) -> torch.Size:
        return self._meta(key)[0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta(key)[1]

    def get(self, key: str, *, pin_memory: bool = False) -> torch.Tensor:
        """The tensor ``key`` in memory of its own (a torch file's tensors are its memory-mapped values).

        Safetensors tensors are read with ``pread`` into a fresh buffer (page-locked with
        ``pin_memory``, so a copy to the GPU can run asynchronously), not through a memory map: a
        shard that is truncated or removed while it is read then raises a :class:`CheckpointError`
        instead of killing the process with SIGBUS.
        """
        file = self._file_of[key]
        if file.suffix in SAFETENSORS_SUFFIXES:
            return self._read_safetensors(file, key, pin_memory)
        try:
            return self._torch_state(file)[key]
        # safetensors and torch.load raise types of their own (and arbitrary ones from a damaged pickle)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"cannot read tensor {key!r} from {file}: {err}") from None

    def _read_safetensors(self, file: Path, key: str, pin_memory: bool) -> torch.Tensor:
        dtype, shape, begin, end = self._layout(file)[key]
        out = torch.empty(shape, dtype=dtype, pin_memory=pin_memory)
        if end == begin:
            return out
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        try:
            fd = os.open(file, os.O_RDONLY)
        except OSError as err:
            raise CheckpointError(f"cannot read tensor {key!r}: {file} is no longer readable "
                                  f"({err.strerror or err})") from None
        try:
            done = 0
            while done < end - begin:  # a pread may return less than asked; 0 means end of file
                got = os.preadv(fd, [buffer[done:]], begin + done)
                if got == 0:
                    raise CheckpointError(f"cannot read tensor {key!r}: {file} ends at byte {begin + done}, "
                                          f"before the tensor's end at byte {end} (truncated while in use?)")
                done += got
        except OSError as err:
            raise CheckpointError(f"cannot read tensor {key!r} from {file}: {err.strerror or err}") from None
        finally:
            os.close(fd)
        return out

    def _layout(self, file: Path) -> dict[str, tuple[torch.dtype, list[int], int, int]]:
        """name → (dtype, shape, first byte, end byte) in the file, from its (already validated) header."""
        if file not in self._layouts:
            self._handle(file)  # safetensors' own checks of the header and offsets, once
            try:
                with open(file, "rb") as fh:
                    size = int.from_bytes(fh.read(8), "little")
                    index = json.loads(fh.read(size))
            except (OSError, ValueError) as err:  # removed or rewritten since it was opened
                reason = getattr(err, "strerror", None) or err
                raise CheckpointError(f"{file} is no longer readable ({reason})") from None
            start = 8 + size
            self._layouts[file] = {
                name: (_st_dtype(info["dtype"], name, file), list(info["shape"]),
                       start + info["data_offsets"][0], start + info["data_offsets"][1])
                for name, info in index.items() if name != "__metadata__"}
        return self._layouts[file]

    def items(self, keys: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        for key in keys if keys is not None else self.keys():
            yield key, self.get(key)

    def config_json(self) -> dict | None:
        """The model's ``config.json`` when the checkpoint is a model directory."""
        if self.model_dir is None or not (self.model_dir / "config.json").is_file():
            return None
        return _read_json(self.model_dir / "config.json")

    def sidecar_files(self) -> list[Path]:
        """Non-weight files of a model directory (configs, tokenizer) an applied checkpoint needs."""
        if self.model_dir is None:
            return []
        out = []
        for entry in sorted(self.model_dir.iterdir()):
            if entry.is_file() and entry.name not in _WEIGHT_INDEXES and any(
                    fnmatch.fnmatch(entry.name, pat) for pat in SIDECAR_PATTERNS):
                out.append(entry)
        return out

    # -- backends ------------------------------------------------------------------------------
    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _open_safetensors(file)
        return self._handles[file]

    def _torch_state(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._state:
            self._state[file] = _load_torch_state(file)
        return self._state[file]


def _st_dtype(name: str, key: str, file: Path) -> torch.dtype:
    table = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
    if name not in table:
        raise CheckpointError(f"tensor {key!r} in {file} has unsupported dtype {name}")
    return table[name]


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as err:  # noqa: BLE001 - safetensors' own error types (SafetensorError, Rust panics)
        raise CheckpointError(f"{file} is not a readable safetensors file: {err}") from None


#: what a git-LFS pointer file starts with: the weights were never downloaded
_LFS_POINTER = b"version https://git-lfs.github.com/spec/v1"
_ZIP_MAGIC = b"PK\x03\x04"
#: torch.save's legacy (pre-1.6, non-zip) format opens with this pickled magic number
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19."


def _load_torch_state(file: Path) -> dict[str, torch.Tensor]:
    """A torch state dict, read weights-only; the file's first bytes decide how, so every failure has one cause."""
    try:
        with open(file, "rb") as fh:
            head = fh.read(len(_LEGACY_TORCH_MAGIC))
    except OSError as err:
        raise CheckpointError(f"cannot read {file}: {err.strerror or err}") from None
    if not head:
        raise CheckpointError(f"{file} is empty (0 bytes)")
    if head.startswith(_LFS_POINTER[:len(head)]) and _is_lfs_pointer(file):
        raise CheckpointError(f"{file} is a git-LFS pointer, not the weights: run `git lfs pull` in its "
                              "repository to fetch them")
    if head.startswith(_ZIP_MAGIC):
        _check_zip_complete(file)
        obj = _torch_load(file, mmap=True)
    elif head == _LEGACY_TORCH_MAGIC:
        obj = _torch_load(file, mmap=False)  # the legacy format cannot be memory-mapped
    elif head.startswith(b"\x80"):
        raise UnsafeCheckpointError(f"{file} is a pickle that torch cannot read weights-only (a plain pickle, or a "
                                    f"legacy torch file saved with pickle protocol {head[1]}) and unpickling it could "
                                    "run code; refusing to load it. Convert it to safetensors in a trusted environment "
                                    "first")
    else:
        raise CheckpointError(f"{file} is not a torch checkpoint (neither torch's zip format nor a pickle; "
                              f"it starts with {head[:8]!r})")
    return _check_storable(_unwrap_state_dict(obj, file), file)


def _is_lfs_pointer(file: Path) -> bool:
    with open(file, "rb") as fh:
        return fh.read(len(_LFS_POINTER)) == _LFS_POINTER


def _check_zip_complete(file: Path) -> None:
    """A cut-off download loses the zip's central directory; say so rather than what the zip reader says."""
    import zipfile

    try:
        with zipfile.ZipFile(file) as archive:
            archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise CheckpointError(f"{file} is truncated or corrupt (an incomplete zip archive); "
                              "download or save it again") from None


def _torch_load(file: Path, *, mmap: bool):
    try:
        with warnings.catch_warnings():  # the weights-only unpickler warns (several lines) about pickle protocols
            warnings.simplefilter("ignore")
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"{file} needs code execution to unpickle ({_unpickler_reason(err)}); refusing to load it. "
            "Convert it to safetensors in a trusted environment first") from None
    except Exception as err:  # noqa: BLE001 - EOFError, RuntimeError, KeyError …: the pickle or an entry is cut off or damaged
        reason = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file} is truncated or corrupt: not a readable torch checkpoint ({reason})") from None


def _unpickler_reason(err: Exception) -> str:
    """The one line of torch's weights-only refusal that names what was refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation", "In PyTorch")
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reasons = [line for line in lines if not line.startswith(boilerplate)]
    return (reasons[0] if reasons else "an object the weights-only unpickler refuses").rstrip(".")


def _unwrap_state_dict(obj, file: Path) -> dict[str, torch.Tensor]:
    """Accept a flat state dict or one nested under a usual key (BEiT-3 / Lightning / DDP checkpoints)."""
    for _ in range(3):
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, dict):
            nested = next((obj[k] for k in ("model", "state_dict", "module", "model_state_dict") if k in obj), None)
            if nested is not None:
                obj = nested
                continue
            tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
            if tensors:
                return tensors
        break
    raise CheckpointError(f"{file} holds no tensors (expected a state dict of name → tensor)")


def _check_storable(state: dict[str, torch.Tensor], file: Path) -> dict[str, torch.Tensor]:
    """Refuse dtypes a delta file cannot hold (complex, float8), as the safetensors reader does."""
    for key, tensor in state.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            dtype = str(tensor.dtype).removeprefix("torch.")
            raise CheckpointError(f"tensor {key!r} in {file} has unsupported dtype {dtype}")
    return state


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a model directory, a ``.safetensors`` file, or a torch state-dict file, lazily."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        files = _model_dir_files(path)
        model_dir = path
    elif path.suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        files, model_dir = [path], None
    else:
        raise CheckpointError(
            f"{path}: unsupported checkpoint format {path.suffix or '(no suffix)'}; expected a model directory, "
            f"a .safetensors file or a torch state dict ({', '.join(TORCH_SUFFIXES)})")
    reader = CheckpointReader(path, {}, model_dir)
    for file in files:
        if file.suffix in SAFETENSORS_SUFFIXES:
            names = list(reader._handle(file).keys())
        else:
            names = list(reader._torch_state(file))
        for name in names:
            if name in reader._file_of:
                raise CheckpointError(f"tensor {name!r} appears in both {reader._file_of[name]} and {file}")
            reader._file_of[name] = file
    if not reader._file_of:
        raise CheckpointError(f"checkpoint {path} contains no tensors")
    return reader


def _model_dir_files(path: Path) -> list[Path]:
    for index_name in _WEIGHT_INDEXES:
        index = path / index_name
        if index.is_file():
            return _indexed_shards(path, index)
    for pattern in ("*.safetensors", "*.bin", "*.pth", "*.pt"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"{path} holds no weights (no *.safetensors, *.bin or *.pth files)")


def _indexed_shards(path: Path, index: Path) -> list[Path]:
    """The shard files a weight index names, each a relative path that stays inside the model folder.

    The names are checked, not their symlink targets: a hub cache's snapshot folder links every shard
    into its blob store, and a link placed in the folder is as trusted as the folder itself.
    """
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise CheckpointError(f"{index} is not a valid weight index: expected an object whose \"weight_map\" maps "
                              "tensor names to shard file names")
    files = []
    for shard in sorted(set(weight_map.values())):
        if not shard or Path(shard).is_absolute() or ".." in Path(shard).parts or "\x00" in shard:
            raise CheckpointError(f"{index} names shard {shard!r}, which is not a file inside {path}; refusing to "
                                  "read it")
        files.append(path / shard)
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shards listed in {index.name} are missing: {missing}")
    return files


def _read_json(file: Path) -> dict:
    """A JSON object from ``file``; NaN/Infinity (which Python's json accepts) and other values are refused."""
    try:
        obj = json.loads(file.read_text(encoding="utf-8"), parse_constant=refuse_json_constant)
    except (OSError, ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"cannot read {file}: {reason}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"cannot read {file}: expected a JSON object, found {type(obj).__name__}")
    return obj


# ---------------------------------------------------------------------------------------------
# matching base ↔ fine-tuned
# ---------------------------------------------------------------------------------------------
@dataclass
class KeyMatch:
    """How fine-tuned tensor names map onto base names."""

    pairs: dict[str, str]  # fine-tuned name -> base name (same shape)
    extra: list[str]  # only in fine-tuned
    missing: list[str]  # only in base
    mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    finetuned_prefix: str = ""
    base_prefix: str = ""

    def base_name(self, name: str) -> str:
        return self.base_prefix + name[len(self.finetuned_prefix):]


def _prefixes(keys: Iterable[str]) -> set[str]:
    return {k.split(".", 1)[0] + "." for k in keys if "." in k}


def match_keys(base: CheckpointReader, finetuned: CheckpointReader) -> KeyMatch:
    """Pair tensors by name, allowing one model to wrap the other under a prefix.

    A fine-tuned classifier is often the base encoder under ``bert.``/``roberta.``/``model.`` plus a
    head; the prefix that makes the most names meet is taken, and whatever is left over is
    reported as extra (fine-tuned only) or missing (base only).
    """
    bkeys, fkeys = set(base.keys()), set(finetuned.keys())
    best = ("", "", len(bkeys & fkeys))
    for fp in _prefixes(fkeys):
        hits = sum(1 for k in fkeys if k.startswith(fp) and k[len(fp):] in bkeys)
        if hits > best[2]:
            best = (fp, "", hits)
    for bp in _prefixes(bkeys):
        hits = sum(1 for k in fkeys if bp + k in bkeys)
        if hits > best[2]:
            best = ("", bp, hits)
    fp, bp, _ = best
    pairs, extra, mismatched = {}, [], {}
    for key in sorted(fkeys):
        if not key.startswith(fp) or (bp + key[len(fp):]) not in bkeys:
            extra.append(key)
            continue
        bkey = bp + key[len(fp):]
        bshape, fshape = tuple(base.shape(bkey)), tuple(finetuned.shape(key))
        if bshape != fshape:
            mismatched[key] = (bshape, fshape)
        else:
            pairs[key] = bkey
    matched_base = set(pairs.values()) | {bp + k[len(fp):] for k in mismatched}
    missing = sorted(bkeys - matched_base)
    return KeyMatch(pairs, extra, missing, mismatched, fp, bp)


def describe_keys(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > limit else "")


def check_match(match: KeyMatch, *, extra_keys: str, missing_keys: str, base_path, finetuned_path) -> None:
    """Raise the typed error the policy asks for, naming the keys at fault."""
    if match.mismatched and extra_keys == "error":
        key, (bshape, fshape) = next(iter(match.mismatched.items()))
        raise ShapeMismatchError(
            f"tensor {key!r} has shape {list(fshape)} in {finetuned_path} but {list(bshape)} in {base_path}"
            + (f" (and {len(match.mismatched) - 1} more)" if len(match.mismatched) > 1 else "")
            + "; set extra_keys=keep to store such tensors (e.g. new task heads) in full")
    if match.extra and extra_keys == "error":
        raise KeyMismatchError(
            f"{len(match.extra)} tensor(s) in {finetuned_path} have no counterpart in {base_path}: "
            f"{describe_keys(match.extra)}; set extra_keys=keep to store them in full")
    if match.missing and missing_keys == "error":
        raise KeyMismatchError(
            f"{len(match.missing)} tensor(s) of {base_path} are missing from {finetuned_path}: "
            f"{describe_keys(match.missing)}; set missing_keys=ignore to leave them out of the result")
    if not match.pairs and not match.extra:
        raise KeyMismatchError(f"{base_path} and {finetuned_path} share no tensors")
