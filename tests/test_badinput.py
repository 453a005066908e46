"""Bad input never gives a traceback, a partial file or silent garbage; odd-but-valid input works.

The corpus lives in ``tests/badinput/cases.py``. Every case runs through the CLI (exit status 2, one
line naming what and where) and through the API call the CLI makes (a typed ``deltadct.errors``
exception), and must leave its whole folder as it found it (hashes and inodes of every entry: inputs,
unrelated files, the refused output; no temp or spool file). The store corpus appends to damaged
stores and must lose no record; unwritable store paths are refused before anything is written.
"""
from __future__ import annotations

import contextlib
import errno
import io
import json
import re
import subprocess
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltadct
from deltadct import cli
from deltadct import errors as E
from badinput.cases import (CASES, PWNED, STORE_CASES, UNWRITABLE_STORES, Case, StoreCase, finetune, tree_state,
                             unwritable_store, weights, write_pair)
from experiments.store import ResultStore


def _prepare(tmp_path: Path, case: Case, monkeypatch) -> tuple[list[str], dict[str, tuple]]:
    (tmp_path / "out").mkdir()
    argv = case.build(tmp_path)
    if case.cwd:
        monkeypatch.chdir(tmp_path / case.cwd)
    return argv, tree_state(tmp_path)


def _assert_untouched(root: Path, before: dict[str, tuple]) -> None:
    """Nothing under the case's folder changed: inputs, unrelated files, the refused output, no temporaries."""
    after = tree_state(root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed: {changed}"
    assert not (root / PWNED).exists(), "code from a checkpoint was executed"


def run_cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_reports_one_line(case: Case, tmp_path: Path, monkeypatch):
    argv, before = _prepare(tmp_path, case, monkeypatch)
    with warnings.catch_warnings(record=True) as caught:  # a warning would print lines of its own
        warnings.simplefilter("always")
        rc, stderr = run_cli(argv)
    assert rc == cli.EXIT_ERROR, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltadct: error: "), stderr
    assert "Traceback" not in stderr
    assert [str(w.message) for w in caught] == []
    for needle in case.mentions:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    _assert_untouched(tmp_path, before)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_api_raises_typed_error(case: Case, tmp_path: Path, monkeypatch):
    argv, before = _prepare(tmp_path, case, monkeypatch)
    args = cli.build_parser().parse_args(argv)
    with pytest.raises(case.error) as info:
        cli.run(args)  # the API calls themselves, without main()'s error printing
    assert "\n" not in str(info.value)
    _assert_untouched(tmp_path, before)


def test_corpus_ids_are_unique():
    assert len({c.id for c in CASES}) == len(CASES)
    assert len({c.id for c in STORE_CASES}) == len(STORE_CASES)


# ---------------------------------------------------------------------------------------------
# the result store loses no record
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", STORE_CASES, ids=[c.id for c in STORE_CASES])
def test_store_moves_what_is_not_a_record_aside_and_loses_nothing(case: StoreCase, tmp_path: Path):
    path = tmp_path / "records.jsonl"
    path.write_bytes(case.content)
    lines = case.content.split(b"\n")
    bad_numbers = {number for number, _ in case.bad_lines}
    kept = [json.loads(line) for number, line in enumerate(lines, 1) if line.strip() and number not in bad_numbers]
    store = ResultStore(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert store.append({"key": "new", "metrics": {}})
    assert [str(w.message) for w in caught] == [
        f"{path}:{number}: moved a line that is not a record ({why}) to {path}.corrupt"
        for number, why in case.bad_lines]
    assert store.records() == [*kept, {"key": "new", "metrics": {}}]
    assert path.read_bytes().endswith(b"\n")
    corrupt = path.with_name("records.jsonl.corrupt")
    moved = b"".join(lines[n - 1] + b"\n" for n in sorted(bad_numbers))
    assert (corrupt.read_bytes() if corrupt.exists() else b"") == moved
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quarantined once: reading again finds nothing to move
        assert store.records() == [*kept, {"key": "new", "metrics": {}}]


@pytest.mark.parametrize("kind", UNWRITABLE_STORES)
def test_store_that_cannot_take_records_is_refused_up_front(kind: str, tmp_path: Path):
    path = unwritable_store(kind, tmp_path)
    before = tree_state(tmp_path)
    message = rf"result store {re.escape(str(path))} is not (writable|a regular file)"
    with pytest.raises(E.OutputError, match=message) as info:
        ResultStore(path).check_writable()
    assert "\n" not in str(info.value)
    assert tree_state(tmp_path) == before


# ---------------------------------------------------------------------------------------------
# a full disk
# ---------------------------------------------------------------------------------------------
class _FullDisk:
    """A spool/output file that accepts ``budget`` bytes and then fails like a full disk."""

    def __init__(self, fh, budget: int):
        self._fh, self._left = fh, budget

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self._left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= n
        return self._fh.write(data)

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()


@pytest.mark.parametrize("stage", ["spool", "final"])
def test_full_disk(stage: str, tmp_path: Path, monkeypatch):
    import deltadct.io as dio

    (tmp_path / "out").mkdir()
    base, ft = write_pair(tmp_path, weights(), finetune(weights()))
    if stage == "spool":  # the disk fills while tensors are spooled, before the output exists
        real = tempfile.NamedTemporaryFile
        monkeypatch.setattr(dio.tempfile, "NamedTemporaryFile", lambda *a, **k: _FullDisk(real(*a, **k), 500))
    else:  # the disk fills while the final file is assembled
        monkeypatch.setattr(dio, "open", lambda file, mode="r", *a, **k:
                            _FullDisk(open(file, mode, *a, **k), 300) if "w" in mode else open(file, mode, *a, **k),
                            raising=False)
    rc, stderr = run_cli(["compress", "--base", base, "--finetuned", ft, "--out",
                          str(tmp_path / "out" / "d.safetensors"), "--quiet"])
    assert rc == cli.EXIT_ERROR
    assert stderr.strip().splitlines() == [stderr.strip()] and "disk full" in stderr, stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_full_disk_real_tmpfs(tmp_path: Path):
    """The same on a real 64 KiB tmpfs, where the machine lets us mount one (root, no sandbox)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        g = torch.Generator().manual_seed(0)
        base = {"w": torch.randn(256, 256, generator=g)}  # 256 KiB of keep-exact bias-like data below
        ft = {"w": base["w"] + 0.01 * torch.randn(256, 256, generator=g)}
        base_p, ft_p = write_pair(tmp_path, base, ft)
        rc, stderr = run_cli(["compress", "--base", base_p, "--finetuned", ft_p, "--out", str(mnt / "d.safetensors"),
                              "--quiet", "--set", "policy.min_ndim=3"])  # kept in full: 256 KiB > 64 KiB
        assert rc == cli.EXIT_ERROR and "disk full" in stderr, stderr
        assert list(mnt.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


# ---------------------------------------------------------------------------------------------
# odd but valid input: must work
# ---------------------------------------------------------------------------------------------
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("base_dtype,ft_dtype", [("bf16", "fp32"), ("fp32", "bf16"), ("fp16", "bf16"),
                                                 ("bf16", "fp16"), ("fp16", "fp32")])
def test_mixed_precision_pairs_work(base_dtype: str, ft_dtype: str, tmp_path: Path):
    """A bf16 base with an fp32 fine-tune (and so on) compresses, and applies back in the fine-tuned dtype.

    The delta is taken in fp32 between the two as stored; the applied tensors carry the fine-tuned
    dtype, and kept tensors come back bit-exact.
    """
    base = weights(dtype=DTYPES[base_dtype])
    ft = {k: v.to(DTYPES[ft_dtype]) for k, v in finetune(weights(), scale=0.05).items()}
    base_p, ft_p = write_pair(tmp_path, base, ft)
    deltadct.compress(base_p, ft_p, out=tmp_path / "d.safetensors", progress=False)
    assert deltadct.verify(tmp_path / "d.safetensors", base_p)["fingerprint"] == "ok"
    out = deltadct.apply(base_p, tmp_path / "d.safetensors", progress=False)
    assert {k: v.dtype for k, v in out.items()} == {k: DTYPES[ft_dtype] for k in ft}
    assert torch.equal(out["enc.bias"], ft["enc.bias"])
    for name in ("enc.weight", "head.weight"):
        delta = ft[name].float() - base[name].float()
        err = torch.linalg.vector_norm(out[name].float() - ft[name].float()) / torch.linalg.vector_norm(delta)
        assert err < 1.0, (name, float(err))  # better than applying no delta at all


def test_vectors_scalars_empty_and_small_tensors_are_kept_exactly(tmp_path: Path):
    """1-D, 0-D, 0-size, integer and smaller-than-a-patch tensors are stored exactly (policy too_small=keep)."""
    g = torch.Generator().manual_seed(0)
    base = {"enc.weight": torch.randn(64, 64, generator=g), "norm.weight": torch.ones(64),
            "logit_scale": torch.tensor(2.0), "empty.weight": torch.zeros(0, 64),
            "tiny.weight": torch.randn(4, 64, generator=g), "index": torch.arange(64).reshape(8, 8)}
    ft = {k: (v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.flip(0))
          for k, v in base.items()}
    base_p, ft_p = write_pair(tmp_path, base, ft)
    delta = deltadct.compress(base_p, ft_p, out=tmp_path / "d.safetensors", progress=False)
    assert delta.names("compressed") == ["enc.weight"]
    assert sorted(delta.names("kept")) == sorted(set(base) - {"enc.weight"})
    out = deltadct.apply(base_p, tmp_path / "d.safetensors", tmp_path / "model", progress=False)
    applied = load_file(out / "model.safetensors")
    for name in set(base) - {"enc.weight"}:
        assert torch.equal(applied[name], ft[name]), name


def test_overwrite_replaces_an_existing_output(tmp_path: Path):
    base_p, ft_p = write_pair(tmp_path, weights(), finetune(weights()))
    (tmp_path / "d.safetensors").write_text("stale")
    rc, stderr = run_cli(["compress", "--base", base_p, "--finetuned", ft_p, "--out", str(tmp_path / "d.safetensors"),
                          "--quiet", "--overwrite"])
    assert rc == 0, stderr
    assert deltadct.verify(tmp_path / "d.safetensors", base_p)["checksum"] == "ok"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.safetensors", "d.safetensors", "ft.safetensors"]


# ---------------------------------------------------------------------------------------------
# deltadct verify
# ---------------------------------------------------------------------------------------------
def test_verify_ok_tampered_and_wrong_base(tmp_path: Path):
    base_p, ft_p = write_pair(tmp_path, weights(), finetune(weights()))
    good = tmp_path / "d.safetensors"
    deltadct.compress(base_p, ft_p, out=good, progress=False)

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["verify", str(good), "--base", base_p]) == 0
    assert "checksum=ok" in out.getvalue() and "fingerprint=ok" in out.getvalue()

    raw = bytearray(good.read_bytes())
    raw[-40] ^= 0x01  # one bit of the data (which ends the file)
    (tmp_path / "tampered.safetensors").write_bytes(raw)
    rc, stderr = run_cli(["verify", str(tmp_path / "tampered.safetensors")])
    assert rc == cli.EXIT_ERROR and "checksum mismatch" in stderr

    save_file(finetune(weights(), seed=3), tmp_path / "other.safetensors")
    rc, stderr = run_cli(["verify", str(good), "--base", str(tmp_path / "other.safetensors")])
    assert rc == cli.EXIT_ERROR and "fingerprint mismatch" in stderr
    # the fine-tuned checkpoint is not the base either, although it has the same tensors and shapes
    rc, stderr = run_cli(["verify", str(good), "--base", ft_p])
    assert rc == cli.EXIT_ERROR and "is not the base" in stderr


def test_unknown_checkpoint_suffix_is_refused_with_an_explanation(tmp_path: Path):
    import numpy as np

    np.save(tmp_path / "w.npy", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(E.CheckpointError, match=r"unsupported checkpoint format \.npy.*\.safetensors"):
        deltadct.compress(tmp_path / "w.npy", tmp_path / "w.npy", progress=False)
