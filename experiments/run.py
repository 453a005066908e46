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
import fcntl
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

import deltadct
from deltadct.checkpoints import open_checkpoint
from deltadct.calibration import IdentityHessians, collect_hessians
from deltadct.errors import CheckpointError, ConfigError, DeltaDCTError
from deltadct.methods import create_method, get_method_class
from deltadct.profiling import PeakMemory, peak_rss_bytes
from experiments.budget import finish_record, match_budget
from experiments.calibration import calibration_batches, distillation_student, uses_calibration
from experiments.config import CONF_DIR, VOLATILE_KEYS, RunSpec, register_configs, validate
from experiments.loggers import make_logger
from experiments.records import ABSENT, Record
from experiments.store import REFERENCE_METHOD, ResultStore, config_hash

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
    # huggingface_hub raises a validation, HTTP or cache error type per case; all mean "not here"
    except Exception:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {ref!r} is neither a local path nor a model in the local "
                              "Hugging Face cache (download it first, or point the config at a local copy)") from None


def load_pair(cfg: DictConfig) -> tuple[Path, dict[str, TaskSource]]:
    """The base checkpoint and the fine-tuned task checkpoints of ``cfg.model``."""
    model = cfg.model
    if model.zoo is not None:
        from experiments.zoo import build_zoo

        entry = build_zoo(model.zoo, cfg.zoo.mode, cfg.zoo.cache_dir, cfg.zoo.seed, progress=cfg.zoo.progress,
                          device=cfg.zoo.device)
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


class SweepCache:
    """What consecutive jobs over one model pair share, loaded once per process.

    Hydra's basic launcher runs every job of a multirun in one process, one after another, so a
    10-config sweep over a 7B pair would otherwise resolve the pair, open both checkpoints and load
    each task's reference model ten times. Entries belong to one pair (``pair_key``); a job on
    another pair drops them first, so at most one pair is held.
    """

    def __init__(self) -> None:
        self._pair_key: str | None = None
        self._items: dict[Any, Any] = {}

    def get(self, pair_key: str, item: Any, load: Any) -> Any:
        """``load()`` the first time ``item`` is asked for under ``pair_key``; the same object afterwards."""
        if pair_key != self._pair_key:
            self._items.clear()
            self._pair_key = pair_key
        if item not in self._items:
            self._items[item] = load()
        return self._items[item]


SHARED = SweepCache()
#: matched bits: the (knob value, bits) each method config last chose in this process, across pairs, so
#: the first task of a sweep's next job (another zoo seed, another pair) starts its search there too
LAST_KNOB: dict[str, tuple[float, float]] = {}


# --------------------------------------------------------------------------- measurements

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


def _mib(num_bytes: int | None) -> float | None:
    return None if num_bytes is None else round(num_bytes / 2**20, 1)


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
                     "cpus": os.cpu_count(),
                     "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}}


# --------------------------------------------------------------------------- evaluation

def evaluate(model: torch.nn.Module, spec: RunSpec, ctx: Any, seed: int, timer: Timer,
             examples: dict[str, dict] | None = None) -> dict[str, float]:
    """Every evaluator's metrics, flat as ``<evaluator>/<metric>``; the per-example outputs of those
    that keep them go into ``examples`` (evaluator name -> compact outputs) when given."""
    from eval import create_evaluator

    metrics = {}
    for name, options in spec.evaluators.items():
        torch.manual_seed(seed)
        evaluator = create_evaluator(name, **options)
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
    if out["zoo"].get("device") == "cpu":
        out["zoo"].pop("device")  # CPU-built zoos predate the option: their runs keep their keys
    out["eval"] = {k: v for k, v in out["eval"].items() if k in out["model"]["evaluators"]}  # only those that run
    if out.get("budget", {}).get("bits") is None:
        out.pop("budget", None)  # runs without a target keep the keys they had before matched bits existed
    if not uses_calibration(get_method_class(out["method"]["name"])):
        out.pop("calibration", None)  # read only by calibrated methods: other runs keep their keys
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
    reference_id = config_hash({k: v for k, v in ident.items() if k not in ("method", "calibration", "budget")})
    store = ResultStore(store_path)
    store.check_writable()  # before any computation: a result that cannot be stored is lost

    pair_key = json.dumps([config["model"], config["zoo"], config["tasks"], config["device"]], sort_keys=True,
                          default=str)
    base, tasks = SHARED.get(pair_key, "pair", lambda: load_pair(cfg))
    done = set() if cfg.force else store.keys()
    todo = [t for t in tasks if record_key(method_id, t) not in done]
    ref_todo = [t for t in tasks if cfg.reference and record_key(reference_id, t, reference=True) not in done]
    if not todo and not ref_todo:
        print(f"deltadct-run: all {len(tasks)} task(s) of this config are in {store_path}; skipped "
              "(force=true re-runs)", file=sys.stderr)
        return []

    from deltadct.adapters import create_adapter
    from eval import EvalContext

    # matched bits: every task's knob is searched before anything is recorded, so an unreachable
    # target leaves the store as it was
    configs = {task: (spec.method_config, None) for task in todo}
    if cfg.budget.bits is not None:
        # models of one family mostly share their shapes: each search starts where the last one ended
        search_key = json.dumps([spec.method_name, spec.method_config.to_dict(), config["budget"]], sort_keys=True,
                                default=str)
        for task in todo:
            configs[task] = match_task_budget(cfg, spec, pair_key, base, tasks[task].path, LAST_KNOB.get(search_key))
            searched = configs[task][1]
            if searched["knob"] is not None:
                LAST_KNOB[search_key] = (searched["knob_value"], searched["knob_bits"])

    adapter = create_adapter(cfg.model.adapter)
    calibrated = uses_calibration(get_method_class(spec.method_name))
    logger = make_logger(config["logger"])
    run_dir.mkdir(parents=True, exist_ok=True)
    cleanup = contextlib.ExitStack()
    logger.start(config, run_dir=run_dir, group=group or cfg.logger.group or cfg.experiment, name=name)
    common = {"experiment": cfg.experiment, "model": cfg.model.name, "family": cfg.model.family,
              "run_dir": str(run_dir), "overrides": list(overrides or []), **provenance()}
    written = []
    try:
        deltas_dir = cleanup.enter_context(job_deltas_dir(run_dir, keep=cfg.keep_deltas))
        for task in dict.fromkeys(todo + ref_todo):
            source = tasks[task]
            timer = Timer()
            with timer("load_reference"):  # ~0 for every job of a sweep after the first
                reference, processor = SHARED.get(pair_key, ("reference", cfg.model.adapter, task), lambda: (
                    adapter.load(source.path, device=cfg.device), adapter.load_processor(source.path)))
                ctx = EvalContext(task=task, data=source.data, processor=processor,
                                  adapter=adapter, reference=reference, device=cfg.device)
            # calibration first: bad calibration data fails before any record of the task is written
            batches, hessians, distilled, calibration_time = None, None, None, Timer()
            if task in todo and calibrated:
                with calibration_time("calibrate"):
                    batches = calibration_batches(cfg.calibration, adapter, reference, ctx.processor, task,
                                                  source.data, cfg.model.zoo)
                    if get_method_class(spec.method_name).needs_calibration:
                        hessians = collect_hessians(reference, batches, forward=adapter.logits)
            if task in ref_todo:
                examples: dict[str, dict] = {}
                metrics = evaluate(reference, spec, ctx, spec.method_config.seed, timer, examples)
                key_name, score = headline(spec, metrics)
                record = Record(**common, key=record_key(reference_id, task, reference=True),
                                config_hash=reference_id, task=task, method=REFERENCE_METHOD, method_options={},
                                score=score, score_key=key_name, metrics=metrics, bits_per_param=None,
                                zoo_scores=source.zoo_scores, timings=dict(timer.seconds),
                                examples=examples, time=dt.datetime.now(dt.timezone.utc).isoformat(),
                                config=config).to_dict()
                if store.append(record, unless_present=not cfg.force):
                    written.append(record)
                    logger.log_task(record, {})
            if task not in todo:
                continue
            timer = Timer()
            method_config, budget = configs[task]
            delta_path = deltas_dir / f"delta_{task}.safetensors"
            base_reader = SHARED.get(pair_key, ("checkpoint", str(base)), lambda: open_checkpoint(base))
            ft_reader = SHARED.get(pair_key, ("checkpoint", str(source.path)), lambda: open_checkpoint(source.path))
            timer.seconds.update(calibration_time.seconds)
            with timer("compress"), PeakMemory(cfg.device) as memory:
                deltadct.compress(base_reader, ft_reader, method_config, out=delta_path, device=cfg.device,
                                  policy=spec.policy, progress=cfg.progress, overwrite=True, calibration=hessians)
            method = create_method(method_config)
            if hasattr(method, "distill"):
                with timer("distill"):
                    student = distillation_student(adapter, source.path, base, delta_path, cfg.device)
                    tuned, distilled = method.distill(delta_path, student, reference, batches)
                    tuned.save(delta_path, overwrite=True)
                    del student, tuned
            info = deltadct.info(delta_path)  # measured from the written file
            with timer("apply"):
                state = deltadct.apply(base_reader, delta_path, device=cfg.device, progress=cfg.progress)
            with timer("load_model"):
                model = adapter.load_with_state_dict(source.path, state, device=cfg.device)
            del state
            examples = {}
            metrics = evaluate(model, spec, ctx, spec.method_config.seed, timer, examples)
            del model
            key_name, score = headline(spec, metrics)
            record = Record(**common, key=record_key(method_id, task), config_hash=method_id, task=task,
                            method=spec.method_name, method_options=method_config.to_dict(),
                            score=score, score_key=key_name, metrics=metrics,
                            bits_per_param=info["bits_per_param"], total_bits_per_param=info["total_bits_per_param"],
                            file_bytes=info["file_bytes"], num_params=info["num_params"],
                            num_compressed=info["num_compressed"], layers=info["layers"],
                            zoo_scores=source.zoo_scores, timings=dict(timer.seconds),
                            budget=ABSENT if budget is None else finish_record(budget, info["bits_per_param"]),
                            memory={"compress_peak_rss_mb": _mib(memory.peak_rss_bytes),
                                    "compress_peak_anon_mb": _mib(memory.peak_anon_bytes),
                                    "max_rss_mb": _mib(peak_rss_bytes()),
                                    "cuda_max_allocated_mb": _mib(memory.cuda_peak_bytes)},
                            delta_path=str(delta_path) if cfg.keep_deltas else None,
                            distillation=ABSENT if distilled is None else vars(distilled),
                            examples=examples, time=dt.datetime.now(dt.timezone.utc).isoformat(),
                            config=config).to_dict()
            if not cfg.keep_deltas:
                delta_path.unlink()  # now, not at the end: a job of many tasks keeps one delta on disk
            if store.append(record, unless_present=not cfg.force):
                written.append(record)
                logger.log_task(record, info["layers"])
            print(f"deltadct-run: {cfg.model.name}/{task} {spec.method_name}: {key_name}={score} "
                  f"bits/param={info['bits_per_param']:.4f}", file=sys.stderr)
    finally:
        logger.finish()
        cleanup.close()
    return written


@contextlib.contextmanager
def job_deltas_dir(run_dir: Path, *, keep: bool) -> Iterator[Path]:
    """The folder this job writes its delta files to.

    Hydra names a run's folder by the second the run started, so runs launched together share one, and a
    delta one of them writes there can be read or deleted by another. Kept deltas go to the run folder
    under an exclusive lock (a second run keeping its deltas there is an error); temporary ones to a folder
    of this job alone, removed at the end.
    """
    if not keep:
        scratch = Path(tempfile.mkdtemp(prefix=".deltas-", dir=run_dir))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    lock = os.open(run_dir / ".deltadct-run.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"{run_dir} is in use by another run that keeps its deltas there (Hydra names a run's folder by "
                "the second it started, so runs started together share one): give each run its own "
                "hydra.run.dir=..., or set keep_deltas=false") from None
        yield run_dir
    finally:
        os.close(lock)


def match_task_budget(cfg: DictConfig, spec: RunSpec, pair_key: str, base: Path, finetuned: Path,
                      hint: tuple[float, float] | None = None) -> tuple[Any, dict[str, Any]]:
    """The method config whose file for this task measures ``budget.bits`` (experiments/budget.py),
    trying ``hint`` (knob value, bits) first."""
    base_reader = SHARED.get(pair_key, ("checkpoint", str(base)), lambda: open_checkpoint(base))
    ft_reader = SHARED.get(pair_key, ("checkpoint", str(finetuned)), lambda: open_checkpoint(finetuned))

    # a calibrated method's file layout depends on its options and the shapes, never on the Hessian's
    # values (tests/test_calibration.py checks it), so the search measures with identity Hessians and needs
    # no calibration pass per trial
    hessians = IdentityHessians(ft_reader) if get_method_class(spec.method_name).needs_calibration else None

    def measure(options: dict[str, Any]) -> float:
        return deltadct.compress(base_reader, ft_reader, spec.method_name, out=None, device=cfg.device,
                                 policy=spec.policy, progress=False, calibration=hessians,
                                 **options).info()["bits_per_param"]

    config, record = match_budget(spec.method_name, spec.method_config, cfg.budget, measure, hint)
    if record["knob"] is not None:
        print(f"deltadct-run: {finetuned.name}: {spec.method_name} at {record['knob']}={record['knob_value']:.6g} "
              f"for budget.bits={record['target']:g} ({record['trials']} trials)", file=sys.stderr)
    return config, record


# --------------------------------------------------------------------------- entry point

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
    except Exception as err:  # noqa: BLE001 - a bug, not bad input: the traceback stays (re-raised)
        # a multirun reports a failed job only once every job has run, and a sweep killed before then
        # shows nothing: say which job failed now
        print(f"deltadct-run: job {hc.job.get('num', 0)} ({hc.job.override_dirname or 'no overrides'}) failed: "
              f"{type(err).__name__}: {err}", file=sys.stderr, flush=True)
        raise


if __name__ == "__main__":
    main()
