"""Checkpoint readers (HF dirs, shards, torch files, nested dicts), key matching, and refusing unsafe pickles."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import deltadct
from deltadct.checkpoints import match_keys, open_checkpoint
from deltadct.errors import CheckpointError, KeyMismatchError, UnsafeCheckpointError


def assert_reads(reader, state):
    assert reader.keys() == sorted(state)
    for name, tensor in state.items():
        assert reader.shape(name) == tensor.shape and reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.get(name), tensor)


def test_hf_model_dir(real_pair_dir, real_pair_states):
    reader = open_checkpoint(real_pair_dir[0])
    assert_reads(reader, real_pair_states[0])
    assert reader.config_json()["task"] == "digits"
    assert [p.name for p in reader.sidecar_files()] == ["config.json"]


def test_sharded_safetensors_with_index(real_pair_states, tmp_path):
    state = real_pair_states[1]
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_reads(open_checkpoint(tmp_path), state)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize("wrap", [lambda sd: sd, lambda sd: {"model": sd}, lambda sd: {"state_dict": sd, "epoch": 3}])
def test_torch_bin_flat_and_nested(real_pair_states, tmp_path, wrap):
    state = real_pair_states[0]
    torch.save(wrap(state), tmp_path / "pytorch_model.bin")
    assert_reads(open_checkpoint(tmp_path / "pytorch_model.bin"), state)
    assert_reads(open_checkpoint(tmp_path), state)  # as a model dir holding a .bin


def test_compress_from_torch_bin_equals_from_safetensors(real_pair, real_pair_states, tmp_path):
    torch.save({"model": real_pair_states[0]}, tmp_path / "base.pt")
    torch.save(real_pair_states[1], tmp_path / "ft.bin")
    a = deltadct.compress(tmp_path / "base.pt", tmp_path / "ft.bin", progress=False)
    b = deltadct.compress(*real_pair, progress=False)
    for name in a.names("compressed"):
        assert torch.equal(a.reconstruct(name), b.reconstruct(name))


@pytest.mark.parametrize("where", ["finetuned", "base"])
def test_prefix_matching(real_pair_states, tmp_path, where):
    """A classifier wraps the encoder under ``bert.`` and adds a head; names still pair up."""
    base, finetuned = real_pair_states
    if where == "finetuned":
        finetuned = {**{f"bert.{k}": v for k, v in finetuned.items()}, "classifier.weight": torch.randn(2, 256)}
    else:
        base = {f"bert.{k}": v for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(finetuned, tmp_path / "ft.safetensors")
    match = match_keys(open_checkpoint(tmp_path / "base.safetensors"), open_checkpoint(tmp_path / "ft.safetensors"))
    assert len(match.pairs) == 6 and not match.missing
    assert all(match.base_name(f) == b for f, b in match.pairs.items())
    if where == "finetuned":
        assert match.finetuned_prefix == "bert." and match.extra == ["classifier.weight"]
        with pytest.raises(KeyMismatchError, match="classifier.weight"):
            deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", progress=False)
        dfile = deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", progress=False,
                                  policy={"extra_keys": "keep"})
        assert dfile.entries["classifier.weight"]["kind"] == "new"
    else:
        assert match.base_prefix == "bert." and not match.extra
        dfile = deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", progress=False)
    applied = deltadct.apply(tmp_path / "base.safetensors", dfile, progress=False)
    assert sorted(applied) == sorted(finetuned)
    for name, value in finetuned.items():
        assert applied[name].shape == value.shape


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch`` on a marker file: code execution a safe loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(real_pair_states, tmp_path, writer):
    marker = tmp_path / "pwned"
    payload = {"model": dict(real_pair_states[0]), "hook": _TouchOnUnpickle(marker)}
    path = tmp_path / "evil.bin"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh)
    with pytest.raises(UnsafeCheckpointError, match="refusing"):
        open_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError):
        deltadct.compress(path, path, progress=False)
    assert not marker.exists()
    # the same file unpickled unsafely would have run the code: the test's payload is real
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)
    assert marker.exists()


def test_unreadable_and_unsupported_paths(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "weights.npz").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported"):
        open_checkpoint(tmp_path / "weights.npz")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError):
        open_checkpoint(tmp_path / "broken.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no weights"):
        open_checkpoint(tmp_path / "empty")
