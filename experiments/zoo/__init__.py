"""Offline model zoo: real base / fine-tuned checkpoint pairs built on this machine, no downloads.

Each family trains (or, for MiniLM, takes) a base model and fully fine-tunes it on several real
tasks, then saves every checkpoint in its family's normal format so the rest of deltadct loads
them exactly like hub models::

    from experiments.zoo import build_zoo
    entry = build_zoo("vit", mode="fast")          # cached under $DELTADCT_CACHE/zoo/vit-fast-s0
    entry.base_path, entry.tasks["parity"].path     # timm dirs: timm.create_model("local-dir:...")

Command line: ``deltadct-zoo build vit --mode full``, ``deltadct-zoo list``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from deltadct.registry import Registry
from experiments.zoo.common import (
    DEVICES, MODES, BuilderModule, UnknownZooFamilyError, ZooEntry, ZooError, ZooFamily, ZooTask, atomic_build_dir,
    build_lock, is_learned, read_manifest, write_manifest, zoo_dir,
)

__all__ = ["FAMILIES", "MODES", "ZOO_FAMILIES", "ZooEntry", "ZooFamily", "ZooTask", "ZooError", "build_zoo",
           "get_family", "list_families", "list_zoos", "main", "recipe_version", "register_family", "zoo_policy"]

ZOO_FAMILIES: Registry[ZooFamily] = Registry("zoo family", ZooFamily, error=UnknownZooFamilyError,
                                             entry_point_group="deltadct.zoo_families")
#: class decorator: add a :class:`ZooFamily` subclass to the registry under ``cls.name``
register_family = ZOO_FAMILIES.register


#: the families this package defines, each a builder module ``experiments.zoo.<name>`` (plugins add theirs
#: to :func:`list_families`)
FAMILIES = ("vit", "minilm", "t5", "gpt")
for _family in FAMILIES:
    register_family(type(f"{_family.capitalize()}Zoo", (BuilderModule,),
                         {"name": _family, "module": f"experiments.zoo.{_family}", "__module__": __name__}))


def list_families() -> list[str]:
    return ZOO_FAMILIES.names()


def get_family(name: str) -> ZooFamily:
    """The zoo family registered as ``name``, as an instance."""
    return ZOO_FAMILIES.create(name)


# Libraries print chatter we cannot help in an offline build (hub checks, tokenizer advice).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def recipe_version(family: str) -> int:
    """The version of ``family``'s training recipe (1 when unset)."""
    return get_family(family).recipe_version


def build_zoo(
    family: str,
    mode: str = "fast",
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> ZooEntry:
    """The zoo of ``family`` for (mode, seed, device): from the cache when complete, else built now.

    ``mode="fast"`` trains for seconds (tests); ``"full"`` trains for minutes (experiments).
    ``device="cuda"`` trains on the GPU (families that support it); such a zoo is cached apart from
    the CPU-built one, whose checkpoints differ in the last bits.
    """
    builder = get_family(family)
    recipe = builder.recipe_version
    if mode not in MODES:
        raise ZooError(f"unknown zoo mode {mode!r}; choose one of {', '.join(MODES)}")
    if device not in builder.devices:
        raise ZooError(f"the {family} zoo cannot be built on {device!r}: its recipe trains on "
                       f"{', '.join(builder.devices)}")
    if device != "cpu":
        import torch

        if not getattr(torch, device).is_available():
            raise ZooError(f"zoo device {device!r} was asked for but torch sees none on this machine")
    final = zoo_dir(family, mode, seed, cache_dir, device)
    cached = read_manifest(final, recipe)
    if cached is not None:
        return cached
    with build_lock(final):
        cached = read_manifest(final, recipe)  # another process may have built it while we waited
        if cached is not None:
            return cached
        start = time.perf_counter()
        if progress:
            print(f"deltadct-zoo: building the {family} zoo ({mode} mode, seed {seed}, on {device}) into {final}; "
                  "it is cached for later runs", file=sys.stderr, flush=True)
        with atomic_build_dir(final) as out:
            entry = builder.build(out, mode=mode, seed=seed, progress=progress, final=final, device=device)
            for task in entry.tasks.values():
                task.learned = is_learned(task.finetuned_score, task.base_score, task.majority_score)
            write_manifest(entry, {"build_seconds": round(time.perf_counter() - start, 1), "recipe_version": recipe,
                                   "device": device})
    built = read_manifest(final, recipe)
    if built is None:  # a builder bug, not a user error: say which zoo
        raise ZooError(f"zoo {final} was built but its manifest does not validate")
    if progress:
        print(f"deltadct-zoo: built {final.name} in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        for task in built.tasks.values():
            print("  " + _task_line(task), file=sys.stderr)
    return built


def zoo_policy(family: str) -> dict:
    """The tensor policy the runner compresses a zoo family's pairs with: its adapter's defaults
    (``conf/model/zoo_<family>.yaml``), e.g. task heads of another shape than the base's kept whole."""
    from omegaconf import OmegaConf

    from deltadct.adapters import create_adapter

    model = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf" / "model" / f"zoo_{family}.yaml")
    return dict(create_adapter(model.adapter).policy_defaults)


def list_zoos(cache_dir: str | Path | None = None) -> list[ZooEntry]:
    """Every complete zoo in the cache, sorted by directory name."""
    root = zoo_dir("x", "fast", 0, cache_dir).parent
    entries = [read_manifest(p) for p in sorted(root.iterdir())] if root.is_dir() else []
    return [e for e in entries if e is not None]


def _task_line(task: ZooTask) -> str:
    majority = "" if task.majority_score is None else f"  majority {task.majority_score:7.4f}"
    verdict = {True: "", False: "  UNLEARNED", None: ""}[task.learned]
    return (f"{task.name:10s} {task.metric:22s} base {task.base_score:7.4f}  "
            f"fine-tuned {task.finetuned_score:7.4f}{majority}{verdict}")


def _print_entry(entry: ZooEntry) -> None:
    print(f"{entry.root.name}: {entry.root}")  # <family>-<mode>-s<seed>[-<device>]
    print(f"  base: {entry.base_path}")
    for task in entry.tasks.values():
        print(f"  {_task_line(task)}  {task.path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltadct-zoo", description="Build or list the offline model zoo.")
    parser.add_argument("--cache-dir", default=None, help="cache root (default $DELTADCT_CACHE or ~/.cache/deltadct)")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build (or load from cache) the zoo of one family, or all")
    build.add_argument("family", choices=(*list_families(), "all"))
    build.add_argument("--mode", choices=MODES, default="fast")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--device", choices=DEVICES, default="cpu",
                       help="train on this device (cuda: the minilm family; cached apart from CPU builds)")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("list", help="list the zoos in the cache with their scores")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            for family in list_families() if args.family == "all" else (args.family,):
                _print_entry(build_zoo(family, args.mode, args.cache_dir, args.seed, not args.quiet, args.device))
        else:
            entries = list_zoos(args.cache_dir)
            if not entries:
                print("no zoo built yet; run: deltadct-zoo build <family> [--mode full]")
            for entry in entries:
                _print_entry(entry)
    except ZooError as err:
        print(f"deltadct-zoo: error: {err}", file=sys.stderr)
        return 1
    return 0
