"""The notebooks run top to bottom on the fast zoo, and the committed tables are what the records give.

Each notebook is executed with nbclient against an empty result store, so it runs its own small
sweep on the FAST zoo (shared $DELTADCT_CACHE) into a temporary figures dir; the test then checks
that its figure was written and that its printed table has a row for every setting it swept.
"""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from experiments import rate_distortion, tables

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RESULTS = REPO / "results"

#: notebook -> (figures it must write, row labels its printed tables must contain)
EXPECTED = {
    "patch_size_ablation.ipynb": (["patch_size_ablation.png"],
                                  ["finetuned", *(f"deltadct (patch_size={p})" for p in (8, 16, 32, 64))]),
    "ratio_ablation.ipynb": (["ratio_ablation.png"],
                             ["finetuned", *(f"deltadct (ratios={r})" for r in
                                             ("0/1/0", "0.1/0.8/0.1", "0.2/0.6/0.2", "0.3/0.4/0.3", "0.4/0.2/0.4",
                                              "0.5/0/0.5"))]),
    "dct_vs_spatial.ipynb": (["dct_vs_spatial.png"],
                             ["finetuned", "deltadct (transform=dct)", "deltadct (transform=none)"]),
    "rescale_ablation.ipynb": (["rescale_ablation.png"],
                               ["finetuned", "| zero |", *(f"deltadct (ratios={q}, rescale={r})"
                                                           for q in ("0.2/0.6/0.2", "0.5/0/0.5")
                                                           for r in ("lstsq", "mean_abs", "none"))]),
    "energy_compaction.ipynb": (["energy_compaction.png"],
                                ["gaussian noise (same shape/std)", "all real deltas",
                                 *(f"task {t}" for t in ("digits", "parity", "geq5", "rotated"))]),
    "deltadct_plus_ablation.ipynb": (["deltadct_plus_ablation.png"],
                                     ["| deltadct (paper) |", "| deltadct_plus (preset) |", "KL / paper"]),
    "rate_distortion.ipynb": (["rate_distortion.png"],
                              [f"| {m} |" for m in ("deltadct", "deltadct_auto", "bitdelta", "delta_come",
                                                    "delta_come_rtn", "lowrank", "rtn", "magnitude", "dare", "zero")]),
}


def test_every_notebook_is_covered():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(EXPECTED)


def _output_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") if out.get("output_type") == "stream"
                         else out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs_on_the_fast_zoo(name, tmp_path, monkeypatch):
    figures, rows = EXPECTED[name]
    out = tmp_path / "figures"
    monkeypatch.setenv("DELTADCT_RESULTS", str(tmp_path / "empty_store"))  # no rows: the notebook runs its sweep
    monkeypatch.setenv("DELTADCT_NB_OUT", str(out))
    monkeypatch.setenv("DELTADCT_NB_ZOO_MODE", "fast")
    monkeypatch.setenv("DELTADCT_NB_MODEL", "zoo_vit")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=240, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    for figure in figures:
        assert (out / figure).is_file() and (out / figure).stat().st_size > 1000, figure
    text = _output_text(nb)
    missing = [row for row in rows if row not in text]
    assert not missing, f"{name}: table rows missing: {missing}"


# ------------------------------------------------------------------ committed results

def _committed_tables() -> list[tuple[Path, str, str, Path]]:
    """(store, experiment, metric, committed .md) for every table under results/<study>/tables/<experiment>/."""
    found = []
    for md in sorted(RESULTS.glob("*/tables/*/table*.md")):
        study, experiment = md.parents[2], md.parent.name
        metric = "score" if md.stem == "table" else md.stem.removeprefix("table_").replace("_", "/", 1)
        found.append((study / "records.jsonl", experiment, metric, md))
    return found


@pytest.mark.skipif(not _committed_tables(), reason="no committed tables yet")
@pytest.mark.parametrize("store,experiment,metric,committed", _committed_tables(),
                         ids=lambda v: str(v.relative_to(RESULTS)) if isinstance(v, Path) else str(v))
def test_committed_tables_are_rebuilt_exactly(store, experiment, metric, committed, tmp_path, capsys):
    assert tables.main(["--store", str(store), "--experiment", experiment, "--metric", metric,
                        "--out", str(tmp_path), "--no-plots"]) == 0
    capsys.readouterr()
    for suffix in (".md", ".csv"):
        assert (tmp_path / (committed.stem + suffix)).read_text() == committed.with_suffix(suffix).read_text()


@pytest.mark.skipif(not (RESULTS / "rate_distortion" / "records.jsonl").is_file(), reason="no committed study")
def test_committed_rate_distortion_csv_is_rebuilt_exactly(tmp_path, capsys):
    shutil.copy(RESULTS / "rate_distortion" / "records.jsonl", tmp_path / "records.jsonl")
    assert rate_distortion.main(["--plot-only", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    rebuilt = (tmp_path / rate_distortion.CSV_NAME).read_text()
    assert rebuilt == (RESULTS / "rate_distortion" / rate_distortion.CSV_NAME).read_text()
    methods = {row["method"] for row in csv.DictReader(rebuilt.splitlines())}
    # every method of the study has its points; the calibrated delta_come joined the grid after this study ran
    assert set(rate_distortion.GRID) - {"delta_come"} <= methods
