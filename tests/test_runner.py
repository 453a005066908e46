"""deltadct-run: config validation before any load, records, skip/resume of sweeps, W&B offline, tables.

Runs on the fast ViT zoo (built once into the shared $DELTADCT_CACHE) with small eval subsets, in
process through Hydra's compose API and as ``deltadct-run`` subprocesses started in a temp dir.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException

import deltadct
from deltadct.errors import ConfigError
from deltadct.methods import list_methods
from experiments.config import validate
from experiments.run import run_job
from experiments.store import REFERENCE_METHOD, ResultStore
from experiments.tables import build_table, select

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
# small and quick: the fast zoo, one task, few eval samples
FAST = ["model=zoo_vit", "zoo.mode=fast", "tasks=[parity]", "eval.vision.max_samples=64",
        "eval.fidelity.max_samples=64", "eval.reconstruction.num_inputs=2"]


def _compose(overrides: list[str], *, hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), warnings.catch_warnings():
        # the launcher files share the plugins' names on purpose (see experiments/run.py)
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def _cli(args: list[str], cwd: Path, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    script = Path(sys.executable).with_name("deltadct-run")  # the console script users run, from another cwd
    command = [str(script)] if script.exists() else [sys.executable, "-m", "experiments.run"]
    return subprocess.Popen([*command, *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def _stem_names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# ------------------------------------------------------------------ configs, no model loaded

def test_method_configs_are_one_to_one_with_the_registry_and_valid():
    assert _stem_names("method") == list_methods()
    for name in list_methods():
        assert yaml.safe_load((CONF / "method" / f"{name}.yaml").read_text())["name"] == name
        validate(_compose([f"method={name}"]))  # the method's own Config accepts the file's options


@pytest.mark.parametrize("model", _stem_names("model"))
def test_every_model_pair_composes_and_validates(model):
    cfg = _compose([f"model={model}"])
    spec = validate(cfg)
    assert list(spec.evaluators) == list(cfg.model.evaluators)
    assert "reconstruction" in spec.evaluators  # the data-free evaluator runs for every pair
    assert (cfg.model.zoo is None) == bool(cfg.model.tasks)


@pytest.mark.parametrize("preset", _stem_names("experiment"))
def test_every_preset_composes_into_a_sweep_with_its_tag(preset):
    cfg = _compose([f"experiment={preset}"], hydra_config=True)
    assert cfg.experiment == preset
    assert cfg.hydra.mode.name == "MULTIRUN" and cfg.hydra.sweeper.params


def test_sweep_presets_sweep_what_they_say():
    params = lambda p: _compose([f"experiment={p}"], hydra_config=True).hydra.sweeper.params  # noqa: E731
    assert params("sweep_patch_size") == {"method.patch_size": "8,16,32,64"}
    ratios = params("ablation_ratio")["method.ratios"]
    assert ratios.count("[") == 6 and "[0,1,0]" in ratios and "[0.5,0,0.5]" in ratios
    assert params("default") == {"method": "glob(*)"}
    assert _compose(["experiment=default"]).zoo.mode == "full"
    assert _compose(["experiment=default"]).budget.bits == 1.0  # the main job compares at matched bits


@pytest.mark.parametrize("launcher,target", [
    ("basic", "BasicLauncher"), ("joblib", "JoblibLauncher"), ("submitit_slurm", "SlurmLauncher")])
def test_launchers_compose(launcher, target):
    cfg = _compose([f"hydra/launcher={launcher}"], hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith(target)


def test_zoo_recipe_is_part_of_a_runs_identity(monkeypatch):
    """Runs on a zoo rebuilt by a new recipe are new runs (not skipped as done); recipe 1 keeps its old keys."""
    from omegaconf import OmegaConf

    from experiments.run import identity
    from experiments.store import config_hash
    from experiments.zoo import vit

    config = OmegaConf.to_container(_compose(["model=zoo_vit", "method=deltadct"]), resolve=True)
    assert "recipe_version" not in identity(config)["zoo"]
    before = config_hash(identity(config))
    monkeypatch.setattr(vit, "RECIPE_VERSION", 2, raising=False)
    assert identity(config)["zoo"]["recipe_version"] == 2
    assert config_hash(identity(config)) != before
    assert "zoo" not in identity(OmegaConf.to_container(_compose(["model=roberta_base_glue"]), resolve=True))


def test_zoo_build_device_is_part_of_a_runs_identity_and_validated():
    """A GPU-built zoo holds other checkpoints, so its runs are new runs; CPU runs keep their old keys."""
    from omegaconf import OmegaConf

    from experiments.run import identity
    from experiments.store import config_hash

    cpu = OmegaConf.to_container(_compose(["model=zoo_minilm", "method=deltadct"]), resolve=True)
    cuda = OmegaConf.to_container(_compose(["model=zoo_minilm", "method=deltadct", "zoo.device=cuda"]), resolve=True)
    assert "device" not in identity(cpu)["zoo"]
    assert identity(cuda)["zoo"]["device"] == "cuda"
    assert config_hash(identity(cuda)) != config_hash(identity(cpu))
    with pytest.raises(ConfigError, match=r"zoo.device 'tpu' is not one of \['cpu', 'cuda'\]"):
        validate(_compose(["model=zoo_minilm", "zoo.device=tpu"]))


def test_bad_method_option_fails_before_any_model_is_loaded(tmp_path):
    cfg = _compose([*FAST, "method=deltadct", "method.patch_size=0", f"zoo.cache_dir={tmp_path / 'cache'}"])
    started = time.perf_counter()
    with pytest.raises(ConfigError, match="patch_size"):
        run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "records.jsonl")
    assert time.perf_counter() - started < 5
    assert not (tmp_path / "cache").exists() and not (tmp_path / "records.jsonl").exists()
    with pytest.raises(ConfigError, match="unknown option"):
        validate(_compose(["method=bitdelta", "+method.patch_size=8"]))
    with pytest.raises(ConfigError, match="device 'xyz' is not a device name"):
        validate(_compose([*FAST, "device=xyz"]))
    with pytest.raises(ConfigError, match="unknown evaluator 'nope'"):
        validate(_compose([*FAST, "model.evaluators=[nope]"]))


def test_unknown_method_is_hydras_missing_config_error():
    with pytest.raises(MissingConfigException, match="nope"):
        _compose(["method=nope"])


def test_cli_bad_override_prints_one_line_and_exits_nonzero(tmp_path):
    cache = tmp_path / "cache"
    for args, expect in ((["method.patch_size=0"], "deltadct-run: error: option 'patch_size': 0 must be"),
                         (["method=nope"], "Could not find 'method/nope'")):
        proc = _cli([*args, f"zoo.cache_dir={cache}"], tmp_path)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode != 0
        assert expect in err and "Traceback" not in err, err
    assert [line for line in err.splitlines() if "error" in line.lower()]
    assert not cache.exists() and not (tmp_path / "results").exists()


# ------------------------------------------------------------------ real runs on the fast zoo

def test_run_records_measured_numbers_and_logs_to_wandb_offline(tmp_path):
    run_dir, store_path = tmp_path / "run", tmp_path / "results" / "records.jsonl"
    cfg = _compose([*FAST, "method=deltadct", "method.patch_size=32", "logger=wandb", "logger.mode=offline"])
    records = run_job(cfg, run_dir=run_dir, store_path=store_path, name="patch32")
    assert [r["method"] for r in records] == [REFERENCE_METHOD, "deltadct"]
    assert ResultStore(store_path).records() == json.loads(json.dumps(records))
    ref, rec = records
    info = deltadct.info(run_dir / "delta_parity.safetensors")
    assert rec["bits_per_param"] == info["bits_per_param"] and rec["file_bytes"] == info["file_bytes"]
    # per-layer bits and relative error from the file, one entry per compressed tensor
    assert rec["layers"] == info["layers"] and len(rec["layers"]) == info["num_compressed"]
    assert all(0 < layer["rel_error"] and 0 < layer["bits_per_param"] for layer in rec["layers"].values())
    assert rec["method_options"]["patch_size"] == 32 and rec["config"]["method"]["patch_size"] == 32
    assert rec["score"] == rec["metrics"]["vision/score"] and 0 <= rec["score"] <= 1
    assert ref["metrics"]["reconstruction/score"] == pytest.approx(0, abs=1e-6)  # the reference vs itself
    assert rec["metrics"]["reconstruction/score"] > 0
    assert rec["timings"]["compress"] > 0 and rec["memory"]["compress_peak_rss_mb"] > 0
    assert 0 < rec["memory"]["compress_peak_anon_mb"] <= rec["memory"]["compress_peak_rss_mb"]
    assert rec["git_commit"] and rec["versions"]["torch"] and rec["host"]["name"]

    # offline W&B keeps the run in one binary log (protobuf records; keys and JSON values as text)
    runs = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    logged = runs[0].read_bytes()
    for key, value in (("parity/vision/score", rec["score"]), ("parity/bits_per_param", rec["bits_per_param"]),
                       ("parity/layers", None)):
        assert key.encode() in logged
        assert value is None or json.dumps(value).encode() in logged

    # the same config again is skipped; tables rebuild the records' numbers
    assert run_job(cfg, run_dir=tmp_path / "again", store_path=store_path) == []
    table = build_table(select(ResultStore(store_path).records()))
    assert table.cells() == [[REFERENCE_METHOD, ref["score"], ref["score"], None],
                             ["deltadct", rec["score"], rec["score"], rec["bits_per_param"]]]


def test_logger_none_leaves_no_wandb_trace(tmp_path):
    had_wandb = "wandb" in sys.modules
    cfg = _compose([*FAST, "method=bitdelta", "reference=false", "logger=none"])
    assert len(run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "r.jsonl")) == 1
    assert not list(tmp_path.rglob("wandb")) and not list(tmp_path.rglob("*.wandb"))
    if not had_wandb:
        assert "wandb" not in sys.modules


def test_runs_sharing_a_run_folder_never_touch_each_others_deltas(tmp_path):
    # Hydra names a run's folder by the second it started: runs started together share one. Before,
    # each wrote delta_<task>.safetensors there and deleted it when done, so one run could evaluate or
    # delete another's delta (seen on a GPU: 8 parallel runs, 3 failed on a vanished file).
    run_dir = tmp_path / "2026-12-04_03-16-50"
    run_dir.mkdir()
    other = run_dir / "delta_parity.safetensors"
    other.write_bytes(b"another run's delta, being written")
    cfg = _compose([*FAST, "method=bitdelta", "reference=false", "keep_deltas=false"])
    [record] = run_job(cfg, run_dir=run_dir, store_path=tmp_path / "r.jsonl")
    assert other.read_bytes() == b"another run's delta, being written"  # neither read, replaced nor deleted
    assert 0.9 < record["bits_per_param"] < 1.3  # its own BitDelta file was measured, not the bytes above
    assert sorted(p.name for p in run_dir.iterdir() if "delta" in p.name) == ["delta_parity.safetensors"]

    # a run keeping its deltas in the folder holds it: a second one there stops before any work
    with (run_dir / ".deltadct-run.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        keep = _compose([*FAST, "method=deltadct", "reference=false", "keep_deltas=true"])
        with pytest.raises(ConfigError, match="in use by another run.*hydra.run.dir"):
            run_job(keep, run_dir=run_dir, store_path=tmp_path / "kept.jsonl")
    assert not (tmp_path / "kept.jsonl").exists() and other.read_bytes().startswith(b"another run")


def test_killed_sweep_resumes_and_each_config_is_recorded_once(tmp_path):
    sweep = ["-m", *FAST, "method=deltadct,bitdelta", "method.seed=0,1", "reference=false"]
    store = ResultStore(tmp_path / "results" / "records.jsonl")
    proc = _cli(sweep, tmp_path, start_new_session=True)
    deadline = time.monotonic() + 240
    while not store.records() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-2000:]  # still running: kill it mid-sweep
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = len(store.records())
    assert 1 <= killed_at < 4

    proc = _cli(sweep, tmp_path)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    keys = [r["key"] for r in store.records()]
    assert len(keys) == 4 and len(set(keys)) == 4
    assert sorted((r["method"], r["method_options"]["seed"]) for r in store.records()) == [
        ("bitdelta", 0), ("bitdelta", 1), ("deltadct", 0), ("deltadct", 1)]
    assert err.count("skipped") >= killed_at

    proc = _cli(sweep, tmp_path)  # everything recorded: all four jobs skip
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0 and err.count("skipped") == 4 and len(store.records()) == 4
    assert not list(tmp_path.rglob("wandb"))


def test_a_job_that_fails_on_a_bug_says_so_at_once_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """Hydra reports a failed multirun job only after the last one; the runner names it when it fails."""
    import experiments.run as runner

    def run_job(cfg, **kwargs):
        if cfg.method.name == "bitdelta":
            raise ImportError("No module named 'datasets'")
        print(f"job for {cfg.method.name} ran", file=sys.stderr)
        return []

    monkeypatch.setattr(runner, "run_job", run_job)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["deltadct-run", "-m", *FAST, "method=bitdelta,zero", "logger=none",
                                      f"store.path={tmp_path / 'r.jsonl'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    # Hydra re-raises the job's error at the end of the sweep, or exits 1 having printed it
    with warnings.catch_warnings(), pytest.raises((ImportError, SystemExit)):
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        runner.main()
    err = capsys.readouterr().err
    failed = re.search(r"deltadct-run: job 0 \([^)]*method=bitdelta[^)]*\) failed: ImportError: No module named "
                       r"'datasets'", err)
    assert failed and failed.start() < err.index("job for zero ran")  # said before the next job, which still ran


def test_a_two_job_sweep_loads_the_pair_once_and_times_each_job(tmp_path, monkeypatch):
    """Hydra's basic launcher runs both jobs in this process: the pair is resolved, its checkpoints
    opened and the reference model loaded once, and each record still carries its own timings."""
    import experiments.run as runner
    from deltadct.adapters import get_adapter

    calls = {"pair": 0, "checkpoint": 0, "model": 0}

    def counted(kind, function):
        def wrapper(*args, **kwargs):
            calls[kind] += 1
            return function(*args, **kwargs)
        return wrapper

    adapter_cls = type(get_adapter(_compose(FAST).model.adapter))
    monkeypatch.setattr(runner, "SHARED", runner.SweepCache())  # nothing from earlier tests in this process
    monkeypatch.setattr(runner, "load_pair", counted("pair", runner.load_pair))
    monkeypatch.setattr(runner, "open_checkpoint", counted("checkpoint", runner.open_checkpoint))
    monkeypatch.setattr(deltadct.api, "open_checkpoint", counted("checkpoint", deltadct.api.open_checkpoint))
    monkeypatch.setattr(adapter_cls, "load", counted("model", adapter_cls.load))
    store_path = tmp_path / "records.jsonl"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["deltadct-run", "-m", *FAST, "method=bitdelta,deltadct", "logger=none",
                                      f"store.path={store_path}", f"hydra.sweep.dir={tmp_path / 'sweep'}"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        runner.main()
    records = [r for r in ResultStore(store_path).records() if r["method"] != REFERENCE_METHOD]
    assert sorted(r["method"] for r in records) == ["bitdelta", "deltadct"]
    # one base + one fine-tuned checkpoint opened, one reference model: not one of each per job
    assert calls == {"pair": 1, "checkpoint": 2, "model": 1}
    for record in records:
        assert record["timings"]["compress"] > 0 and record["timings"]["apply"] > 0
    assert records[0]["bits_per_param"] != records[1]["bits_per_param"]
