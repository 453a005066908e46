"""The bad-input corpus: one :class:`Case` per way a user can hand deltadct something wrong.

Each case builds its inputs in a fresh directory and returns the ``deltadct`` command line that must
fail. ``tests/test_badinput.py`` runs every case twice — through ``deltadct.cli.main`` (exit status 2,
one ``deltadct: error:`` line naming ``mentions``, no traceback, no warning) and through the Python API
the CLI calls (the typed ``error``) — and checks that nothing in the case's directory changed: every
input, every unrelated file, and the output that was refused (hashes of the whole tree before and
after). Destructive cases (``--overwrite`` onto an input, the current directory, a special file) run
there too; a FIFO stands in for a device node such as ``/dev/null``.
"""
from __future__ import annotations

import json
import os
import pickle
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from deltadct import errors as E
from deltadct.format import FORMAT_NAME, content_checksum, read_header
from deltadct.io import encode_header

#: the file an unpickled payload would create; its absence proves no code ran
PWNED = "PWNED"


@dataclass(frozen=True)
class Case:
    id: str
    #: writes inputs under ``root`` and returns the argv; outputs go to ``root / "out"``
    build: Callable[[Path], list[str]]
    error: type[E.DeltaDCTError]
    #: substrings the one-line message must contain: what is wrong and where
    mentions: tuple[str, ...]
    #: the working directory the command runs in, relative to ``root`` ("" = the test's own)
    cwd: str = ""


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def weights(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A small two-layer model: one compressible matrix, a bias and a head."""
    g = torch.Generator().manual_seed(seed)
    return {"enc.weight": torch.randn(64, 48, generator=g).to(dtype),
            "enc.bias": torch.randn(64, generator=g).to(dtype),
            "head.weight": torch.randn(32, 64, generator=g).to(dtype)}


def finetune(base: dict[str, torch.Tensor], seed: int = 1, scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}


def write_pair(root: Path, base: dict, finetuned: dict) -> tuple[str, str]:
    save_file(base, root / "base.safetensors")
    save_file(finetuned, root / "ft.safetensors")
    return str(root / "base.safetensors"), str(root / "ft.safetensors")


def ok_pair(root: Path) -> tuple[str, str]:
    base = weights()
    return write_pair(root, base, finetune(base))


def compress_argv(root: Path, base: str, ft: str, *extra: str, out: str | None = None) -> list[str]:
    return ["compress", "--base", base, "--finetuned", ft, "--out", out or str(root / "out" / "d.safetensors"),
            "--quiet", *extra]


def good_delta(root: Path) -> tuple[str, Path]:
    """A valid delta file (outside ``out/``) and its base."""
    from deltadct import compress

    base, ft = ok_pair(root)
    compress(base, ft, out=root / "good.safetensors", progress=False)
    return base, root / "good.safetensors"


def rewrite_header(src: Path, dst: Path, edit_header=None, edit_index=None, *, rechecksum: bool = False) -> Path:
    """Copy a delta file with its deltadct header and/or tensor index edited.

    With ``rechecksum`` the content checksum is recomputed over the edit, as a crafted file would do, so
    the edit reaches the field checks instead of stopping at the checksum.
    """
    header, offset, index = read_header(src)
    data = src.read_bytes()[offset:]
    if edit_header:
        edit_header(header)
    if edit_index:
        edit_index(index)
    if rechecksum:
        header["content_sha256"] = content_checksum(header, hashlib.sha256(data).hexdigest(), index)
    dst.write_bytes(encode_header(index, {FORMAT_NAME: json.dumps(header)}) + data)
    return dst


def tree_state(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links, never opening special files): kind, mode, content."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if path.is_symlink():
                state[str(path.relative_to(root))] = ("link", os.readlink(path))
            elif path.is_dir():
                state[str(path.relative_to(root))] = ("dir", st.st_mode)
            elif path.is_file():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                state[str(path.relative_to(root))] = ("file", st.st_mode, st.st_ino, digest)
            else:
                state[str(path.relative_to(root))] = ("special", st.st_mode, st.st_ino)
    return state


def raw_header_file(path: Path, text: str) -> Path:
    raw = text.encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    return path


class _RunsCode:
    """Unpickling this runs ``touch PWNED``: the classic pickle attack on model files."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# ---------------------------------------------------------------------------------------------
# case builders
# ---------------------------------------------------------------------------------------------
def _pair_with(edit_base=None, edit_ft=None, *extra: str):
    def build(root: Path) -> list[str]:
        base = weights()
        ft = finetune(base)
        if edit_base:
            base = edit_base(dict(base))
        if edit_ft:
            ft = edit_ft(dict(ft))
        return compress_argv(root, *write_pair(root, base, ft), *extra)
    return build


def _with(name: str, value_fn):
    def edit(state):
        state[name] = value_fn(state.get(name))
        return state
    return edit


def _without(name: str):
    def edit(state):
        del state[name]
        return state
    return edit


def _poison(value: float):
    def fn(t):
        t = t.clone()
        t.view(-1)[7] = value
        return t
    return fn


def _set(option: str):
    def build(root: Path) -> list[str]:
        return compress_argv(root, *ok_pair(root), "--set", option)
    return build


def _delta_cmd(command: str, make_file: Callable[[Path, Path], Path]):
    """``deltadct {verify,info,apply}`` on a broken delta file made from a good one."""
    def build(root: Path) -> list[str]:
        base, good = good_delta(root)
        bad = make_file(good, root / "bad.safetensors")
        if command == "apply":
            return ["apply", "--base", base, "--delta", str(bad), "--out", str(root / "out" / "model"), "--quiet"]
        return [command, str(bad)]
    return build


def _truncate(good: Path, dst: Path) -> Path:
    raw = good.read_bytes()
    dst.write_bytes(raw[: len(raw) * 2 // 3])
    return dst


def _flip_data_bit(good: Path, dst: Path) -> Path:
    raw = bytearray(good.read_bytes())
    raw[-5] ^= 0x10  # inside the last tensor's bytes
    dst.write_bytes(raw)
    return dst


def _empty(good: Path, dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


def _wrong_version(good: Path, dst: Path) -> Path:
    return rewrite_header(good, dst, edit_header=lambda h: h.update(format_version=99))


def _retype_scale(good: Path, dst: Path) -> Path:
    """F32 → I32 keeps the byte count, so only a checksum that covers the index can notice."""
    def edit(index):
        name = next(k for k in index if k.endswith("::scale"))
        index[name]["dtype"] = "I32"
    return rewrite_header(good, dst, edit_index=edit)


def _deep_json(good: Path, dst: Path) -> Path:
    return raw_header_file(dst, "[" * 200_000)


def _huge_offset(good: Path, dst: Path) -> Path:
    header, _, _ = read_header(good)
    return raw_header_file(dst, json.dumps({"x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1e400]},
                                            "__metadata__": {FORMAT_NAME: json.dumps(header)}}))


def _entries_list(good: Path, dst: Path) -> Path:
    return rewrite_header(good, dst, edit_header=lambda h: h.update(entries=[]))


def _checkpoint_as_delta(good: Path, dst: Path) -> Path:
    save_file(weights(), dst)
    return dst


def _wrong_base(command: str, base_fn):
    def build(root: Path) -> list[str]:
        _, good = good_delta(root)
        other = root / "other.safetensors"
        save_file(base_fn(), other)
        if command == "apply":
            return ["apply", "--base", str(other), "--delta", str(good), "--out", str(root / "out" / "model"),
                    "--quiet"]
        return ["verify", str(good), "--base", str(other)]
    return build


def _pickle_bomb(root: Path) -> list[str]:
    """A torch checkpoint whose unpickling would run a shell command."""
    torch.save({"enc.weight": torch.zeros(64, 48), "payload": _RunsCode(root / PWNED)}, root / "evil.bin")
    base, _ = ok_pair(root)
    return compress_argv(root, base, str(root / "evil.bin"))


def _plain_pickle(root: Path) -> list[str]:
    with open(root / "model.pkl", "wb") as fh:
        pickle.dump({"enc.weight": _RunsCode(root / PWNED)}, fh)
    base, _ = ok_pair(root)
    return compress_argv(root, base, str(root / "model.pkl"))


def _legacy_pickle_bin(root: Path) -> list[str]:
    """A raw pickle (not torch's zip format) named .bin: the weights-only unpickler must refuse it too."""
    with open(root / "legacy.bin", "wb") as fh:
        pickle.dump({"enc.weight": _RunsCode(root / PWNED)}, fh)
    base, _ = ok_pair(root)
    return compress_argv(root, str(root / "legacy.bin"), base)


def _complex_pth(root: Path) -> list[str]:
    torch.save({"enc.weight": torch.zeros(64, 48, dtype=torch.complex64)}, root / "c.pth")
    return compress_argv(root, str(root / "c.pth"), str(root / "c.pth"))


def _corrupt_safetensors(root: Path) -> list[str]:
    base, _ = ok_pair(root)
    (root / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    return compress_argv(root, base, str(root / "junk.safetensors"))


def _missing_checkpoint(root: Path) -> list[str]:
    base, _ = ok_pair(root)
    return compress_argv(root, base, str(root / "nowhere.safetensors"))


def _out_exists(command: str):
    def build(root: Path) -> list[str]:
        (root / "out" / "taken").write_text("someone else's file")
        if command == "apply":
            base, good = good_delta(root)
            return ["apply", "--base", base, "--delta", str(good), "--out", str(root / "out" / "taken"), "--quiet"]
        return compress_argv(root, *ok_pair(root), out=str(root / "out" / "taken"))
    return build


def _out_at(path_fn):
    def build(root: Path) -> list[str]:
        return compress_argv(root, *ok_pair(root), out=str(path_fn(root)))
    return build


def _file_as_parent(root: Path) -> Path:
    (root / "out" / "afile").write_text("x")
    return root / "out" / "afile" / "d.safetensors"


# -- outputs that would destroy an input, the working directory or something not ours -------------
def _model_dirs(root: Path, holder: str = "good") -> tuple[Path, Path]:
    """``root/holder/{base,ft}``: a base and a fine-tuned model directory side by side."""
    (root / holder / "base").mkdir(parents=True)
    (root / holder / "ft").mkdir()
    base = weights()
    save_file(base, root / holder / "base" / "model.safetensors")
    save_file(finetune(base), root / holder / "ft" / "model.safetensors")
    return root / holder / "base", root / holder / "ft"


def _apply_argv(base, delta, out, *extra: str) -> list[str]:
    return ["apply", "--base", str(base), "--delta", str(delta), "--out", str(out), "--quiet", *extra]


def _compress_onto_input(which: str):
    """``compress --out`` naming one of its own input files, with ``--overwrite``."""
    def build(root: Path) -> list[str]:
        base, ft = ok_pair(root)
        return compress_argv(root, base, ft, "--overwrite", out={"base": base, "finetuned": ft}[which])
    return build


def _compress_inside_base_dir(root: Path) -> list[str]:
    base, ft = _model_dirs(root)
    return compress_argv(root, str(base), str(ft), out=str(base / "ft.delta.safetensors"))


def _apply_onto(target: str):
    """``apply --out`` at the base directory itself, or at the folder holding base and fine-tune."""
    def build(root: Path) -> list[str]:
        from deltadct import compress

        base, ft = _model_dirs(root)
        compress(base, ft, out=root / "good.delta.safetensors", progress=False)
        out = {"base": base, "holder": root / "good"}[target]
        return _apply_argv(base, root / "good.delta.safetensors", out, "--overwrite")
    return build


def _apply_into_cwd(out: str):
    """``cd work && apply --out . --overwrite`` (or ``..`` from a folder below) next to an unrelated file."""
    def build(root: Path) -> list[str]:
        from deltadct import compress

        work = root / "work"
        base, ft = _model_dirs(work, holder="good")
        compress(base, ft, out=work / "good.delta.safetensors", progress=False)
        (work / "notes.txt").write_text("an unrelated file")
        (work / "sub").mkdir()
        prefix = "../" if out == ".." else ""
        return _apply_argv(f"{prefix}good/base", f"{prefix}good.delta.safetensors", out, "--overwrite")
    return build


def _fifo_out(*extra: str):
    """A FIFO stands in for /dev/null: a special file that must never be replaced by a regular one."""
    def build(root: Path) -> list[str]:
        os.mkfifo(root / "out" / "null")
        return compress_argv(root, *ok_pair(root), *extra, out=str(root / "out" / "null"))
    return build


def _link_to_input(kind: str):
    def build(root: Path) -> list[str]:
        base, ft = ok_pair(root)
        link = root / "out" / "d.safetensors"
        os.link(ft, link) if kind == "hard" else os.symlink(ft, link)
        return compress_argv(root, base, ft, "--overwrite", out=str(link))
    return build


def _symlink_elsewhere(root: Path) -> list[str]:
    (root / "elsewhere.txt").write_text("someone else's file")
    os.symlink(root / "elsewhere.txt", root / "out" / "d.safetensors")
    return compress_argv(root, *ok_pair(root), "--overwrite")


def _apply_onto_unmarked(kind: str):
    """``apply --overwrite`` onto a directory deltadct did not write, or onto a regular file."""
    def build(root: Path) -> list[str]:
        base, good = good_delta(root)
        target = root / "out" / "mine"
        if kind == "dir":
            target.mkdir()
            (target / "thesis.tex").write_text("years of work")
        else:
            target.write_text("a file")
        return _apply_argv(base, good, target, "--overwrite")
    return build


def _compress_onto_dir(root: Path) -> list[str]:
    (root / "out" / "somedir").mkdir()
    (root / "out" / "somedir" / "keep.txt").write_text("x")
    return compress_argv(root, *ok_pair(root), "--overwrite", out=str(root / "out" / "somedir"))


# -- crafted headers whose checksum is recomputed --------------------------------------------------
def _crafted(command: str, edit_header=None, edit_index=None):
    def make(good: Path, dst: Path) -> Path:
        return rewrite_header(good, dst, edit_header, edit_index, rechecksum=True)
    return _delta_cmd(command, make)


def _on_entry(kind: str, **changes):
    def edit(header):
        name = next(n for n, e in header["entries"].items() if e["kind"] == kind)
        header["entries"][name].update(changes)
    return edit


def _from_base_duplicate(header):
    header["from_base"] = [next(iter(header["entries"]))]


def _unknown_method(header):
    header["method"] = "jpeg"


def _bad_method_config(header):
    header["config"]["patch_size"] = 0


# -- checkpoints with malformed side files or unreadable torch files ------------------------------
def _ft_dir_with(files: dict[str, bytes | str], *, weights_file: bool = True):
    """A fine-tuned model directory holding ``files`` (and, by default, a valid model.safetensors)."""
    def build(root: Path) -> list[str]:
        base, ft = ok_pair(root)
        (root / "ftdir").mkdir()
        if weights_file:
            save_file(finetune(weights()), root / "ftdir" / "model.safetensors")
        for name, content in files.items():
            target = root / "ftdir" / name
            target.write_bytes(content.encode() if isinstance(content, str) else content)
        return compress_argv(root, base, str(root / "ftdir"))
    return build


def _index_escaping_to_base(root: Path) -> list[str]:
    """A fine-tuned folder whose index points at the base's own shard (read as the fine-tune until now)."""
    base, ft = _model_dirs(root)
    (ft / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "../base/model.safetensors" for k in weights()}}))
    return compress_argv(root, str(base), str(ft))


def _torch_file(kind: str):
    """A fine-tuned ``.bin`` that is empty, text, a cut-off zip or a cut-off legacy torch file."""
    def build(root: Path) -> list[str]:
        base, _ = ok_pair(root)
        path = root / "ft.bin"
        if kind == "empty":
            path.write_bytes(b"")
        elif kind == "text":
            path.write_text("this is not a checkpoint\n")
        else:
            torch.save(finetune(weights()), path, _use_new_zipfile_serialization=(kind == "truncated_zip"))
            raw = path.read_bytes()
            path.write_bytes(raw[: len(raw) // 2])
        return compress_argv(root, base, str(path))
    return build


LFS_POINTER = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1048576\n")



# ---------------------------------------------------------------------------------------------
# the corpus
# ---------------------------------------------------------------------------------------------
def _mismatched_shape(state):
    state["enc.weight"] = torch.randn(64, 40)
    return state


def _other_architecture(state):
    g = torch.Generator().manual_seed(5)
    return {"blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g), "blocks.0.norm.weight": torch.ones(32)}


def _wider_model(state):
    return {k: torch.randn(*(2 * s for s in v.shape)) for k, v in state.items()}


CASES: list[Case] = [
    # checkpoints that do not match
    Case("mismatched_shape", _pair_with(None, _mismatched_shape), E.ShapeMismatchError,
         ("enc.weight", "[64, 40]", "[64, 48]", "ft.safetensors")),
    Case("extra_key", _pair_with(None, _with("cls.weight", lambda _: torch.randn(2, 64))), E.KeyMismatchError,
         ("cls.weight", "ft.safetensors", "extra_keys=keep")),
    Case("missing_key", _pair_with(None, _without("enc.bias")), E.KeyMismatchError,
         ("enc.bias", "base.safetensors", "missing_keys")),
    Case("different_architecture_names", _pair_with(None, _other_architecture), E.KeyMismatchError,
         ("blocks.0.attn.qkv.weight",)),
    Case("different_architecture_widths", _pair_with(None, _wider_model), E.ShapeMismatchError,
         ("enc.bias", "[128]", "[64]", "and 2 more")),
    # non-finite weights, in compressed and kept tensors, base and fine-tuned
    Case("nan_in_finetuned", _pair_with(None, _with("enc.weight", _poison(float("nan")))), E.NonFiniteError,
         ("enc.weight", "ft.safetensors", "NaN/Inf")),
    Case("inf_in_base", _pair_with(_with("enc.weight", _poison(float("inf")))), E.NonFiniteError,
         ("enc.weight", "base.safetensors")),
    Case("nan_in_kept_bias", _pair_with(None, _with("enc.bias", _poison(float("nan")))), E.NonFiniteError,
         ("enc.bias", "ft.safetensors")),
    # method options
    Case("patch_size_zero", _set("patch_size=0"), E.ConfigError, ("patch_size", "0")),
    Case("patch_size_negative", _set("patch_size=-8"), E.ConfigError, ("patch_size", "-8")),
    Case("patch_size_fractional", _set("patch_size=16.5"), E.ConfigError, ("patch_size", "16.5")),
    Case("patch_size_text", _set("patch_size=abc"), E.ConfigError, ("patch_size", "abc")),
    Case("ratios_negative", _set("ratios=-0.2,0.6,0.6"), E.ConfigError, ("ratios", "negative")),
    Case("ratios_not_summing_to_one", _set("ratios=0.3,0.3,0.3"), E.ConfigError, ("ratios", "sums to 0.9")),
    Case("ratios_over_budget", _set("ratios=0.5,0.5,0"), E.ConfigError, ("ratios", "1.5", "budget")),
    Case("ratios_wrong_length", _set("ratios=0.5,0.5"), E.ConfigError, ("ratios",)),
    Case("unknown_option", _set("patchsize=16"), E.ConfigError, ("patchsize", "patch_size")),
    Case("unknown_policy_option", _set("policy.keep_all=1"), E.ConfigError, ("keep_all",)),
    Case("bad_policy_choice", _set("policy.too_small=maybe"), E.ConfigError, ("too_small", "maybe")),
    Case("set_without_value", _set("patch_size"), E.ConfigError, ("key=value", "patch_size")),
    Case("unknown_method", lambda root: compress_argv(root, *ok_pair(root), "--method", "jpeg"),
         E.UnknownMethodError, ("jpeg", "deltadct")),
    Case("cuda_without_gpu", lambda root: compress_argv(root, *ok_pair(root), "--device", "cuda"),
         E.ConfigError, ("cuda",)),
    Case("device_unknown", lambda root: compress_argv(root, *ok_pair(root), "--device", "xyz"),
         E.ConfigError, ("xyz", "cpu", "cuda")),
    Case("device_unsupported", lambda root: compress_argv(root, *ok_pair(root), "--device", "mps"),
         E.ConfigError, ("mps", "not supported")),
    Case("patch_larger_than_every_matrix", _set("patch_size=128"), E.ConfigError,
         ("patch_size 128", "no tensor of", "ft.safetensors")),
    Case("too_small_error", lambda root: compress_argv(root, *ok_pair(root), "--set", "patch_size=48",
                                                      "--set", "policy.too_small=error"),
         E.ConfigError, ("head.weight", "48", "(32, 64)")),
    # compressed files that are not intact
    Case("delta_empty", _delta_cmd("verify", _empty), E.FormatError, ("bad.safetensors", "empty")),
    Case("delta_truncated", _delta_cmd("info", _truncate), E.FormatError, ("bad.safetensors", "truncated")),
    Case("delta_bit_flip_verify", _delta_cmd("verify", _flip_data_bit), E.ChecksumError,
         ("bad.safetensors", "checksum")),
    Case("delta_bit_flip_apply", _delta_cmd("apply", _flip_data_bit), E.ChecksumError,
         ("bad.safetensors", "checksum")),
    Case("delta_wrong_version", _delta_cmd("verify", _wrong_version), E.FormatError,
         ("bad.safetensors", "version 99")),
    Case("delta_retyped_tensor", _delta_cmd("apply", _retype_scale), E.ChecksumError, ("bad.safetensors",)),
    Case("delta_deeply_nested_header", _delta_cmd("info", _deep_json), E.FormatError, ("bad.safetensors",)),
    Case("delta_huge_offset", _delta_cmd("verify", _huge_offset), E.FormatError,
         ("bad.safetensors", "tensor index")),
    Case("delta_malformed_entries", _delta_cmd("verify", _entries_list), E.FormatError,
         ("bad.safetensors", "entries")),
    Case("checkpoint_given_as_delta", _delta_cmd("info", _checkpoint_as_delta), E.FormatError,
         ("bad.safetensors", "not a deltadct file")),
    # a delta used with another base
    Case("apply_wrong_base_same_shapes", _wrong_base("apply", lambda: weights(seed=9)), E.FingerprintMismatchError,
         ("other.safetensors", "fingerprint")),
    Case("apply_wrong_base_other_shapes", _wrong_base("apply", lambda: {"enc.weight": torch.zeros(8, 8)}),
         E.FingerprintMismatchError, ("other.safetensors", "enc.weight")),
    Case("verify_wrong_base", _wrong_base("verify", lambda: weights(seed=9)), E.FingerprintMismatchError,
         ("other.safetensors", "good.safetensors")),
    # checkpoints that cannot or must not be read
    Case("pickle_code_execution", _pickle_bomb, E.UnsafeCheckpointError, ("evil.bin", "code execution")),
    Case("legacy_pickle_bin", _legacy_pickle_bin, E.UnsafeCheckpointError, ("legacy.bin",)),
    Case("pickle_suffix_refused", _plain_pickle, E.CheckpointError, ("model.pkl", ".pkl", "safetensors")),
    Case("complex_dtype", _complex_pth, E.CheckpointError, ("enc.weight", "complex64")),
    Case("corrupt_safetensors_checkpoint", _corrupt_safetensors, E.CheckpointError, ("junk.safetensors",)),
    Case("missing_checkpoint", _missing_checkpoint, E.CheckpointError, ("nowhere.safetensors", "does not exist")),
    # outputs that cannot be written
    Case("compress_out_exists", _out_exists("compress"), E.OutputError, ("taken", "exists", "--overwrite")),
    Case("apply_out_exists", _out_exists("apply"), E.OutputError, ("taken", "exists")),
    Case("out_missing_parent", _out_at(lambda root: root / "out" / "no" / "such" / "d.safetensors"), E.OutputError,
         ("no/such", "does not exist")),
    Case("out_parent_is_file", _out_at(_file_as_parent), E.OutputError, ("afile",)),
    # /proc refuses new files even for root, although os.access says it is writable
    Case("out_under_proc", _out_at(lambda root: Path("/proc/deltadct-test.safetensors")), E.OutputError,
         ("/proc",)),

    # outputs that are, contain or lie inside an input; the working directory; what deltadct did not write
    Case("compress_onto_finetuned_file", _compress_onto_input("finetuned"), E.OutputError,
         ("ft.safetensors", "is an input")),
    Case("compress_onto_base_file", _compress_onto_input("base"), E.OutputError, ("base.safetensors", "is an input")),
    Case("compress_into_base_dir", _compress_inside_base_dir, E.OutputError,
         ("ft.delta.safetensors", "lies inside the input", "good/base")),
    Case("apply_onto_base_dir", _apply_onto("base"), E.OutputError, ("good/base", "is an input")),
    Case("apply_onto_folder_holding_inputs", _apply_onto("holder"), E.OutputError, ("contains the input", "good/base")),
    Case("apply_onto_current_directory", _apply_into_cwd("."), E.OutputError, ("output .", "current directory"),
         cwd="work"),
    Case("apply_onto_parent_of_current_directory", _apply_into_cwd(".."), E.OutputError,
         ("output ..", "parent of the current directory"), cwd="work/sub"),
    Case("compress_onto_fifo_overwrite", _fifo_out("--overwrite"), E.OutputError,
         ("out/null", "special file", "not a regular file")),
    Case("compress_onto_fifo", _fifo_out(), E.OutputError, ("out/null", "already exists")),
    Case("compress_onto_hard_link_to_input", _link_to_input("hard"), E.OutputError, ("d.safetensors", "hard link")),
    Case("compress_onto_symlink_to_input", _link_to_input("symbolic"), E.OutputError,
         ("d.safetensors", "is an input", "ft.safetensors")),
    Case("compress_onto_symlink_elsewhere", _symlink_elsewhere, E.OutputError, ("d.safetensors", "symbolic link")),
    Case("apply_onto_unmarked_directory", _apply_onto_unmarked("dir"), E.OutputError,
         ("out/mine", "did not write", ".deltadct-output")),
    Case("apply_onto_regular_file", _apply_onto_unmarked("file"), E.OutputError, ("out/mine", "not a directory")),
    Case("compress_onto_directory", _compress_onto_dir, E.OutputError, ("somedir", "a directory, not a regular file")),
    Case("out_named_like_a_temporary", _out_at(lambda root: root / "out" / ".deltadct-d.abcdefgh.tmp"), E.OutputError,
         (".deltadct-d.abcdefgh.tmp", "temporaries")),
    # crafted headers (checksum recomputed): every field a reader can check is checked
    Case("crafted_compressed_dtype_bool", _crafted("apply", _on_entry("compressed", dtype="bool")), E.FormatError,
         ("bad.safetensors", "dtype 'bool'")),
    Case("crafted_compressed_dtype_complex64", _crafted("apply", _on_entry("compressed", dtype="complex64")),
         E.FormatError, ("bad.safetensors", "'complex64'")),
    Case("crafted_compressed_dtype_float8", _crafted("apply", _on_entry("compressed", dtype="float8_e4m3fn")),
         E.FormatError, ("bad.safetensors", "'float8_e4m3fn'")),
    Case("crafted_kept_dtype_mismatch", _crafted("apply", _on_entry("kept", dtype="int32")), E.FormatError,
         ("bad.safetensors", "int32", "F32")),
    Case("crafted_kept_shape_mismatch", _crafted("apply", _on_entry("kept", shape=[8, 8])), E.FormatError,
         ("bad.safetensors", "[8, 8]")),
    Case("crafted_byte_count", _crafted("info", _on_entry("compressed", bytes=1)), E.FormatError,
         ("bad.safetensors", "records 1 bytes")),
    Case("crafted_fields_twice", _crafted("apply", _on_entry("kept", fields=["value", "value"])), E.FormatError,
         ("bad.safetensors", "distinct field names")),
    Case("crafted_meta_not_object", _crafted("apply", _on_entry("compressed", meta=[1])), E.FormatError,
         ("bad.safetensors", "entry")),
    Case("crafted_from_base_duplicates_entry", _crafted("apply", _from_base_duplicate), E.FormatError,
         ("bad.safetensors", "from_base")),
    Case("crafted_rel_error_text", _crafted("info", _on_entry("compressed", rel_error="abc")), E.FormatError,
         ("bad.safetensors", "rel_error 'abc'")),
    # NaN is not JSON: such a header cannot even have a checksum, and is refused as it is parsed
    Case("header_rel_error_nan", _delta_cmd("info", lambda good, dst: rewrite_header(
        good, dst, _on_entry("compressed", rel_error=float("nan")))), E.FormatError,
         ("bad.safetensors", "not a deltadct file")),
    Case("crafted_fingerprint_not_digest", _crafted("verify", lambda h: h.update(base_fingerprint=7)), E.FormatError,
         ("bad.safetensors", "base_fingerprint")),
    Case("crafted_unknown_method", _crafted("info", _unknown_method), E.FormatError, ("bad.safetensors", "'jpeg'")),
    Case("crafted_unknown_method_verify", _crafted("verify", _unknown_method), E.FormatError,
         ("bad.safetensors", "'jpeg'")),
    Case("crafted_method_config_out_of_range", _crafted("apply", _bad_method_config), E.FormatError,
         ("bad.safetensors", "patch_size")),
    Case("crafted_index_span_wrong", _crafted("verify", edit_index=lambda i: next(iter(i.values()))["shape"].append(3)),
         E.FormatError, ("bad.safetensors", "tensor index")),
    # model folders with malformed side files
    Case("config_json_nan", _ft_dir_with({"config.json": '{"hidden_size": 64, "layer_norm_eps": NaN}'}),
         E.CheckpointError, ("ftdir/config.json", "NaN")),
    Case("config_json_not_object", _ft_dir_with({"config.json": "[1, 2]"}), E.CheckpointError,
         ("ftdir/config.json", "JSON object")),
    Case("config_json_not_utf8", _ft_dir_with({"config.json": b'{"name": "\xff"}'}), E.CheckpointError,
         ("ftdir/config.json",)),
    Case("index_a_list", _ft_dir_with({"model.safetensors.index.json": "[1, 2]"}), E.CheckpointError,
         ("model.safetensors.index.json", "JSON object")),
    Case("index_shard_not_a_string", _ft_dir_with({"model.safetensors.index.json": '{"weight_map": {"a": 5}}'}),
         E.CheckpointError, ("model.safetensors.index.json", "weight_map")),
    Case("index_weight_map_a_list", _ft_dir_with({"model.safetensors.index.json": '{"weight_map": ["a"]}'}),
         E.CheckpointError, ("model.safetensors.index.json", "weight_map")),
    Case("index_absolute_shard", _ft_dir_with({"model.safetensors.index.json":
                                               '{"weight_map": {"enc.weight": "/etc/passwd"}}'}),
         E.CheckpointError, ("'/etc/passwd'", "not a file inside")),
    Case("index_shard_outside_folder", _index_escaping_to_base, E.CheckpointError,
         ("'../base/model.safetensors'", "not a file inside")),
    # torch files that cannot be read, each with its own cause
    Case("bin_empty", _torch_file("empty"), E.CheckpointError, ("ft.bin", "empty")),
    Case("bin_text", _torch_file("text"), E.CheckpointError, ("ft.bin", "not a torch checkpoint")),
    Case("bin_truncated_zip", _torch_file("truncated_zip"), E.CheckpointError, ("ft.bin", "truncated")),
    Case("bin_truncated_legacy", _torch_file("truncated_legacy"), E.CheckpointError, ("ft.bin", "truncated")),
    Case("bin_git_lfs_pointer", _ft_dir_with({"pytorch_model.bin": LFS_POINTER}, weights_file=False),
         E.CheckpointError, ("pytorch_model.bin", "git-LFS pointer", "git lfs pull")),
]


# ---------------------------------------------------------------------------------------------
# the result store: lines that are not records, and store paths that cannot take records
# ---------------------------------------------------------------------------------------------
def _line(key: str) -> bytes:
    return json.dumps({"key": key, "metrics": {"score": 0.5}}).encode()


@dataclass(frozen=True)
class StoreCase:
    id: str
    #: the store file's bytes before the next append
    content: bytes
    #: 1-based numbers of the lines that must be moved to the ``.corrupt`` sidecar, with the reason named
    bad_lines: tuple[tuple[int, str], ...]


STORE_CASES: list[StoreCase] = [
    StoreCase("last_line_cut_off", _line("a") + b"\n" + b'{"key": "b", "metr', ((2, "incomplete line"),)),
    StoreCase("last_record_without_newline", _line("a") + b"\n" + _line("b"), ()),
    StoreCase("line_is_a_number", _line("a") + b"\n5\n" + _line("b") + b"\n", ((2, "a JSON int, not an object"),)),
    StoreCase("line_is_null", _line("a") + b"\nnull\n" + _line("b") + b"\n", ((2, "a JSON NoneType, not an object"),)),
    StoreCase("line_is_a_list", b"[1, 2]\n" + _line("a") + b"\n", ((1, "a JSON list, not an object"),)),
    StoreCase("line_not_utf8", _line("a") + b'\n{"key": "x\xff"}\n', ((2, "not UTF-8"),)),
    StoreCase("line_not_json", b'{"key": \n' + _line("a") + b"\n", ((1, "not JSON"),)),
    StoreCase("several_bad_lines", b"5\n" + _line("a") + b"\nnull\n" + b'{"key": "c"',
              ((1, "a JSON int, not an object"), (3, "a JSON NoneType, not an object"), (4, "incomplete line"))),
]


def unwritable_store(kind: str, root: Path) -> Path:
    """A ``store.path`` no record can be appended to."""
    if kind == "parent_is_a_file":
        (root / "afile").write_text("x")
        return root / "afile" / "records.jsonl"
    if kind == "store_is_a_directory":
        (root / "records.jsonl").mkdir()
        return root / "records.jsonl"
    if kind == "store_is_a_fifo":
        os.mkfifo(root / "records.jsonl")
        return root / "records.jsonl"
    return Path("/proc/deltadct-store/records.jsonl")  # /proc refuses new entries even for root


UNWRITABLE_STORES = ["parent_is_a_file", "store_is_a_directory", "store_is_a_fifo", "under_proc"]
