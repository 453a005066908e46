"""``deltadct-run``: compress → reconstruct → evaluate every task of a model pair, one record per task.

    deltadct-run model=zoo_vit method=deltadct method.patch_size=32
    deltadct-run -m method=deltadct,bitdelta zoo.mode=fast         # a sweep (basic launcher)
    deltadct-run experiment=default                                 # a preset from conf/experiment/

Every option is checked (the method's own Config from the registry, evaluators, adapter, policy)
before any model is loaded; a bad one prints one line and exits non-zero. Configs already in the
result store are skipped (``force=true`` re-runs them), so a killed sweep resumes where it stopped.
Nothing here knows a method or a model family: those come from the registries and conf/.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import importlib.metadata
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import deltadct
from deltadct.errors import CheckpointError, DeltaDCTError
from experiments.config import VOLATILE_KEYS, RunSpec, register_configs, validate
from experiments.loggers import make_logger
from experiments.store import REFERENCE_METHOD, ResultStore, config_hash

RECORD_VERSION = 1
VERSIONED_PACKAGES = ("deltadct", "torch", "transformers", "timm", "hydra-core", "numpy", "safetensors")

register_configs()
# conf/hydra/launcher/{basic,joblib,submitit_slurm}.yaml carry this project's defaults under the
# launcher plugins' own names (so `hydra/launcher=joblib` picks them up); Hydra then checks them
# against the plugin's schema and warns that this matching is deprecated. The files are complete
# configs that work without the matching, so the warning says nothing actionable.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


# --------------------------------------------------------------------------- the model pair

@dataclass
class TaskSource:
    path: Path
    data: dict
    #: scores the zoo measured when it built the checkpoint (None for hub/local pairs)
    zoo_scores: dict | None = None


def resolve_checkpoint(ref: str) -> Path:
    """A local checkpoint path, or a hub name found in the local Hugging Face cache (never downloads)."""
    path = Path(ref).expanduser()
    if path.exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True))
    except Exception:  # not a repo id, or not cached: say so in one line
        raise CheckpointError(f"checkpoint {ref!r} is neither a local path nor a model in the local "
                              "Hugging Face cache (download it first, or point the config at a local copy)") from None


def load_pair(cfg: DictConfig) -> tuple[Path, dict[str, TaskSource]]:
    """The base checkpoint and the fine-tuned task checkpoints of ``cfg.model``."""
    model = cfg.model
    if model.zoo is not None:
        from experiments.zoo import build_zoo

        entry = build_zoo(model.zoo, cfg.zoo.mode, cfg.zoo.cache_dir, cfg.zoo.seed, progress=cfg.zoo.progress)
        tasks = {name: TaskSource(Path(t.path), {k: (str(v) if isinstance(v, Path) else v) for k, v in t.data.items()},
                                  {"metric": t.metric, "finetuned": t.finetuned_score, "base": t.base_score,
                                   "majority": t.majority_score, "learned": t.learned})
                 for name, t in entry.tasks.items()}
        base = Path(entry.base_path)
    else:
        base = resolve_checkpoint(model.base)
        tasks = {name: TaskSource(resolve_checkpoint(t.path), OmegaConf.to_container(t.data, resolve=True))
                 for name, t in model.tasks.items()}
    if cfg.tasks is not None:
        unknown = sorted(set(cfg.tasks) - set(tasks))
        if unknown:
            raise DeltaDCTError(f"tasks {unknown} are not tasks of model {model.name!r}: {sorted(tasks)}")
        tasks = {name: tasks[name] for name in cfg.tasks}
    return base, tasks


# --------------------------------------------------------------------------- measurements

class PeakMemory:
    """Peak resident memory of this process while the block runs (sampled), and CUDA peak allocation."""

    def __init__(self, interval: float = 0.01):
        import psutil

        self._process = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_rss_mb = 0.0
        self.cuda_max_allocated_mb: float | None = None

    def _sample(self) -> None:
        while True:
            self.peak_rss_mb = max(self.peak_rss_mb, self._process.memory_info().rss / 2**20)
            if self._stop.wait(self._interval):
                return

    def __enter__(self) -> "PeakMemory":
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = round(max(self.peak_rss_mb, self._process.memory_info().rss / 2**20), 1)
        if torch.cuda.is_available():
            self.cuda_max_allocated_mb = round(torch.cuda.max_memory_allocated() / 2**20, 1)


class Timer:
    """Wall-clock seconds per named phase: ``with timer("compress"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 4)


def max_rss_mb() -> float:
    """Peak RSS of the whole process so far (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


@functools.cache
def provenance() -> dict[str, Any]:
    """Git commit, package versions and host, recorded with every result."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {"git_commit": commit, "git_dirty": dirty, "versions": versions,
            "host": {"name": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
                     "cpus": os.cpu_count(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


# --------------------------------------------------------------------------- evaluation

def evaluate(model: torch.nn.Module, spec: RunSpec, ctx: Any, seed: int, timer: Timer,
             examples: dict[str, dict] | None = None) -> dict[str, float]:
    """Every evaluator's metrics, flat as ``<evaluator>/<metric>``; the per-example outputs of those
    that keep them go into ``examples`` (evaluator name -> compact outputs) when given."""
    from eval import get_evaluator

    metrics = {}
    for name, options in spec.evaluators.items():
        torch.manual_seed(seed)
        evaluator = get_evaluator(name)(**options)
        with timer(f"eval/{name}"), torch.no_grad():
            result = evaluator.evaluate(model, ctx)
        metrics.update({f"{name}/{k}": float(v) for k, v in result.items()})
        if examples is not None and evaluator.last_examples is not None:
            examples[name] = evaluator.last_examples
    return metrics


def headline(spec: RunSpec, metrics: dict[str, float]) -> tuple[str, float | None]:
    """The first evaluator's "score" (the task metric), the number tables show."""
    key = f"{next(iter(spec.evaluators))}/score"
    return key, metrics.get(key)


# --------------------------------------------------------------------------- one job

def identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of the resolved config that decides what a run computes (hashed for skip/resume)."""
    out = {k: v for k, v in config.items() if k not in VOLATILE_KEYS and k != "tasks"}
    out["zoo"] = {k: v for k, v in out["zoo"].items() if k not in ("cache_dir", "progress")}
    out["eval"] = {k: v for k, v in out["eval"].items() if k in out["model"]["evaluators"]}  # only those that run
    if out["model"].get("zoo") is None:
        out.pop("zoo")
    else:
        from experiments.zoo import recipe_version

        # A zoo rebuilt by a new recipe holds other checkpoints, so its runs are new runs. Recipe 1
        # predates versioning and stays out of the hash, which keeps the keys of records made then.
        recipe = recipe_version(out["model"]["zoo"])
        if recipe != 1:
            out["zoo"]["recipe_version"] = recipe
    return out


def record_key(config_id: str, task: str, *, reference: bool = False) -> str:
    """Store key of one (config, task) record; reference records share one key per task and experiment."""
    return f"{config_id}:{task}" + (":ref" if reference else "")


def run_job(cfg: DictConfig, *, run_dir: Path, store_path: Path, group: str | None = None,
            name: str = "run", overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Run every task of ``cfg.model`` with ``cfg.method``; append and return the new records."""
    spec = validate(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    ident = identity(config)
    method_id = config_hash(ident)
    reference_id = config_hash({k: v for k, v in ident.items() if k != "method"})
    store = ResultStore(store_path)

    base, tasks = load_pair(cfg)
    done = set() if cfg.force else store.keys()
    todo = [t for t in tasks if record_key(method_id, t) not in done]
    ref_todo = [t for t in tasks if cfg.reference and record_key(reference_id, t, reference=True) not in done]
    if not todo and not ref_todo:
        print(f"deltadct-run: all {len(tasks)} task(s) of this config are in {store_path}; skipped "
              "(force=true re-runs)", file=sys.stderr)
        return []

    from deltadct.adapters import get_adapter
    from eval import EvalContext

    adapter = get_adapter(cfg.model.adapter)
    logger = make_logger(config["logger"])
    run_dir.mkdir(parents=True, exist_ok=True)
    logger.start(config, run_dir=run_dir, group=group or cfg.logger.group or cfg.experiment, name=name)
    common = {"record_version": RECORD_VERSION, "experiment": cfg.experiment, "model": cfg.model.name,
              "family": cfg.model.family, "run_dir": str(run_dir), "overrides": list(overrides or []),
              **provenance()}
    written = []
    try:
        for task in dict.fromkeys(todo + ref_todo):
            source = tasks[task]
            timer = Timer()
            with timer("load_reference"):
                reference = adapter.load(source.path, device=cfg.device)
                ctx = EvalContext(task=task, data=source.data, processor=adapter.load_processor(source.path),
                                  adapter=adapter.name, reference=reference, device=cfg.device)
            if task in ref_todo:
                examples: dict[str, dict] = {}
                metrics = evaluate(reference, spec, ctx, spec.method_config.seed, timer, examples)
                key_name, score = headline(spec, metrics)
                record = {**common, "key": record_key(reference_id, task, reference=True), "config_hash": reference_id,
                          "task": task, "method": REFERENCE_METHOD, "method_options": {}, "score": score,
                          "score_key": key_name, "metrics": metrics, "bits_per_param": None,
                          "zoo_scores": source.zoo_scores, "timings": dict(timer.seconds),
                          "time": dt.datetime.now(dt.timezone.utc).isoformat(), "config": config,
                          "examples": examples}
                if store.append(record, unless_present=not cfg.force):
                    written.append(record)
                    logger.log_task(record, {})
            if task not in todo:
                continue
            timer = Timer()
            delta_path = run_dir / f"delta_{task}.safetensors"
            with timer("compress"), PeakMemory() as memory:
                deltadct.compress(base, source.path, spec.method_name, out=delta_path, device=cfg.device,
                                  policy=spec.policy, progress=cfg.progress, overwrite=True,
                                  **spec.method_config.to_dict())
            info = deltadct.info(delta_path)  # measured from the written file
            with timer("apply"):
                state = deltadct.apply(base, delta_path, device=cfg.device, progress=cfg.progress)
            with timer("load_model"):
                model = adapter.load_with_state_dict(source.path, state, device=cfg.device)
            del state
            examples = {}
            metrics = evaluate(model, spec, ctx, spec.method_config.seed, timer, examples)
            del model
            key_name, score = headline(spec, metrics)
            record = {**common, "key": record_key(method_id, task), "config_hash": method_id, "task": task,
                      "method": spec.method_name, "method_options": spec.method_config.to_dict(),
                      "score": score, "score_key": key_name, "metrics": metrics,
                      "bits_per_param": info["bits_per_param"], "total_bits_per_param": info["total_bits_per_param"],
                      "file_bytes": info["file_bytes"], "num_params": info["num_params"],
                      "num_compressed": info["num_compressed"], "layers": info["layers"],
                      "zoo_scores": source.zoo_scores,
                      "timings": dict(timer.seconds),
                      "memory": {"compress_peak_rss_mb": memory.peak_rss_mb, "max_rss_mb": max_rss_mb(),
                                 "cuda_max_allocated_mb": memory.cuda_max_allocated_mb},
                      "delta_path": str(delta_path) if cfg.keep_deltas else None,
                      "time": dt.datetime.now(dt.timezone.utc).isoformat(), "config": config,
                      "examples": examples}
            if not cfg.keep_deltas:
                delta_path.unlink()
            if store.append(record, unless_present=not cfg.force):
                written.append(record)
                logger.log_task(record, info["layers"])
            print(f"deltadct-run: {cfg.model.name}/{task} {spec.method_name}: {key_name}={score} "
                  f"bits/param={info['bits_per_param']:.4f}", file=sys.stderr)
    finally:
        logger.finish()
    return written


# --------------------------------------------------------------------------- entry point

# An absolute path: relative ones resolve against the module's package when started as the
# `deltadct-run` console script (Hydra then looks for a `conf` package), and conf/ lives next to it.
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import to_absolute_path

    hc = HydraConfig.get()
    try:
        run_job(cfg, run_dir=Path(hc.runtime.output_dir), store_path=Path(to_absolute_path(cfg.store.path)),
                name=hc.job.override_dirname or hc.job.name, overrides=list(hc.overrides.task))
    except DeltaDCTError as err:
        print(f"deltadct-run: error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
