"""What deltadct reads and writes: safetensors everywhere it writes, weights-only torch.load for foreign
``.bin/.pth/.pt/.ckpt`` state dicts, and a refusal with an explanation for anything else.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import deltadct
from deltadct.checkpoints import open_checkpoint
from deltadct.errors import CheckpointError, UnsafeCheckpointError
from deltadct.io import OUTPUT_MARKER


def _state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"layer.weight": torch.randn(32, 32, generator=g), "layer.bias": torch.randn(32, generator=g)}


def _ft(state):
    return {k: v + 0.01 for k, v in state.items()}


def test_everything_written_is_plain_safetensors(tmp_path: Path):
    """Delta files and applied models open with the safetensors reader alone, with the expected tensors."""
    save_file(_state(), tmp_path / "base.safetensors")
    save_file(_ft(_state()), tmp_path / "ft.safetensors")
    delta = deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors",
                              out=tmp_path / "d.safetensors", progress=False)
    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as fh:
        assert set(fh.keys()) == {f"{n}::{f}" for n, e in delta.entries.items() for f in e["fields"]}
        assert "deltadct" in fh.metadata()
    out = deltadct.apply(tmp_path / "base.safetensors", tmp_path / "d.safetensors", tmp_path / "model", progress=False)
    assert sorted(p.name for p in out.iterdir()) == [OUTPUT_MARKER, "model.safetensors"]
    assert load_file(out / "model.safetensors").keys() == _state().keys()


@pytest.mark.parametrize("suffix", [".bin", ".pth", ".pt", ".ckpt"])
@pytest.mark.parametrize("nesting", [None, "state_dict", "model"])
def test_foreign_torch_state_dicts_load_weights_only(suffix: str, nesting: str | None, tmp_path: Path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    state = _state()
    torch.save(state if nesting is None else {nesting: state, "epoch": 3}, tmp_path / f"w{suffix}")
    reader = open_checkpoint(tmp_path / f"w{suffix}")
    assert reader.keys() == sorted(state)
    assert torch.equal(reader.get("layer.weight"), state["layer.weight"])
    assert calls and all(flag is True for flag in calls)


def test_foreign_torch_checkpoint_compresses_against_safetensors_base(tmp_path: Path):
    save_file(_state(), tmp_path / "base.safetensors")
    torch.save(_ft(_state()), tmp_path / "ft.bin")
    deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.bin", out=tmp_path / "d.safetensors",
                      progress=False)
    out = deltadct.apply(tmp_path / "base.safetensors", tmp_path / "d.safetensors", progress=False)
    assert torch.equal(out["layer.bias"], _ft(_state())["layer.bias"])


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch_zip", "raw_pickle"])
def test_code_carrying_checkpoints_are_refused_before_running_code(writer: str, tmp_path: Path):
    marker = tmp_path / "code-ran"
    obj = {"layer.weight": torch.zeros(2, 2), "hook": _Payload(marker)}
    if writer == "torch_zip":
        torch.save(obj, tmp_path / "evil.pth")
    else:
        with open(tmp_path / "evil.pth", "wb") as fh:
            pickle.dump(obj, fh)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        open_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pkl", "weights.npy", "weights.npz", "model.h5", "model", "model.onnx"])
def test_other_formats_are_refused_with_an_explanation(name: str, tmp_path: Path):
    (tmp_path / name).write_bytes(b"\x80\x04K\x01.")  # a valid pickle of 1: never opened, refused by name
    with pytest.raises(CheckpointError, match=r"unsupported checkpoint format .*\.safetensors.*\.bin"):
        open_checkpoint(tmp_path / name)


def test_model_dir_without_safe_weights_is_refused(tmp_path: Path):
    (tmp_path / "model").mkdir()
    with open(tmp_path / "model" / "weights.pkl", "wb") as fh:
        pickle.dump(_state(), fh)
    with pytest.raises(CheckpointError, match="holds no weights"):
        open_checkpoint(tmp_path / "model")
