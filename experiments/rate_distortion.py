"""Rate–distortion study: every method's weight error AND task score against measured bits/param.

    python -m experiments.rate_distortion                                  # ViT zoo (full) -> results/rate_distortion/
    python -m experiments.rate_distortion --model zoo_minilm --zoo-mode fast --out /tmp/rd \\
        --override eval.glue.max_samples=256

Each (method, setting) point is one ordinary runner job (:func:`experiments.run.run_job`, tagged
``experiment=rate_distortion``) on every task of the model pair, so its records land in
``<out>/records.jsonl`` like any other run, a killed study resumes where it stopped, and
``deltadct-tables --store <out>/records.jsonl --experiment rate_distortion`` tabulates them too.
The x axis is bits/param as measured on the written delta files, not the nominal setting.
Randomised methods (DARE) run with several seeds; a point is the mean over tasks and seeds.
Writes ``<out>/rate_distortion.csv`` and ``<out>/rate_distortion.png`` (``--plot-only`` rebuilds
them from the records alone).
"""
from __future__ import annotations

import argparse
import csv
import io
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Sequence

from deltadct.io import atomic_save_figure, atomic_write_text
from experiments.config import CONF_DIR
from experiments.store import REFERENCE_METHOD, ResultStore
from experiments.tables import method_name

EXPERIMENT = "rate_distortion"
ERROR_KEY = "reconstruction/score"  # global relative Frobenius error of the weight matrices
CSV_NAME, PNG_NAME = "rate_distortion.csv", "rate_distortion.png"


def load_study() -> tuple[dict[str, list[dict[str, Any]]], tuple[str, ...]]:
    """The study's grid (method -> option sets, one point each) and its two end methods, from its preset
    ``conf/experiment/rate_distortion.yaml`` (``study.grid`` / ``study.ends``)."""
    from omegaconf import OmegaConf

    study = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "experiment" / f"{EXPERIMENT}.yaml").study)
    return study["grid"], tuple(study["ends"])


#: method -> settings spanning roughly 0.5-4 bits/param; the exact delta and the base alone at the ends
GRID, ENDS = load_study()


def _override_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_override_value(v) for v in value) + "]"
    return str(value)


def job_overrides(method: str, options: dict[str, Any]) -> list[str]:
    """Runner overrides selecting ``method`` with ``options``."""
    return [f"method={method}", *(f"method.{k}={_override_value(v)}" for k, v in options.items())]


def points(methods: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    return [(method, options) for method in methods for options in GRID.get(method, [{}])]


def run_jobs(experiment: str, jobs: Sequence[Sequence[str]], store: Path, *, model: str, zoo_mode: str,
             extra: Sequence[str] = ()) -> None:
    """Run each job (a list of runner overrides) in this process through the ordinary runner into
    ``store``, tagged ``experiment``; jobs already in the store are skipped by the runner."""
    from hydra import compose, initialize_config_dir

    from experiments.config import register_configs
    from experiments.run import run_job

    register_configs()
    with tempfile.TemporaryDirectory(prefix="deltadct-jobs-") as scratch:
        for i, job in enumerate(jobs, 1):
            print(f"{experiment}: [{i}/{len(jobs)}] {' '.join(job)}", file=sys.stderr, flush=True)
            overrides = [f"model={model}", f"zoo.mode={zoo_mode}", f"experiment={experiment}",
                         f"store.path={store}", "keep_deltas=false", *extra, *job]
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=overrides)
            run_job(cfg, run_dir=Path(scratch) / f"{i:03d}", store_path=store, name="-".join(job),
                    overrides=list(job))


# --------------------------------------------------------------------------- summary

def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _changed(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The options that differ from the method's defaults (seed left out: seeds are averaged)."""
    from deltadct.methods import get_method_class

    defaults = get_method_class(method).Config().to_dict()
    return {k: v for k, v in options.items() if k != "seed" and _plain(v) != _plain(defaults.get(k))}


def _label(method: str, changed: dict[str, Any]) -> str:
    return method + ("" if not changed else
                     " (" + ", ".join(f"{k}={'/'.join(map(str, v)) if isinstance(v, list) else v}"
                                      for k, v in changed.items()) + ")")


#: options that make a setting its own curve rather than a point on its method's curve
SERIES_OPTIONS = ("rescale",)


def _series(method: str, changed: dict[str, Any]) -> str:
    return _label(method, {k: v for k, v in changed.items() if k in SERIES_OPTIONS})


def summarise(records: Sequence[dict]) -> tuple[list[dict[str, Any]], float | None]:
    """One row per setting: mean over tasks of bits/param, weight error and score (seeds averaged),
    plus the uncompressed model's mean score. ``series`` names the curve a setting belongs to."""
    latest: dict[str, dict] = {}
    for r in records:
        if r.get("experiment") == EXPERIMENT:
            latest[r["key"]] = {**r, "method": method_name(r)}
    reference = defaultdict(list)
    groups: dict[tuple[str, str], dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in latest.values():
        if r["method"] == REFERENCE_METHOD:
            reference[r["task"]].append(r["score"])
            continue
        changed = _changed(r["method"], r["method_options"])
        key = (r["method"], _series(r["method"], changed), _label(r["method"], changed))
        groups[key][r["method_options"].get("seed", 0)].append(r)
    rows = []
    for (method, series, label), by_seed in groups.items():
        per_seed = []
        for seed_records in by_seed.values():
            per_seed.append({
                "bits_per_param": statistics.fmean(float(r["bits_per_param"]) for r in seed_records),
                "rel_error": statistics.fmean(float(r["metrics"][ERROR_KEY]) for r in seed_records),
                "score": statistics.fmean(float(r["score"]) for r in seed_records),
                "tasks": len(seed_records),
            })
        row = {"method": method, "series": series, "setting": label, "seeds": len(per_seed),
               "tasks": per_seed[0]["tasks"]}
        for key in ("bits_per_param", "rel_error", "score"):
            values = [p[key] for p in per_seed]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    rows.sort(key=lambda r: (r["method"], r["bits_per_param"]))
    ref = statistics.fmean(statistics.fmean(v) for v in reference.values()) if reference else None
    return rows, ref


def write_csv(rows: Sequence[dict], path: Path) -> None:
    columns = ["method", "series", "setting", "bits_per_param", "rel_error", "score", "bits_per_param_std",
               "rel_error_std", "score_std", "seeds", "tasks"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write_text(path, buf.getvalue())


def plot(rows: Sequence[dict], reference: float | None, path: Path, *, title: str, max_bits: float = 4.5) -> None:
    """Left: relative weight error (log scale); right: mean task score; both against measured bits/param.
    ``none`` (exact delta, 32 bits) is off the axis; ``zero`` is drawn as the base-model line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_score) = plt.subplots(1, 2, figsize=(11, 4.2))
    zero = [r for r in rows if r["method"] == "zero"]
    for series in sorted({r["series"] for r in rows if r["method"] not in ENDS}):
        mine = sorted((r for r in rows if r["series"] == series and r["bits_per_param"] <= max_bits),
                      key=lambda r: r["bits_per_param"])
        if not mine:
            continue
        style = dict(marker="o", linestyle="-" if len(mine) > 1 else "none", label=series)
        if series == "deltadct":  # the paper's method with its own rescale, at several ratio/width settings
            style.update(linewidth=2.2, color="black")
        bits = [r["bits_per_param"] for r in mine]
        ax_err.plot(bits, [r["rel_error"] for r in mine], **style)
        ax_score.errorbar(bits, [r["score"] for r in mine], yerr=[r["score_std"] for r in mine], capsize=2, **style)
    if zero:
        ax_err.axhline(zero[0]["rel_error"], color="gray", linestyle=":", label="zero (base model)")
        ax_score.axhline(zero[0]["score"], color="gray", linestyle=":", label="zero (base model)")
    if reference is not None:
        ax_score.axhline(reference, color="gray", linestyle="--", label="fine-tuned")
    ax_err.set_yscale("log")
    ax_err.set_ylabel("relative weight error ‖W−Ŵ‖/‖W‖")
    ax_score.set_ylabel("mean task score")
    for ax in (ax_err, ax_score):
        ax.set_xlabel("measured bits/param")
        ax.grid(alpha=0.3)
    ax_score.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.rate_distortion",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="zoo_vit", help="model pair from conf/model (default %(default)s)")
    parser.add_argument("--zoo-mode", default="full", choices=("fast", "full"))
    parser.add_argument("--methods", nargs="+", default=[*GRID, *ENDS],
                        help="methods to run (default: all of %(default)s)")
    parser.add_argument("--out", default="results/rate_distortion", help="records, CSV and PNG (default %(default)s)")
    parser.add_argument("--override", action="append", default=[],
                        help="extra runner override, repeatable (e.g. eval.vision.max_samples=200)")
    parser.add_argument("--plot-only", action="store_true", help="only rebuild CSV and PNG from the records")
    args = parser.parse_args(argv)

    from hydra.errors import HydraException

    from deltadct.errors import DeltaDCTError

    out = Path(args.out)
    try:
        if not args.plot_only:
            jobs = [job_overrides(method, options) for method, options in points(args.methods)]
            run_jobs(EXPERIMENT, jobs, out / "records.jsonl", model=args.model, zoo_mode=args.zoo_mode,
                     extra=args.override)
        rows, reference = summarise(ResultStore(out / "records.jsonl").records())
    except (DeltaDCTError, HydraException) as err:  # bad model / method option: one line, no traceback
        print(f"rate_distortion: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    if not rows:
        print(f"rate_distortion: error: no {EXPERIMENT} records in {out / 'records.jsonl'}", file=sys.stderr)
        return 1
    write_csv(rows, out / CSV_NAME)
    plot(rows, reference, out / PNG_NAME, title=f"Rate–distortion on {args.model} ({args.zoo_mode})")
    for row in rows:
        print(f"{row['setting']:55s} bits={row['bits_per_param']:.3f} err={row['rel_error']:.4f} "
              f"score={row['score']:.4f}±{row['score_std']:.4f}")
    print(f"wrote {out / CSV_NAME}, {out / PNG_NAME}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
