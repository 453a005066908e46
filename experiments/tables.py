"""``deltadct-tables``: paper-style tables and plots, built from the result store alone.

    deltadct-tables --experiment default                 # Markdown to stdout; .md/.csv/.png in results/tables/
    deltadct-tables --experiment sweep_patch_size --family vit --metric reconstruction/rel_error

Rows are methods (plus a variant label naming the options that differ between that method's
records, e.g. ``deltadct (patch_size=8)``); columns are tasks, then their average and the measured
bits/param (mean over tasks, from the written files). The uncompressed fine-tuned model comes first
when it was evaluated. Matched-bits records (``budget.bits``) form one row per method and target
(``bits_target=1``), whatever knob setting each task needed; a row with a task that missed the
target by more than its tolerance is marked †. A config recorded twice (``force=true``) counts once, its latest record.
Plots: average score against every method option that varies (e.g. patch size, share of 2-bit
patches) and against measured bits/param for every row.
"""
from __future__ import annotations

import argparse
import csv
import io
import math
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from deltadct.io import atomic_save_figure, atomic_write_text
from experiments.store import REFERENCE_METHOD, ResultStore

#: how a list-valued option is put on a plot axis: (file/axis label, value -> number)
AXES: dict[str, tuple[str, Callable[[Any], float]]] = {
    "ratios": ("2-bit share", lambda ratios: ratios[0]),
}


@dataclass
class Row:
    method: str
    variant: dict[str, Any]
    #: task -> scores of this row's configs on that task (one per distinct config, e.g. per seed)
    scores: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    bits: list[float] = field(default_factory=list)
    #: a matched-bits record of this row missed its target
    missed: bool = False

    @property
    def label(self) -> str:
        mark = " †" if self.missed else ""
        if not self.variant:
            return self.method + mark
        return f"{self.method} ({', '.join(f'{k}={_fmt_value(v)}' for k, v in self.variant.items())}){mark}"

    def score(self, task: str) -> float | None:
        values = self.scores.get(task)
        return sum(values) / len(values) if values else None

    def average(self, tasks: Sequence[str]) -> float | None:
        values = [self.score(t) for t in tasks]
        return None if not values or None in values else sum(values) / len(values)

    @property
    def bits_per_param(self) -> float | None:
        return sum(self.bits) / len(self.bits) if self.bits else None


@dataclass
class Table:
    title: str
    metric: str
    tasks: list[str]
    rows: list[Row]

    def header(self) -> list[str]:
        return ["method", *self.tasks, "avg", "bits/param"]

    def cells(self) -> list[list[float | str | None]]:
        return [[row.label, *(row.score(t) for t in self.tasks), row.average(self.tasks), row.bits_per_param]
                for row in self.rows]

    def markdown(self, digits: int = 4) -> str:
        def show(v: Any) -> str:
            return v if isinstance(v, str) else ("–" if v is None else f"{v:.{digits}f}")

        lines = [f"**{self.title}** ({self.metric})", "", "| " + " | ".join(self.header()) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(self.header()) - 1)) + "|"]
        lines += ["| " + " | ".join(show(v) for v in cells) + " |" for cells in self.cells()]
        if any(row.missed for row in self.rows):
            lines += ["", "† missed its bits/param target by more than the tolerance (a method of one size, or "
                      "the closest its knob gets)"]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header())
        writer.writerows([["" if v is None else v for v in cells] for cells in self.cells()])
        return out.getvalue()


def _fmt_value(value: Any) -> str:
    if isinstance(value, list):
        return "/".join(_fmt_value(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list) else value


def method_name(record: dict) -> str:
    """The record's method under its current name: records of ``delta_come`` made before the published
    (GPTQ) variant took that name hold the data-free variant, now ``delta_come_rtn`` (its options
    include ``rank_fractions``)."""
    if record["method"] == "delta_come" and "rank_fractions" in record.get("method_options", {}):
        return "delta_come_rtn"
    return record["method"]


def select(records: Iterable[dict], *, experiment: str | None = None, family: str | None = None,
           model: str | None = None, methods: Sequence[str] | None = None) -> list[dict]:
    """The latest record of each distinct (config, task) matching the filters, in store order, each
    under its method's current name (:func:`method_name`)."""
    latest: dict[str, dict] = {}
    for r in records:
        r = {**r, "method": method_name(r)}
        if ((experiment is None or r.get("experiment") == experiment) and (family is None or r.get("family") == family)
                and (model is None or r.get("model") == model)
                and (not methods or r["method"] in methods or r["method"] == REFERENCE_METHOD)):
            latest.pop(r["key"], None)
            latest[r["key"]] = r
    return list(latest.values())


def row_options(record: dict) -> dict[str, Any]:
    """The options that name a record's row: a matched-bits record is named by its target instead of
    the knob setting the search chose for its task (which differs from task to task)."""
    budget = record.get("budget")
    if not budget:
        return record["method_options"]
    chosen = budget.get("knob_options") or {}
    return {**{k: v for k, v in record["method_options"].items() if k not in chosen}, "bits_target": budget["target"]}


def metric_of(record: dict, metric: str) -> float | None:
    value = record.get("score") if metric == "score" else record["metrics"].get(metric)
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def build_table(records: Sequence[dict], *, metric: str = "score", title: str | None = None) -> Table:
    """Group records into rows (method + the options that vary within that method) and task columns."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    rows: list[Row] = []
    methods = sorted(by_method, key=lambda m: (m != REFERENCE_METHOD, m))
    for method in methods:
        group = by_method[method]
        named = [row_options(r) for r in group]
        options = sorted({k for opts in named for k in opts})
        varying = [k for k in options if k != "seed" and (k == "bits_target"
                                                          or len({_freeze(o.get(k)) for o in named}) > 1)]
        by_variant: dict[tuple, Row] = {}
        for r, opts in zip(group, named):
            variant = {k: opts.get(k) for k in varying}
            row = by_variant.setdefault(tuple(_freeze(v) for v in variant.values()), Row(method, variant))
            row.missed |= bool(r.get("budget")) and not r["budget"]["hit"]
            value = metric_of(r, metric)
            if value is not None:
                row.scores[r["task"]].append(value)
            if r.get("bits_per_param") is not None:
                row.bits.append(float(r["bits_per_param"]))
        rows += [by_variant[k] for k in sorted(by_variant, key=_sort_key)]
    if title is None:
        titles = {(r.get("config") or {}).get("table", {}).get("title") for r in records} - {None}
        experiments = sorted({r.get("experiment", "?") for r in records})
        title = titles.pop() if len(titles) == 1 else "Experiments " + ", ".join(experiments)
    return Table(title, metric, tasks, rows)


def _sort_key(values: tuple) -> tuple:
    return tuple((0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v)) for v in values)


def plot(table: Table, out_dir: Path) -> list[Path]:
    """PNG plots: average score vs each varying numeric option of a method, and vs measured bits/param."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []

    def save(fig, name: str) -> None:
        path = out_dir / f"{name}.png"
        fig.tight_layout()
        atomic_save_figure(fig, path, dpi=120)
        plt.close(fig)
        written.append(path)

    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in table.rows:
        avg = row.average(table.tasks)
        for key, value in row.variant.items():
            label, to_x = AXES.get(key, (key, lambda v: v))
            x = to_x(value)
            if avg is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
                series[(label, row.method)].append((float(x), avg))
    for label in sorted({label for label, _ in series}):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (axis, method), points in sorted(series.items()):
            if axis == label and len(points) > 1:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=method)
        ax.set_xlabel(label)
        ax.set_ylabel(f"average {table.metric}")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "score_vs_" + label.replace(" ", "_").replace("-", ""))

    points = [(row.bits_per_param, row.average(table.tasks), row) for row in table.rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(p[2].method for p in points):
            mine = sorted((b, s) for b, s, row in points if row.method == method)
            ax.plot(*zip(*mine), marker="o", linestyle="-" if len(mine) > 1 else "none", label=method)
        reference = [row.average(table.tasks) for row in table.rows if row.method == REFERENCE_METHOD]
        if reference and reference[0] is not None:
            ax.axhline(reference[0], color="gray", linestyle="--", label=REFERENCE_METHOD)
        bits = [b for b, _, _ in points if b > 0]
        if bits and max(bits) / min(bits) > 16:  # e.g. 1-bit methods next to the uncompressed 32-bit delta
            ax.set_xscale("log", base=2)
        ax.set_xlabel("measured bits/param")
        ax.set_ylabel(f"average {table.metric}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        save(fig, "score_vs_bits")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deltadct-tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", default="results/records.jsonl", help="result store (default %(default)s)")
    parser.add_argument("--experiment", help="only records of this experiment tag (e.g. default)")
    parser.add_argument("--family", help="only this model family (e.g. vit)")
    parser.add_argument("--model", help="only this model pair (e.g. zoo_vit)")
    parser.add_argument("--method", action="append", help="only these methods (repeatable)")
    parser.add_argument("--metric", default="score",
                        help="'score' (each task's headline metric) or a metric key, e.g. reconstruction/rel_error")
    parser.add_argument("--out", help="directory for .md/.csv/.png (default results/tables/<experiment or all>)")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)

    store = ResultStore(args.store)
    if not store.path.is_file():
        print(f"deltadct-tables: error: no result store at {store.path}; run deltadct-run first", file=sys.stderr)
        return 1
    records = select(store.records(), experiment=args.experiment, family=args.family, model=args.model,
                     methods=args.method)
    if not records:
        print(f"deltadct-tables: error: no records in {store.path} match the filters", file=sys.stderr)
        return 1
    table = build_table(records, metric=args.metric)
    out = Path(args.out or Path(args.store).parent / "tables" / (args.experiment or "all"))
    out.mkdir(parents=True, exist_ok=True)
    name = "table" if args.metric == "score" else "table_" + args.metric.replace("/", "_")
    atomic_write_text(out / f"{name}.md", table.markdown())
    atomic_write_text(out / f"{name}.csv", table.csv())
    written = [] if args.no_plots else plot(table, out)
    print(table.markdown())
    print(f"wrote {out / (name + '.md')}, {out / (name + '.csv')}"
          + "".join(f", {p.name}" for p in written), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
