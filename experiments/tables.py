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
patches) and against measured bits/param for every row, with 95 % error bars.

Uncertainty (``eval.stats``): a row's records of one task are its seeds (one per zoo seed, i.e. one
per fine-tuned delta). A cell shows the mean over seeds ± the 95 % interval that combines the
Student-t interval over seeds with a bootstrap over the evaluation examples (from the per-example
outputs stored in the records); the average column does the same for the per-seed average over
tasks. Each row is tested against a reference row (``--reference``, default ``bitdelta``) by a paired
bootstrap over the same seeds and examples (``--test mcnemar``: McNemar's exact test on the
discordant examples, pooled over seeds and, for the average, over tasks; accuracy cells only):
``*`` marks p < 0.05, ``**`` p < 0.01, and the ``p vs …`` column gives the average's p-value. A task
a record marks unlearned (its fine-tune did not clearly beat the base and the majority class) is
shown but left out of the average, with a note; asking to average it (``--average``) is refused.
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

import numpy as np

from deltadct.errors import DeltaDCTError
from deltadct.io import atomic_save_figure, atomic_write_text
from eval import stats
from eval.examples import score_inputs
from experiments.store import REFERENCE_METHOD, ResultStore

#: the row every other row is tested against when ``--reference`` is not given (if the table has it)
DEFAULT_REFERENCE = "bitdelta"
#: the paired tests a table can show against its reference row
PAIRED_TESTS = ("bootstrap", "mcnemar")


class TableError(DeltaDCTError):
    """A table that cannot be built as asked (e.g. averaging a task its records mark unlearned)."""

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
    #: task -> the records behind ``scores`` (for intervals and paired tests)
    records: dict[str, list[dict]] = field(default_factory=lambda: defaultdict(list))

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
    #: the tasks the avg column averages (default: every task no record marks unlearned)
    averaged: list[str] = field(default_factory=list)
    #: task -> why it is left out of the average (its records mark it unlearned)
    unlearned: dict[str, str] = field(default_factory=dict)
    #: label of the row the others are tested against (None: no test)
    reference: str | None = None
    #: the paired test against the reference: one of PAIRED_TESTS
    test: str = "bootstrap"
    statistics: "TableStatistics | None" = None

    def header(self) -> list[str]:
        return ["method", *self.tasks, "avg", "bits/param"]

    def cells(self) -> list[list[float | str | None]]:
        return [[row.label, *(row.score(t) for t in self.tasks), row.average(self.averaged), row.bits_per_param]
                for row in self.rows]

    def stats(self) -> "TableStatistics":
        if self.statistics is None:
            self.statistics = TableStatistics.of(self)
        return self.statistics

    def markdown(self, digits: int = 4) -> str:
        st = self.stats()

        def show(v: Any) -> str:
            return v if isinstance(v, str) else ("–" if v is None else f"{v:.{digits}f}")

        def cell(row: Row, column: str, value: Any) -> str:
            if value is None or isinstance(value, str):
                return show(value)
            interval, test = st.intervals.get((row.label, column)), st.tests.get((row.label, column))
            text = show(value)
            if interval is not None and interval.half_width > 0:
                text += f" ± {interval.half_width:.{digits}f}"
            return text + stats.significance_mark(None if test is None else test.p_value)

        header = [f"{t} (unlearned)" if t in self.unlearned else t for t in self.tasks]
        header = ["method", *header, "avg", "bits/param"]
        if st.has_tests:
            header.append(f"p vs {self.reference}")
        lines = [f"**{self.title}** ({self.metric})", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        for row, values in zip(self.rows, self.cells(), strict=True):
            columns = [*self.tasks, "avg"]
            parts = [values[0], *(cell(row, c, v) for c, v in zip(columns, values[1:-1], strict=True)),
                     show(values[-1])]
            if st.has_tests:
                test = st.tests.get((row.label, "avg"))
                parts.append("–" if test is None else f"{test.p_value:.3g}")
            lines.append("| " + " | ".join(parts) + " |")
        return "\n".join(lines) + "\n" + "".join(f"\n{note}" for note in self.notes()) + ("\n" if self.notes() else "")

    def notes(self) -> list[str]:
        st, notes = self.stats(), []
        if st.has_intervals:
            notes.append(f"± = 95 % interval over {st.seeds_text()} (Student-t) combined with a bootstrap over "
                         "evaluation examples.")
        if st.has_tests:
            what = ("McNemar's exact test (accuracy cells; discordant examples pooled over seeds and tasks)"
                    if self.test == "mcnemar" else "Paired bootstrap")
            notes.append(f"{what} against {self.reference} on the same seeds and examples: * p < 0.05, "
                         "** p < 0.01.")
        for task, why in self.unlearned.items():
            notes.append(f"{task}: left out of avg, {why}.")
        if any(row.missed for row in self.rows):
            notes.append("† missed its bits/param target by more than the tolerance (a method of one size, or the "
                         "closest its knob gets).")
        return notes

    def csv(self) -> str:
        st = self.stats()
        header = self.header()
        columns = [*self.tasks, "avg"]
        if st.has_intervals:
            header += [f"{c} ci95" for c in columns]
        if st.has_tests:
            header += [f"{c} p vs {self.reference}" for c in columns]
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        for row, values in zip(self.rows, self.cells(), strict=True):
            if st.has_intervals:
                values += [_half(st.intervals.get((row.label, c))) for c in columns]
            if st.has_tests:
                values += [None if (test := st.tests.get((row.label, c))) is None else test.p_value for c in columns]
            writer.writerow(["" if v is None else v for v in values])
        return out.getvalue()


def _half(interval: stats.Interval | None) -> float | None:
    return None if interval is None else interval.half_width


def _seed_of(record: dict) -> Any:
    """The seed a record's delta comes from: its zoo seed (None for hub pairs, one delta per task)."""
    return ((record.get("config") or {}).get("zoo") or {}).get("seed")


def _examples_of(record: dict, metric: str, score_key: str | None) -> dict | None:
    """The stored per-example outputs behind ``metric`` of a record, if it kept them."""
    key = score_key if metric == "score" else metric
    if not key or not key.endswith("/score"):
        return None
    return (record.get("examples") or {}).get(key.rsplit("/", 1)[0])


@dataclass
class _Task:
    """One row's seed groups on one task, ready for eval.stats (None parts: not available)."""

    seeds: list  # sorted seed ids
    scores: list[float]
    outputs: list[tuple] | None
    metric: Any
    shared: bool


@dataclass
class TableStatistics:
    """Intervals and paired tests of every (row label, column) of a table; column "avg" = the average."""

    intervals: dict[tuple[str, str], stats.Interval]
    tests: dict[tuple[str, str], stats.PairedTest]
    num_seeds: set[int]

    @property
    def has_intervals(self) -> bool:
        return any(i.half_width > 0 for i in self.intervals.values())

    @property
    def has_tests(self) -> bool:
        return bool(self.tests)

    def seeds_text(self) -> str:
        counts = sorted(self.num_seeds)
        return (f"{counts[0]} seed(s)" if len(counts) == 1 else f"{counts[0]}–{counts[-1]} seeds") + " (fine-tunes)"

    @classmethod
    def of(cls, table: Table) -> "TableStatistics":
        prepared = {row.label: {t: _prepare(row.records.get(t, []), table.metric) for t in table.tasks}
                    for row in table.rows}
        intervals, tests = {}, {}
        reference = prepared.get(table.reference) if table.reference else None
        for row in table.rows:
            mine = prepared[row.label]
            for task in table.tasks:
                if mine[task] is not None:
                    intervals[(row.label, task)] = _interval([mine[task]])
                    if reference is not None and row.label != table.reference:
                        test = _paired([mine[task]], [reference[task]], table.test)
                        if test is not None:
                            tests[(row.label, task)] = test
            averaged = [mine[t] for t in table.averaged]
            if averaged and None not in averaged and len({tuple(p.seeds) for p in averaged}) == 1:
                intervals[(row.label, "avg")] = _interval(averaged)
                if reference is not None and row.label != table.reference:
                    test = _paired(averaged, [reference[t] for t in table.averaged], table.test)
                    if test is not None:
                        tests[(row.label, "avg")] = test
        return cls(intervals, tests, {i.num_groups for i in intervals.values()})


def _prepare(records: list[dict], metric: str) -> _Task | None:
    """A row's records of one task as seed groups (sorted by seed; one record per seed, else None)."""
    scored = [(r, metric_of(r, metric)) for r in records]
    scored = [(r, v) for r, v in scored if v is not None]
    if not scored:
        return None
    seeds = [_seed_of(r) for r, _ in scored]
    if len(set(map(str, seeds))) != len(seeds):  # several records of one seed: not separable into seeds
        return None
    order = sorted(range(len(seeds)), key=lambda i: str(seeds[i]))
    scored, seeds = [scored[i] for i in order], [seeds[i] for i in order]
    stored = [_examples_of(r, metric, r.get("score_key")) for r, _ in scored]
    outputs = metric_fn = None
    shared = False
    if all(e is not None for e in stored) and len({e["scorer"] for e in stored}) == 1:
        inputs = [score_inputs(e) for e in stored]
        outputs, metric_fn = [arrays for arrays, _ in inputs], inputs[0][1]
        index = {str(e["columns"].get("index")) for e in stored}
        shared = len({len(a[0]) for a in outputs}) == 1 and len(index) == 1
    return _Task(seeds, [v for _, v in scored], outputs, metric_fn, shared)


def _interval(parts: list[_Task]) -> stats.Interval:
    """The interval of the average over ``parts`` (tasks): seeds and examples when every part has
    examples, else the Student-t interval over seeds alone."""
    if all(p.outputs is not None for p in parts):
        return stats.mean_ci_over_tasks([(p.outputs, p.metric, p.shared) for p in parts])
    mean, half = stats.t_interval([sum(v) / len(v) for v in zip(*(p.scores for p in parts), strict=True)])
    return stats.Interval(mean, half, half, 0.0, len(parts[0].scores))


def _paired(mine: list[_Task], reference: list[_Task | None], test: str = "bootstrap") -> stats.PairedTest | None:
    """Paired test of ``mine`` against ``reference`` over tasks, when both have per-example outputs of
    the same seeds on the same examples; else None (no test is shown)."""
    if any(r is None or r.seeds != m.seeds or m.outputs is None or r.outputs is None
           for m, r in zip(mine, reference, strict=True)):
        return None
    if test == "mcnemar":
        return _mcnemar(mine, reference)
    try:
        return stats.paired_bootstrap_over_tasks([(m.outputs, r.outputs, m.metric, m.shared)
                                                  for m, r in zip(mine, reference, strict=True)])
    except ValueError:  # other examples (e.g. another eval subset): not pairable
        return None


def _mcnemar(mine: list[_Task], reference: list[_Task]) -> stats.PairedTest | None:
    """McNemar's exact test on the examples where exactly one of the two is right, pooled over every
    seed group of every task; None unless every part is an accuracy ((labels, correct), no metric)
    scored on the same examples."""
    only_mine = only_reference = 0
    for m, r in zip(mine, reference, strict=True):
        if m.metric is not None or r.metric is not None:
            return None
        for (labels_m, correct_m), (labels_r, correct_r) in zip(m.outputs, r.outputs, strict=True):
            if not np.array_equal(labels_m, labels_r):
                return None
            b, c = stats.mcnemar_counts(correct_m, correct_r)
            only_mine, only_reference = only_mine + b, only_reference + c
    difference = float(np.mean([np.mean(m.scores) - np.mean(r.scores) for m, r in zip(mine, reference, strict=True)]))
    return stats.PairedTest(difference, stats.mcnemar_exact(only_mine, only_reference),
                            len(mine[0].outputs), 0)


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


def unlearned_tasks(records: Sequence[dict]) -> dict[str, str]:
    """Task -> why it counts as unlearned, for every task some record's zoo scores mark unlearned."""
    out = {}
    for r in records:
        zoo = r.get("zoo_scores") or {}
        if zoo.get("learned") is False and r["task"] not in out:
            majority = "" if zoo.get("majority") is None else f", majority class {zoo['majority']:.3f}"
            out[r["task"]] = (f"unlearned (seed {_seed_of(r)}: fine-tuned {zoo.get('finetuned', float('nan')):.3f}, "
                              f"base {zoo.get('base', float('nan')):.3f}{majority})")
    return out


def build_table(records: Sequence[dict], *, metric: str = "score", title: str | None = None,
                average: Sequence[str] | None = None, reference: str | None = None,
                test: str = "bootstrap") -> Table:
    """Group records into rows (method + the options that vary within that method) and task columns.

    ``average``: the tasks the avg column averages (default: those no record marks unlearned; naming
    an unlearned one raises TableError). ``reference``: the row label (or method) the others are
    tested against; default ``bitdelta`` when the table has that row, else no test. ``test``: the
    paired test, ``bootstrap`` or ``mcnemar`` (accuracy cells only).
    """
    if test not in PAIRED_TESTS:
        raise TableError(f"unknown paired test {test!r}; choose one of {', '.join(PAIRED_TESTS)}")
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
        for r, opts in zip(group, named, strict=True):
            variant = {k: opts.get(k) for k in varying}
            row = by_variant.setdefault(tuple(_freeze(v) for v in variant.values()), Row(method, variant))
            row.missed |= bool(r.get("budget")) and not r["budget"]["hit"]
            value = metric_of(r, metric)
            if value is not None:
                row.scores[r["task"]].append(value)
                row.records[r["task"]].append(r)
            if r.get("bits_per_param") is not None:
                row.bits.append(float(r["bits_per_param"]))
        rows += [by_variant[k] for k in sorted(by_variant, key=_sort_key)]
    if title is None:
        titles = {(r.get("config") or {}).get("table", {}).get("title") for r in records} - {None}
        experiments = sorted({r.get("experiment", "?") for r in records})
        title = titles.pop() if len(titles) == 1 else "Experiments " + ", ".join(experiments)
    unlearned = unlearned_tasks(records)
    if average is None:
        averaged = [t for t in tasks if t not in unlearned]
    else:
        unknown = [t for t in average if t not in tasks]
        if unknown:
            raise TableError(f"cannot average task(s) {unknown}: not in the table ({', '.join(tasks)})")
        refused = [t for t in average if t in unlearned]
        if refused:
            raise TableError(f"refusing to average task {refused[0]!r}: its records mark it {unlearned[refused[0]]}; "
                             "leave it out of --average")
        averaged = list(average)
    left_out = {t: unlearned[t] for t in tasks if t not in averaged and t in unlearned}
    return Table(title, metric, tasks, rows, averaged, left_out, _reference_label(rows, reference), test)


def _reference_label(rows: Sequence[Row], reference: str | None) -> str | None:
    """The label of the row named ``reference`` (a row label, or a method with one row)."""
    name = reference or DEFAULT_REFERENCE
    labels = [row.label for row in rows]
    if name in labels:
        return name
    matches = [row.label for row in rows if row.method == name]
    if len(matches) == 1:
        return matches[0]
    if reference is None:
        return None
    raise TableError(f"reference row {reference!r} " + ("is ambiguous: " if matches else "is not in the table: ")
                     + ", ".join(matches or labels))


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

    intervals = table.stats().intervals

    def error(row: Row) -> float:
        """The 95 % half width of the row's average (0 where none could be estimated)."""
        interval = intervals.get((row.label, "avg"))
        return 0.0 if interval is None else interval.half_width

    series: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
    for row in table.rows:
        avg = row.average(table.averaged)
        for key, value in row.variant.items():
            label, to_x = AXES.get(key, (key, lambda v: v))
            x = to_x(value)
            if avg is not None and isinstance(x, (int, float)) and not isinstance(x, bool):
                series[(label, row.method)].append((float(x), avg, error(row)))
    for label in sorted({label for label, _ in series}):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for (axis, method), points in sorted(series.items()):
            if axis == label and len(points) > 1:
                xs, ys, errs = zip(*sorted(points), strict=True)
                ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=method)
        ax.set_xlabel(label)
        ax.set_ylabel(f"average {table.metric}")
        ax.legend()
        ax.grid(alpha=0.3)
        save(fig, "score_vs_" + label.replace(" ", "_").replace("-", ""))

    points = [(row.bits_per_param, row.average(table.averaged), row) for row in table.rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if points:
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in dict.fromkeys(p[2].method for p in points):
            mine = sorted((b, s, error(row)) for b, s, row in points if row.method == method)
            xs, ys, errs = zip(*mine, strict=True)
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, linestyle="-" if len(mine) > 1 else "none",
                        label=method)
        reference = [row.average(table.averaged) for row in table.rows if row.method == REFERENCE_METHOD]
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
    parser.add_argument("--reference", help=f"row (label or method) the others are tested against "
                                            f"(default {DEFAULT_REFERENCE} when the table has it)")
    parser.add_argument("--average", action="append", metavar="TASK",
                        help="average only these tasks (repeatable; default every task not marked unlearned)")
    parser.add_argument("--test", choices=PAIRED_TESTS, default="bootstrap",
                        help="paired test against the reference (default %(default)s; mcnemar: accuracy cells only)")
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
    try:
        table = build_table(records, metric=args.metric, average=args.average, reference=args.reference,
                            test=args.test)
    except TableError as err:
        print(f"deltadct-tables: error: {err}", file=sys.stderr)
        return 1
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
