"""Shared fixtures: a real (tiny) base / fine-tuned pair and synthetic RoBERTa-sized deltas.

``real_pair`` comes from an actual fine-tuning run, not from noise: an MLP is trained on scikit-learn's
8×8 digits (base), then fine-tuned on the same digits mirrored left–right (a different task that
moves every layer). Both runs are seeded full-batch Adam, a few seconds on one core.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

REPO = Path(__file__).resolve().parents[1]
#: digits MLP 64 → 256 → 256 → 10; its 10×256 head is shorter than a 16-patch, so the policy keeps it
DIGITS_MLP_HIDDEN = 256
DIGITS_MODEL_CONFIG = {"model_type": "digits-mlp", "in_features": 64, "hidden": DIGITS_MLP_HIDDEN,
                       "num_classes": 10}


def load_benchmark_module(name: str):
    """Import ``benchmarks/<name>.py`` (plain scripts, not a package) so tests reuse their helpers."""
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def digits_mlp() -> torch.nn.Sequential:
    h = DIGITS_MLP_HIDDEN
    return torch.nn.Sequential(torch.nn.Linear(64, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
                               torch.nn.Linear(h, 10))


def digits_data(mirrored: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 8×8 images, 0–16 grey levels), read from the copy sklearn ships
    without importing sklearn itself (seconds on a busy machine)."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    data = torch.from_numpy(np.loadtxt(csv, delimiter=",", dtype=np.float32))
    images = data[:, :-1].reshape(-1, 8, 8) / 16.0
    if mirrored:
        images = images.flip(-1)
    return images.reshape(len(images), -1), data[:, -1].long()


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, lr: float) -> float:
    """Full-batch Adam on cross-entropy; returns the final training accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def digits_accuracy(state: dict[str, torch.Tensor], mirrored: bool) -> float:
    model = digits_mlp()
    model.load_state_dict(state)
    x, y = digits_data(mirrored)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def train_digits_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, fine-tuned) state dicts of the digits MLP: trained on digits, then on mirrored digits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than 2 contended threads for matrices this small
    try:
        torch.manual_seed(0)
        model = digits_mlp()
        x, y = digits_data(mirrored=False)
        base_acc = train(model, x, y, steps=30, lr=1e-2)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        xm, ym = digits_data(mirrored=True)
        ft_acc = train(model, xm, ym, steps=25, lr=5e-3)
        finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        torch.set_num_threads(threads)
    assert base_acc > 0.95 and ft_acc > 0.9, (base_acc, ft_acc)  # both tasks really learnt
    return base, finetuned


@pytest.fixture(scope="session")
def real_pair_states() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base, fine-tuned) state dicts of the real digits fine-tuning (see :func:`train_digits_pair`)."""
    return train_digits_pair()


@pytest.fixture(scope="session")
def real_pair(real_pair_states, tmp_path_factory) -> tuple[Path, Path]:
    """(base, fine-tuned) ``.safetensors`` files of a real fine-tuning run (digits → mirrored digits)."""
    from safetensors.torch import save_file

    base, finetuned = real_pair_states
    root = tmp_path_factory.mktemp("real_pair")
    save_file(base, root / "base.safetensors")
    save_file(finetuned, root / "finetuned.safetensors")
    return root / "base.safetensors", root / "finetuned.safetensors"


@pytest.fixture(scope="session")
def real_pair_dir(real_pair_states, tmp_path_factory) -> tuple[Path, Path]:
    """The same pair as HF-style model directories (``model.safetensors`` + ``config.json``)."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("real_pair_dir")
    dirs = []
    for name, state, task in (("base", real_pair_states[0], "digits"),
                              ("finetuned", real_pair_states[1], "mirrored-digits")):
        d = root / name
        d.mkdir()
        save_file(state, d / "model.safetensors", metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps({**DIGITS_MODEL_CONFIG, "task": task}))
        dirs.append(d)
    return dirs[0], dirs[1]


@pytest.fixture(scope="session")
def real_deltas(real_pair_states) -> dict[str, torch.Tensor]:
    """fine-tuned − base for every matrix of the real pair (fp32)."""
    base, finetuned = real_pair_states
    return {k: (finetuned[k] - base[k]).float() for k in base if base[k].ndim >= 2}


@pytest.fixture(scope="session")
def synthetic():
    """``benchmarks/synthetic.py``: RoBERTa-base shapes and heavy-tailed low-rank deltas."""
    return load_benchmark_module("synthetic")
