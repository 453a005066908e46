"""End to end on the fast ViT zoo: two zoo seeds (two fine-tunes, two deltas) × two methods, per-example
outputs recorded by the runner, and a table with 95 % intervals and paired tests built from the store."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from eval.examples import decode_examples, score_inputs
from eval.stats import mean_ci, paired_bootstrap
from experiments.run import run_job
from experiments.store import REFERENCE_METHOD, ResultStore
from experiments.tables import build_table, select

CONF = Path(__file__).resolve().parent.parent / "conf"


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        return compose("config", overrides=overrides)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("seeds")
    path = root / "records.jsonl"
    for seed in (0, 1):
        for method in ("bitdelta", "deltadct"):
            cfg = _compose(["model=zoo_vit", "zoo.mode=fast", f"zoo.seed={seed}", "tasks=[parity]",
                            f"method={method}", "model.evaluators=[vision,fidelity]", "zoo.progress=false",
                            "eval.vision.progress=false", "eval.fidelity.progress=false"])
            run_job(cfg, run_dir=root / f"run{seed}{method}", store_path=path)
    return ResultStore(path)


def test_records_keep_per_example_outputs_that_give_their_scores(store):
    records = store.records()
    assert sorted((r["method"], r["config"]["zoo"]["seed"]) for r in records) == sorted(
        (m, s) for m in (REFERENCE_METHOD, "bitdelta", "deltadct") for s in (0, 1))
    for r in records:
        columns = decode_examples(r["examples"]["vision"])
        assert len(columns["labels"]) == 450  # the whole validation set
        assert float(np.mean(columns["labels"] == columns["predictions"])) == pytest.approx(r["score"], abs=1e-12)
        assert float(np.mean(decode_examples(r["examples"]["fidelity"])["kl"])) == pytest.approx(
            r["metrics"]["fidelity/kl"], rel=1e-5)
        assert r["zoo_scores"]["learned"] is not False  # None in a zoo cached before the learned mark
    ref = next(r for r in records if r["method"] == REFERENCE_METHOD)
    assert ref["metrics"]["fidelity/kl"] == 0.0
    # two seeds are two different fine-tunes: the references predict differently
    refs = [decode_examples(r["examples"]["vision"])["predictions"] for r in records if r["method"] == REFERENCE_METHOD]
    assert not np.array_equal(*refs)


def test_table_with_intervals_and_paired_tests_from_the_store(store):
    records = select(store.records())
    table = build_table(records)
    st = table.stats()
    by_seed = sorted(records, key=lambda r: r["config"]["zoo"]["seed"])
    outputs = {m: [score_inputs(r["examples"]["vision"])[0] for r in by_seed if r["method"] == m]
               for m in ("bitdelta", "deltadct")}
    expected = mean_ci(outputs["deltadct"], shared=True)
    got = st.intervals[("deltadct", "parity")]
    assert got.half_width == pytest.approx(expected.half_width) and got.num_groups == 2
    assert st.tests[("deltadct", "parity")].p_value == pytest.approx(
        paired_bootstrap(outputs["deltadct"], outputs["bitdelta"], shared=True).p_value)
    markdown = table.markdown()
    assert "± " in markdown and "p vs bitdelta" in markdown
    fidelity = build_table(records, metric="fidelity/score")
    assert fidelity.stats().intervals[("deltadct", "parity")].example_half_width > 0
