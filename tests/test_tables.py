"""deltadct-tables: rows, columns, averages and plots rebuilt from the result store alone."""
from __future__ import annotations

import csv
import io
import json

import pytest

from experiments.store import REFERENCE_METHOD, ResultStore
from experiments.tables import build_table, main, select


def _record(method, task, score, bits, experiment="exp", **options):
    key = f"{experiment}:{method}:{sorted(options.items())}:{task}"
    return {"key": key, "experiment": experiment, "model": "zoo_vit", "family": "vit", "task": task,
            "method": method, "method_options": {"seed": 0, **options}, "score": score,
            "metrics": {"vision/score": score, "reconstruction/score": 1 - score}, "bits_per_param": bits,
            "config": {"table": {"title": "Patch sizes"}}}


@pytest.fixture
def store(tmp_path):
    store = ResultStore(tmp_path / "results" / "records.jsonl")
    for task, ft in (("parity", 0.98), ("digits", 0.90)):
        store.append(_record(REFERENCE_METHOD, task, ft, None))
    for p, (a, b) in {8: (0.96, 0.80), 16: (0.94, 0.70), 32: (0.90, 0.60)}.items():
        store.append(_record("deltadct", "parity", a, 1.0 + p / 1000, patch_size=p))
        store.append(_record("deltadct", "digits", b, 1.0 + p / 1000, patch_size=p))
    store.append(_record("bitdelta", "parity", 0.5, 1.01))
    store.append(_record("bitdelta", "digits", 0.3, 1.03))
    store.append(_record("bitdelta", "digits", 0.99, 9.0, experiment="other"))  # filtered out by experiment
    return store


def test_rows_columns_and_averages_match_the_records(store):
    table = build_table(select(store.records(), experiment="exp"))
    assert table.title == "Patch sizes"
    assert table.tasks == ["parity", "digits"]
    rows = {r[0]: r[1:] for r in table.cells()}
    assert list(rows) == [REFERENCE_METHOD, "bitdelta", "deltadct (patch_size=8)", "deltadct (patch_size=16)",
                          "deltadct (patch_size=32)"]
    assert rows[REFERENCE_METHOD][:3] == pytest.approx([0.98, 0.90, 0.94]) and rows[REFERENCE_METHOD][3] is None
    assert rows["deltadct (patch_size=16)"] == pytest.approx([0.94, 0.70, 0.82, 1.016])
    assert rows["bitdelta"] == pytest.approx([0.5, 0.3, 0.4, 1.02])  # bits: mean over tasks


def test_a_config_recorded_twice_counts_once_with_its_latest_record(store):
    again = _record("bitdelta", "parity", 0.6, 1.01)
    store.append(again, unless_present=False)  # what force=true writes
    table = build_table(select(store.records(), experiment="exp", methods=["bitdelta"]))
    assert [r[0] for r in table.cells()] == [REFERENCE_METHOD, "bitdelta"]
    assert table.cells()[1][1:4] == pytest.approx([0.6, 0.3, 0.45])


def test_cli_prints_markdown_and_writes_csv_md_and_plots(store, tmp_path, capsys):
    out = tmp_path / "tables"
    assert main(["--store", str(store.path), "--experiment", "exp", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| deltadct (patch_size=8) | 0.9600 | 0.8000 | 0.8800 | 1.0080 |" in printed
    rows = list(csv.reader(io.StringIO((out / "table.csv").read_text())))
    assert rows[0] == ["method", "parity", "digits", "avg", "bits/param"]
    by_label = {r[0]: r for r in rows[1:]}
    assert float(by_label["deltadct (patch_size=32)"][3]) == pytest.approx(0.75)
    assert by_label[REFERENCE_METHOD][4] == ""
    assert (out / "table.md").read_text() in printed
    for plot in ("score_vs_patch_size.png", "score_vs_bits.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_other_metric_and_family_filter(store, tmp_path, capsys):
    assert main(["--store", str(store.path), "--experiment", "exp", "--metric", "reconstruction/score",
                 "--out", str(tmp_path / "t"), "--no-plots"]) == 0
    assert "| bitdelta | 0.5000 | 0.7000 | 0.6000 | 1.0200 |" in capsys.readouterr().out
    assert main(["--store", str(store.path), "--family", "llama", "--out", str(tmp_path / "t")]) == 1
    assert "no records" in capsys.readouterr().err


def test_missing_store_is_one_clear_error(tmp_path, capsys):
    assert main(["--store", str(tmp_path / "none.jsonl")]) == 1
    assert "no result store" in capsys.readouterr().err


def test_ratio_sweep_is_plotted_against_the_2bit_share(tmp_path):
    store = ResultStore(tmp_path / "r.jsonl")
    for share, score in ((0.1, 0.7), (0.3, 0.8), (0.5, 0.75)):
        store.append(_record("deltadct", "parity", score, 1.0, ratios=[share, 1 - 2 * share, share]))
    out = tmp_path / "t"
    assert main(["--store", str(store.path), "--out", str(out)]) == 0
    rows = list(csv.reader(io.StringIO((out / "table.csv").read_text())))
    assert [r[0] for r in rows[1:]] == ["deltadct (ratios=0.1/0.8/0.1)", "deltadct (ratios=0.3/0.4/0.3)",
                                        "deltadct (ratios=0.5/0/0.5)"]
    assert (out / "score_vs_2bit_share.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ intervals, paired tests, unlearned tasks

def _seeded_records(method, accuracies, labels, rng, task="parity", learned=True):
    """One record per zoo seed whose stored predictions score exactly ``accuracies[seed]``."""
    from eval.examples import encode_examples

    out = []
    for seed, acc in enumerate(accuracies):
        wrong = rng.choice(len(labels), size=round((1 - acc) * len(labels)), replace=False)
        predictions = labels.copy()
        predictions[wrong] = 1 - predictions[wrong]
        score = float((predictions == labels).mean())
        out.append({"key": f"{method}:{seed}:{task}", "experiment": "exp", "model": "zoo_vit", "family": "vit",
                    "task": task, "method": method, "method_options": {"seed": 0}, "score": score,
                    "score_key": "vision/score", "metrics": {"vision/score": score},
                    "bits_per_param": None if method == REFERENCE_METHOD else 1.0,
                    "zoo_scores": {"finetuned": 0.52, "base": 0.5, "majority": 0.53, "learned": learned},
                    "config": {"zoo": {"seed": seed}},
                    "examples": {"vision": encode_examples("accuracy", labels=labels, predictions=predictions)},
                    "_correct": (predictions == labels).astype(float)})
    return out


@pytest.fixture
def seeded():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    records = (_seeded_records(REFERENCE_METHOD, [0.95, 0.96, 0.95], labels, rng)
               + _seeded_records("bitdelta", [0.80, 0.82, 0.79], labels, rng)
               + _seeded_records("deltadct", [0.90, 0.91, 0.89], labels, rng)
               + _seeded_records("dare", [0.80, 0.81, 0.80], labels, rng))
    return records, labels


def test_cells_show_mean_and_interval_over_seeds_and_examples(seeded):
    import numpy as np
    from scipy.stats import t as student_t

    records, labels = seeded
    table = build_table(records)
    assert table.reference == "bitdelta"
    st = table.stats()
    correct = [r["_correct"] for r in records if r["method"] == "deltadct"]
    interval = st.intervals[("deltadct", "parity")]
    scores = [c.mean() for c in correct]
    # the seed part is the Student-t interval written out; the example part a bootstrap of the seed mean,
    # whose spread is close to the plug-in standard error of the pooled correctness
    assert interval.mean == pytest.approx(np.mean(scores))
    assert interval.seed_half_width == pytest.approx(student_t.ppf(0.975, 2) * np.std(scores, ddof=1) / np.sqrt(3))
    pooled = np.mean(correct, axis=0)
    assert interval.example_half_width == pytest.approx(1.96 * pooled.std() / np.sqrt(len(labels)), rel=0.1)
    assert interval.half_width == pytest.approx(np.hypot(interval.seed_half_width, interval.example_half_width))
    markdown = table.markdown()
    assert f"| deltadct | {np.mean(scores):.4f} ± {interval.half_width:.4f}**" in markdown
    assert "p vs bitdelta" in markdown and "Paired bootstrap against bitdelta" in markdown
    # 0.90 vs 0.80 on 400 examples x 3 seeds is far beyond noise; dare vs bitdelta (0.803 vs 0.803) is not
    assert st.tests[("deltadct", "avg")].p_value < 0.01 and st.tests[("dare", "parity")].p_value > 0.05
    assert ("bitdelta", "parity") not in st.tests  # the reference is not tested against itself
    rows = list(csv.reader(io.StringIO(table.csv())))
    assert rows[0][-4:] == ["parity ci95", "avg ci95", "parity p vs bitdelta", "avg p vs bitdelta"]
    by_label = {r[0]: r for r in rows[1:]}
    assert float(by_label["deltadct"][-4]) == pytest.approx(interval.half_width)


def test_reference_option_and_an_unknown_reference(seeded):
    from experiments.tables import TableError

    records, _ = seeded
    table = build_table(records, reference="deltadct")
    assert table.reference == "deltadct" and ("bitdelta", "parity") in table.stats().tests
    with pytest.raises(TableError, match="reference row 'nope' is not in the table"):
        build_table(records, reference="nope")


def test_unlearned_task_is_left_out_of_the_average_and_averaging_it_is_refused(seeded, tmp_path, capsys):
    import numpy as np

    from experiments.tables import TableError

    records, labels = seeded
    rng = np.random.default_rng(1)
    rte = (_seeded_records(REFERENCE_METHOD, [0.52] * 3, labels, rng, task="rte", learned=False)
           + _seeded_records("bitdelta", [0.50] * 3, labels, rng, task="rte", learned=False))
    table = build_table(records + rte)
    assert table.tasks == ["parity", "rte"] and table.averaged == ["parity"]
    bitdelta = next(r for r in table.cells() if r[0] == "bitdelta")
    assert bitdelta[3] == pytest.approx(bitdelta[1])  # avg = parity alone
    markdown = table.markdown()
    assert "rte (unlearned)" in markdown
    assert "rte: left out of avg, unlearned (seed 0: fine-tuned 0.520, base 0.500, majority class 0.530)." in markdown
    with pytest.raises(TableError, match="refusing to average task 'rte': its records mark it unlearned"):
        build_table(records + rte, average=["parity", "rte"])
    store = ResultStore(tmp_path / "r.jsonl")
    for r in records + rte:
        store.append({k: v for k, v in r.items() if k != "_correct"})
    assert main(["--store", str(store.path), "--out", str(tmp_path / "t")]) == 0  # error bars on the plot
    assert (tmp_path / "t" / "score_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    assert "rte (unlearned)" in capsys.readouterr().out
    assert main(["--store", str(store.path), "--average", "rte", "--out", str(tmp_path / "t"), "--no-plots"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("deltadct-tables: error: refusing to average task 'rte'") and "\n" not in err


def test_mcnemar_pools_the_discordant_examples_of_every_seed(seeded, tmp_path, capsys):
    import numpy as np
    from scipy.stats import binomtest

    from experiments.tables import TableError

    records, _ = seeded
    table = build_table(records, test="mcnemar")
    mine = [r["_correct"].astype(bool) for r in records if r["method"] == "dare"]
    ref = [r["_correct"].astype(bool) for r in records if r["method"] == "bitdelta"]
    b = sum(int(np.sum(m & ~r)) for m, r in zip(mine, ref, strict=True))
    c = sum(int(np.sum(~m & r)) for m, r in zip(mine, ref, strict=True))
    test = table.stats().tests[("dare", "parity")]
    # the exact two-sided binomial test on the pooled discordant pairs, by scipy
    assert test.p_value == pytest.approx(binomtest(min(b, c), b + c, 0.5).pvalue, abs=1e-12)
    assert table.stats().tests[("deltadct", "avg")].p_value < 1e-6
    assert "McNemar's exact test" in table.markdown()
    with pytest.raises(TableError, match="unknown paired test 'wilcoxon'"):
        build_table(records, test="wilcoxon")
    store = tmp_path / "r.jsonl"
    store.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "_correct"}) + "\n" for r in records))
    assert main(["--store", str(store), "--test", "mcnemar", "--out", str(tmp_path / "t"), "--no-plots"]) == 0
    assert "McNemar" in capsys.readouterr().out
