"""What every zoo family shares: the manifest types, the cache layout, atomic builds, seeding, training.

A zoo is a directory ``<cache>/zoo/<family>-<mode>-s<seed>`` holding one base checkpoint, one
fine-tuned checkpoint per task, the evaluation data of each task and ``zoo.json``, the manifest.
It is built in a sibling temp dir and renamed into place only once complete, so a killed build
never leaves a directory that looks like a finished zoo.
"""
from __future__ import annotations

import abc
import fcntl
import importlib
import json
import os
import random
import shutil
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from deltadct.errors import DeltaDCTError, UnknownNameError

MODES = ("fast", "full")
#: devices a zoo can be built on; a zoo built on another device holds other checkpoints (another order of
#: floating-point sums), so its cache dir and its runs' identity say which device built it
DEVICES = ("cpu", "cuda")
MANIFEST = "zoo.json"
MANIFEST_VERSION = 1
# Keys of ZooTask.data that hold paths; the manifest stores them relative to the zoo dir.
DATA_PATH_KEYS = ("root", "data_dir", "include_path", "data_file")


class ZooError(DeltaDCTError):
    """The zoo cannot be built: unknown family or mode, or the real data it needs is missing."""


class UnknownZooFamilyError(ZooError, UnknownNameError):
    """A zoo family name that is not in the registry."""


class ZooDataError(ZooError, FileNotFoundError):
    """Real training/evaluation data the zoo needs is not available offline."""


@dataclass
class ZooTask:
    """One fine-tuned checkpoint of a zoo and how to evaluate it."""

    name: str
    path: Path
    metric: str
    finetuned_score: float
    base_score: float
    data: dict = field(default_factory=dict)
    #: the metric of always predicting the evaluation set's most frequent label (None: not measured)
    majority_score: float | None = None
    #: whether the fine-tune clearly beats its base and the majority class (:func:`is_learned`);
    #: tables leave unlearned tasks out of averages. None: not judged (a manifest of an older build)
    learned: bool | None = None


#: how much a fine-tune must beat both its base and the majority class by, on the task metric's scale,
#: to count as learned (3 points: about twice the standard error of an accuracy on 500 examples)
LEARNED_MARGIN = 0.03


def is_learned(finetuned: float, base: float, majority: float | None) -> bool:
    """Whether ``finetuned`` beats ``base`` and (when known) ``majority`` by :data:`LEARNED_MARGIN`."""
    bar = max(base, majority) if majority is not None else base
    return bool(finetuned > bar + LEARNED_MARGIN)


@dataclass
class ZooEntry:
    """A built zoo: its base checkpoint and the fine-tuned checkpoints of each task."""

    family: str
    mode: str
    seed: int
    base_path: Path
    tasks: dict[str, ZooTask]
    root: Path


class ZooFamily(abc.ABC):
    """One family of the zoo, registered by ``name``: how its base and fine-tuned checkpoints are built."""

    name: ClassVar[str]

    @property
    def recipe_version(self) -> int:
        """The version of the training recipe; cached zoos of another version are rebuilt."""
        return 1

    @property
    def devices(self) -> tuple[str, ...]:
        """The devices this family's recipe can train on."""
        return ("cpu",)

    @abc.abstractmethod
    def build(self, out: Path, *, mode: str, seed: int, progress: bool, final: Path,
              device: str = "cpu") -> ZooEntry:
        """Train and save every checkpoint into ``out`` (renamed to ``final`` once complete) on ``device``
        (one of :attr:`devices`)."""


class BuilderModule(ZooFamily):
    """A family whose recipe is a module (``module``) with ``build(out, *, mode, seed, progress, final)``
    and optionally ``RECIPE_VERSION`` and ``DEVICES`` (a recipe that trains on more than the CPU takes a
    ``device`` keyword), imported only when the family is built (it needs heavy libraries)."""

    module: ClassVar[str]

    def _module(self):
        return importlib.import_module(self.module)

    @property
    def recipe_version(self) -> int:
        return getattr(self._module(), "RECIPE_VERSION", 1)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(getattr(self._module(), "DEVICES", ("cpu",)))

    def build(self, out: Path, *, mode: str, seed: int, progress: bool, final: Path,
              device: str = "cpu") -> ZooEntry:
        on_device = {} if device == "cpu" else {"device": device}  # CPU-only recipes take no device argument
        return self._module().build(out, mode=mode, seed=seed, progress=progress, final=final, **on_device)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache dir: the argument, else ``$DELTADCT_CACHE``, else ``~/.cache/deltadct``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("DELTADCT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "deltadct"


def zoo_dir(family: str, mode: str, seed: int, cache_dir: str | Path | None = None, device: str = "cpu") -> Path:
    """``<cache>/zoo/<family>-<mode>-s<seed>``, with ``-<device>`` appended for a zoo not built on the CPU."""
    suffix = "" if device == "cpu" else f"-{device}"
    return cache_root(cache_dir) / "zoo" / f"{family}-{mode}-s{seed}{suffix}"


# ---------------------------------------------------------------- manifest

def _data_to_json(data: dict, root: Path) -> dict:
    out = dict(data)
    for key in DATA_PATH_KEYS:
        if key in out:
            out[key] = os.path.relpath(out[key], root)
    return out


def _data_from_json(data: dict, root: Path) -> dict:
    out = dict(data)
    for key in DATA_PATH_KEYS:
        if key in out:
            out[key] = root / out[key]
    return out


def write_manifest(entry: ZooEntry, extra: dict) -> None:
    """Write ``zoo.json`` into ``entry.root``, every path relative to it."""
    rel = lambda p: os.path.relpath(p, entry.root)  # noqa: E731
    manifest = {
        "version": MANIFEST_VERSION,
        "family": entry.family,
        "mode": entry.mode,
        "seed": entry.seed,
        "base_path": rel(entry.base_path),
        "tasks": {
            name: {
                "path": rel(t.path),
                "metric": t.metric,
                "finetuned_score": t.finetuned_score,
                "base_score": t.base_score,
                "majority_score": t.majority_score,
                "learned": t.learned,
                "data": _data_to_json(t.data, entry.root),
            }
            for name, t in entry.tasks.items()
        },
        **extra,
    }
    (entry.root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def _checkpoint_complete(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def read_manifest(root: Path, recipe_version: int | None = None) -> ZooEntry | None:
    """The zoo at ``root`` if its manifest and every file it names are present, else None.

    ``recipe_version``: the builder's current ``RECIPE_VERSION``; a zoo built by another recipe
    (older schedule or learning rate) is stale, hence None (manifests before versioning count as 1).
    """
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        if manifest.get("version") != MANIFEST_VERSION:
            return None
        if recipe_version is not None and manifest.get("recipe_version", 1) != recipe_version:
            return None
        tasks = {
            name: ZooTask(
                name=name,
                path=root / t["path"],
                metric=t["metric"],
                finetuned_score=float(t["finetuned_score"]),
                base_score=float(t["base_score"]),
                data=_data_from_json(t["data"], root),
                majority_score=None if t.get("majority_score") is None else float(t["majority_score"]),
                learned=t.get("learned"),
            )
            for name, t in manifest["tasks"].items()
        }
        entry = ZooEntry(manifest["family"], manifest["mode"], int(manifest["seed"]),
                         root / manifest["base_path"], tasks, root)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    paths = [entry.base_path] + [t.path for t in tasks.values()]
    if not all(_checkpoint_complete(p) for p in paths):
        return None
    for t in tasks.values():
        if not all(Path(t.data[k]).exists() for k in DATA_PATH_KEYS if k in t.data):
            return None
    return entry


@contextmanager
def build_lock(final: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``final``'s lock file, so concurrent builders of one zoo (parallel
    tests, several users of one cache) build it once: the others wait, then find it cached."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def atomic_build_dir(final: Path) -> Iterator[Path]:
    """A fresh temp dir next to ``final``, renamed to ``final`` when the block completes.

    An incomplete old ``final`` (no valid manifest) is replaced; on error the temp dir is removed.
    Call it under :func:`build_lock`.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    for orphan in final.parent.glob(f".{final.name}.building-*"):  # left by a killed build; we hold the lock
        shutil.rmtree(orphan, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a zoo is as readable as any cache entry
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- determinism

def build_threads() -> int:
    """Torch threads a build uses: ``$DELTADCT_ZOO_THREADS``, default 1.

    One thread makes CPU reductions run in one fixed order, so a rebuild gives bit-identical
    weights whatever the core count; it is also the fastest setting on a busy machine, where
    multi-threaded kernels spin-wait on each other (measured here: 0.8 s vs 6.8 s per T5 step).
    """
    return int(os.environ.get("DELTADCT_ZOO_THREADS", "1"))


@contextmanager
def deterministic(seed: int, device: str = "cpu") -> Iterator[None]:
    """Seed every RNG a build touches, pick deterministic kernels and a fixed thread count;
    torch's global settings are restored afterwards.

    On CUDA, cuBLAS is deterministic only with a fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, set
    here unless the user set it, before the build's first matrix product), and attention runs on
    PyTorch's math kernel (the fused memory-efficient kernel that PyTorch picks on a GPU has a
    backward pass it declares non-deterministic). Any op with no deterministic kernel fails the build.
    A CUDA zoo is thus reproducible on one GPU model and library version, but not bit-identical to the
    CPU one (hence its own cache dir).
    """
    previous = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    attention = nullcontext()
    if device != "cpu":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        attention = sdpa_kernel(SDPBackend.MATH)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(build_threads())
    try:
        with attention:
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0])
        torch.set_num_threads(previous[1])


# ---------------------------------------------------------------- training

def train_loop(
    model: torch.nn.Module,
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    lr: float,
    desc: str,
    progress: bool = True,
    weight_decay: float = 0.01,
    warmup_frac: float = 0.06,
) -> float:
    """AdamW with linear warmup/decay for ``steps`` steps; ``loss_fn(step)`` returns the batch loss.

    Returns the mean loss of the last 10% of steps (shown in the progress bar too).
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warmup = max(1, int(steps * warmup_frac))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))
    tail: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        value = float(loss.detach())
        if step >= steps - max(1, steps // 10):
            tail.append(value)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    model.eval()
    if progress:
        print(f"{desc}: {steps} steps in {bar.format_dict['elapsed']:.0f} s, final loss "
              f"{np.mean(tail) if tail else float('nan'):.3f}", file=sys.stderr, flush=True)
    return float(np.mean(tail)) if tail else float("nan")


def save_base(model: torch.nn.Module, tokenizer, base_dir: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """Save a pre-trained base with its tokenizer; return the tokenizer as users load it from there (what
    every fine-tune then uses) and a copy of the base weights."""
    from transformers import AutoTokenizer

    model.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    return AutoTokenizer.from_pretrained(base_dir), {k: v.clone() for k, v in model.state_dict().items()}


def finetune_each_task(
    out: Path,
    steps: Mapping[str, int],
    *,
    family: str,
    load_base: Callable[[], torch.nn.Module],
    loss_for: Callable[[torch.nn.Module, str, list, int], Callable[[int], torch.Tensor]],
    predict: Callable[[torch.nn.Module, str, list], list[int]],
    data_spec: Callable[[str, list], dict],
    tokenizer,
    base_state: dict[str, torch.Tensor],
    lr: float,
    max_eval: int | None,
    seed: int,
    progress: bool,
) -> dict[str, ZooTask]:
    """Fine-tune a fresh copy of the base on each GLUE task of ``steps`` (task -> steps) and score it.

    For task ``i`` the callbacks give: ``loss_for(model, task, train, i)`` the batch loss of a step,
    ``predict(model, task, val)`` label ids, ``data_spec(task, val)`` the task's data spec (writing its
    evaluation data). Each checkpoint is saved with the tokenizer under ``out/tasks/<task>`` and scored
    fine-tuned and as the ``zero`` method would rebuild it from the base (``base_state``).
    """
    from experiments.zoo.glue import GLUE_TASKS, load_glue, score, subsample

    tasks = {}
    for t_i, (name, n_steps) in enumerate(steps.items()):
        task = GLUE_TASKS[name]
        train = load_glue(name, "train")
        val = subsample(load_glue(name, "validation"), max_eval, seed)
        model = load_base()
        train_loop(model, loss_for(model, name, train, t_i), n_steps, lr, f"{family}: fine-tune {name}", progress)
        path = out / "tasks" / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)

        labels = [ex["label"] for ex in val]
        finetuned = score(task.metric, labels, predict(model, name, val))
        model.load_state_dict(base_like_state(model.state_dict(), base_state))
        base = score(task.metric, labels, predict(model, name, val))
        tasks[name] = ZooTask(name=name, path=path, metric=task.metric, finetuned_score=finetuned, base_score=base,
                              data=data_spec(name, val))
    return tasks


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of batch ``step`` of epoch-wise shuffled passes over ``n`` items (deterministic)."""
    per_epoch = max(1, n // batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = np.random.default_rng((seed, epoch)).permutation(n)
    return perm[i * batch_size:(i + 1) * batch_size]


def base_like_state(finetuned: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict the framework's ``zero`` method reconstructs from ``base`` for ``finetuned``.

    Every fine-tuned tensor that the base has with the same shape takes the base value; new or
    reshaped tensors (task heads) keep the fine-tuned value. Base keys may lack a leading module
    prefix (``bert.encoder...`` in the fine-tuned model is ``encoder...`` in a bare encoder).
    """
    out = {}
    for key, value in finetuned.items():
        match = base.get(key)
        if match is None and "." in key:
            match = base.get(key.split(".", 1)[1])
        out[key] = match.clone() if match is not None and match.shape == value.shape else value.clone()
    return out
