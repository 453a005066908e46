"""Calibration: layer-input moments against sums written out by hand, and the runner's calibrated
methods on the fast ViT zoo (calibrated runs, scale distillation, and the bad inputs: no
calibration data, data of the wrong modality, a missing split)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from torch import nn

import deltadct
from deltadct.calibration import collect_hessians, collect_input_moments
from deltadct.errors import ConfigError
from deltadct.gptq import hessian
from experiments.config import validate
from experiments.run import identity, run_job
from experiments.store import ResultStore

REPO = Path(__file__).resolve().parent.parent
FAST = ["model=zoo_vit", "zoo.mode=fast", "tasks=[parity]", "eval.vision.max_samples=64",
        "eval.reconstruction.num_inputs=2", "calibration.num_samples=16"]


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        return compose("config", overrides=overrides)


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, kernel_size=2, stride=1, padding=1)
        self.fc = nn.Linear(3, 4)

    def forward(self, x):
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_moments_are_the_sums_of_outer_products_of_each_layers_inputs():
    torch.manual_seed(0)
    model = TwoLayers()
    batches = [{"x": torch.randn(2, 2, 3, 3)} for _ in range(3)]
    moments = collect_input_moments(model, batches)
    assert sorted(moments) == ["conv.weight", "fc.weight"]

    # by hand: every zero-padded 2×2 window of every image, flattened in the kernel's (in, kh, kw) order
    conv_rows = []
    for batch in batches:
        padded = torch.nn.functional.pad(batch["x"], (1, 1, 1, 1)).double()
        for image in padded:
            for i in range(4):
                for j in range(4):
                    conv_rows.append(image[:, i:i + 2, j:j + 2].reshape(-1))
    conv_rows = torch.stack(conv_rows)
    torch.testing.assert_close(moments["conv.weight"].xtx, conv_rows.T @ conv_rows)
    assert moments["conv.weight"].count == 3 * 2 * 16

    with torch.no_grad():
        fc_rows = torch.cat([model.conv(b["x"]).mean(dim=(2, 3)) for b in batches]).double()
    torch.testing.assert_close(moments["fc.weight"].xtx, fc_rows.T @ fc_rows)
    hessians = collect_hessians(model, batches)
    torch.testing.assert_close(hessians["fc.weight"], (2 * fc_rows.T @ fc_rows / 6).float())


def test_collecting_leaves_the_model_as_it_was():
    model = TwoLayers().train()
    collect_input_moments(model, [{"x": torch.randn(1, 2, 3, 3)}])
    assert model.training and not model.conv._forward_hooks and not model.fc._forward_hooks
    with pytest.raises(ConfigError, match="at least one batch"):
        collect_input_moments(model, [])


# ------------------------------------------------------------------ layout without data

@pytest.mark.parametrize("method", [n for n in deltadct.list_methods()
                                    if deltadct.get_method_class(n).needs_calibration])
def test_a_calibrated_methods_file_layout_does_not_depend_on_the_hessian(method):
    """The matched-bits search sizes calibrated methods with identity Hessians (no data at hand); that is
    exact only if the stored tensors' names, dtypes and shapes depend on the options and shapes alone."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(96, 160, generator=gen) * 1e-3
    acts = torch.randn(512, 160, generator=gen) * torch.linspace(0.1, 3.0, 160)  # unequal feature scales
    layouts, values = [], []
    for h in (torch.eye(160), hessian(acts.T @ acts, len(acts))):
        out = deltadct.create_method(method).compress(delta, name="w", hessian=h)
        layouts.append({k: (t.dtype, tuple(t.shape)) for k, t in out.tensors.items()})
        values.append(out.payload_bytes)
        assert len(layouts[-1]) > 0
    assert layouts[0] == layouts[1] and values[0] == values[1]


# ------------------------------------------------------------------ runner: bad inputs, no model loaded

@pytest.mark.parametrize("method", ["delta_come", "deltazip", "bitdelta_distilled"])
def test_calibrated_method_without_calibration_data_is_refused(method):
    with pytest.raises(ConfigError, match=f"method '{method}' needs calibration data but calibration=none; "
                                          "set calibration=task"):
        validate(_compose([*FAST, f"method={method}", "calibration=none"]))


def test_calibration_data_of_the_wrong_modality_is_refused():
    images = ["model.tasks.sst2.data.kind=imagefolder", "+model.tasks.sst2.data.root=/nowhere/val"]
    with pytest.raises(ConfigError, match="task 'sst2' are image samples but adapter 'hf_seqcls' takes text"):
        validate(_compose(["model=roberta_base_glue", "method=delta_come", *images]))
    validate(_compose(["model=roberta_base_glue", "method=bitdelta", *images]))  # not read without calibration


def test_cli_without_calibration_data_prints_one_line_and_writes_nothing(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "experiments.run", *FAST, "method=delta_come", "calibration=none",
                           f"zoo.cache_dir={tmp_path / 'cache'}"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert errors == ["deltadct-run: error: method 'delta_come' needs calibration data but calibration=none; "
                      "set calibration=task"], proc.stderr[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_calibration_reaches_a_runs_identity_only_for_methods_that_read_it():
    from omegaconf import OmegaConf

    def ident(*overrides):
        return identity(OmegaConf.to_container(_compose([*FAST, *overrides]), resolve=True))

    assert "calibration" not in ident("method=bitdelta")  # records made before calibration existed keep their keys
    assert ident("method=bitdelta") == ident("method=bitdelta", "calibration.num_samples=99")
    assert ident("method=delta_come")["calibration"]["num_samples"] == 16


# ------------------------------------------------------------------ runner: real calibrated runs

def test_missing_calibration_split_fails_before_any_record(tmp_path):
    cfg = _compose([*FAST, "method=delta_come", "calibration.split=nosuch"])
    with pytest.raises(ConfigError, match="calibration.split 'nosuch' of task 'parity' is missing"):
        run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "records.jsonl")
    assert not ResultStore(tmp_path / "records.jsonl").records()


@pytest.mark.parametrize("method", ["delta_come", "deltazip"])
def test_gptq_methods_run_on_the_task_training_split(method, tmp_path):
    cfg = _compose([*FAST, f"method={method}", "reference=false"])
    (record,) = run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "records.jsonl")
    info = deltadct.info(tmp_path / "run" / "delta_parity.safetensors")
    assert record["bits_per_param"] == info["bits_per_param"]
    assert record["timings"]["calibrate"] > 0
    assert record["config"]["calibration"]["num_samples"] == 16
    # every compressed matrix had a Hessian (deltadct.compress refuses otherwise) and lost less than storing nothing
    assert len(info["layers"]) == info["num_compressed"] > 0
    assert all(0 < layer["rel_error"] < 1 for layer in info["layers"].values())


def test_bitdelta_distilled_lowers_the_logit_loss_and_keeps_the_layout(tmp_path):
    cfg = _compose([*FAST, "method=bitdelta_distilled", "method.steps=30", "reference=false"])
    (record,) = run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "records.jsonl")
    report = record["distillation"]
    assert report["steps"] == 30 and report["loss_after"] < report["loss_before"]
    dfile = deltadct.load(tmp_path / "run" / "delta_parity.safetensors")
    assert dfile.header["distillation"]["schedule"] == "cosine" and dfile.header["distillation"]["absolute"]
    initial = _compose([*FAST, "method=bitdelta", "reference=false"])
    (plain,) = run_job(initial, run_dir=tmp_path / "plain", store_path=tmp_path / "records.jsonl")
    assert record["file_bytes"] - plain["file_bytes"] < 2048  # same payload: only the header differs
    assert json.dumps(record["method_options"]) != json.dumps(plain["method_options"])


def test_a_zoo_task_without_a_training_file_calibrates_on_what_the_zoo_fine_tuned_on(tmp_path):
    """QNLI has no training file offline: the zoo fine-tunes on a seeded re-split of its validation file,
    and calibration draws from that training part, never from the held-out evaluation part."""
    from types import SimpleNamespace

    from experiments.calibration import task_samples
    from experiments.zoo.glue import QNLI_EVAL_SIZE, finetune_splits, write_eval_data

    train, val = finetune_splits("qnli")
    assert len(train) == 5463 - QNLI_EVAL_SIZE and len(val) == QNLI_EVAL_SIZE
    data = {"kind": "glue", "task": "qnli", "data_dir": str(write_eval_data(tmp_path, "qnli", val))}
    conf = SimpleNamespace(split="train", num_samples=16, seed=0)
    samples = task_samples(data, "qnli", "minilm", conf)
    train_texts, val_texts = {ex["texts"] for ex in train}, {ex["texts"] for ex in val}
    assert len(samples) == len(set(samples)) == 16
    assert all(s in train_texts and s not in val_texts for s in samples)
    assert task_samples(data, "qnli", "minilm", conf) == samples  # fixed by the seed
    # a hub/local pair has no zoo re-split to fall back on: the missing split stays a clear error
    with pytest.raises(ConfigError, match="calibration.split 'train' of GLUE qnli is missing"):
        task_samples(data, "qnli", None, conf)
