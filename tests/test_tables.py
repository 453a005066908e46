"""deltadct-tables: rows, columns, averages and plots rebuilt from the result store alone."""
from __future__ import annotations

import csv
import io

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
