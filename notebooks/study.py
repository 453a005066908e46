"""What the notebooks share: where results and figures live, and getting an experiment's records.

A notebook asks :func:`records` for one experiment tag. It reads every ``records.jsonl`` under
``$DELTADCT_RESULTS`` (default ``results/``, the committed study stores); when none of them has
rows of that experiment for the model pair, it runs the sweep itself on the offline zoo
(``$DELTADCT_NB_ZOO_MODE``, default ``fast``: seconds per run, one task, small eval subsets) into
``<figures dir>/notebook_records.jsonl`` and reads those. Figures go to ``$DELTADCT_NB_OUT``
(default ``results/figures/``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # notebooks run from notebooks/; the project modules live one level up
    sys.path.insert(0, str(REPO))

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from deltadct.io import atomic_save_figure  # noqa: E402
from experiments.rate_distortion import run_jobs  # noqa: E402
from experiments.store import ResultStore  # noqa: E402
from experiments.tables import Table, build_table, select  # noqa: E402

RESULTS = Path(os.environ.get("DELTADCT_RESULTS", REPO / "results"))
OUT = Path(os.environ.get("DELTADCT_NB_OUT", REPO / "results" / "figures"))
MODEL = os.environ.get("DELTADCT_NB_MODEL", "zoo_vit")
ZOO_MODE = os.environ.get("DELTADCT_NB_ZOO_MODE", "fast")
#: a quick run when the notebook has to compute its own rows (zoo_vit): one task, 64 images, weight errors only
QUICK = ["tasks=[parity]", "eval.vision.max_samples=64", "eval.vision.progress=false",
         "eval.reconstruction.num_inputs=0"]


def stored_records(results: Path = RESULTS) -> list[dict]:
    """Every record of every store under ``results`` (a directory) or in it (a .jsonl file)."""
    files = [results] if results.suffix == ".jsonl" else sorted(results.rglob("records.jsonl"))
    return [r for f in files if f.is_file() for r in ResultStore(f).records()]


def records(experiment: str, jobs: Sequence[Sequence[str]], *, model: str = MODEL) -> tuple[list[dict], str]:
    """The latest records of ``experiment`` on ``model`` and where they came from."""
    found = select(stored_records(), experiment=experiment, model=model)
    if found:
        return found, f"result store {RESULTS}"
    store = OUT / "notebook_records.jsonl"
    OUT.mkdir(parents=True, exist_ok=True)
    print(f"no {experiment} records for {model} under {RESULTS}: running {len(jobs)} job(s) on the {ZOO_MODE} zoo")
    run_jobs(experiment, jobs, store, model=model, zoo_mode=ZOO_MODE, extra=QUICK)
    return select(ResultStore(store).records(), experiment=experiment, model=model), f"{ZOO_MODE} zoo run ({store})"


def tables(found: list[dict], title: str) -> tuple[Table, Table]:
    """The task-score table and the weight-error table (reconstruction evaluator) of the same rows."""
    return (build_table(found, metric="score", title=title),
            build_table(found, metric="reconstruction/score", title=title + " — relative weight error"))


def savefig(fig, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.tight_layout()
    atomic_save_figure(fig, path, dpi=120)
    print(f"saved {path}")
    return path


def series(table: Table, option: str, method: str = "deltadct", to_x=lambda v: v) -> list[tuple[float, object]]:
    """``(x, row)`` for the rows of ``method``, x = ``to_x`` of the row's ``option`` value, sorted by x."""
    rows = [r for r in table.rows if r.method == method and option in r.variant]
    return sorted(((to_x(r.variant[option]), r) for r in rows), key=lambda pair: pair[0])


def reference_score(table: Table) -> float | None:
    """Mean score of the uncompressed fine-tuned model, when it was evaluated."""
    rows = [r for r in table.rows if r.method == "finetuned"]
    return rows[0].average(table.tasks) if rows else None
