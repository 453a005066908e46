"""Matched-bits runs: the knob search on known size functions, each method's knob, and the runner
on the fast ViT zoo (records within tolerance of the target; unreachable targets refused, nothing recorded)."""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

import deltadct
from deltadct.errors import ConfigError
from deltadct.methods import create_method, list_methods
from deltadct.methods.base import SizeKnob
from deltadct.methods.deltadct import ratios_for_bits
from experiments.budget import hits, search_knob
from experiments.config import register_configs
from experiments.store import ResultStore
from experiments.tables import build_table, select

REPO = Path(__file__).resolve().parent.parent
register_configs()
#: the fast ViT zoo, one task, the first block's matrices only (a trial compression is then ~0.1 s)
FAST = ["model=zoo_vit", "zoo.mode=fast", "tasks=[parity]", "eval.vision.max_samples=32",
        "eval.reconstruction.num_inputs=2", "reference=false", "+model.policy.include=[blocks.0.*]"]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        return compose("config", overrides=overrides)


class Counted:
    """A size function that counts how often it is measured."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, value):
        self.calls += 1
        return self.fn(value)


# ------------------------------------------------------------------ the search alone

def test_search_hits_a_smooth_increasing_size_within_tolerance():
    size = Counted(lambda v: 0.05 + 2.0 * v ** 1.5)  # side information, then a convex rise
    knob = SizeKnob("x", 0.0, 4.0, lambda v: {"x": v})
    match = search_knob(size, knob, 1.0, tolerance=0.01)
    assert abs(match.bits - 1.0) <= 0.01
    assert match.value == pytest.approx(((1.0 - 0.05) / 2.0) ** (2 / 3), rel=0.01)
    assert size.calls == len(match.trials) <= 12


def test_a_hint_that_hits_ends_the_search_after_one_trial_and_one_that_misses_changes_nothing():
    knob = SizeKnob("x", 0.0, 4.0, lambda v: {"x": v})
    fn = lambda v: 0.05 + 2.0 * v ** 1.5  # noqa: E731
    cold = search_knob(Counted(fn), knob, 1.0, tolerance=0.01)
    size = Counted(fn)
    warm = search_knob(size, knob, 1.0, tolerance=0.01, hint=(cold.value, cold.bits))
    assert (warm.value, warm.bits, size.calls, len(warm.trials)) == (cold.value, cold.bits, 1, 1)
    # another model's value that is off here (its sizes are 10 % larger): one wasted trial at most, same answer
    off = Counted(lambda v: 1.1 * fn(v))
    reference = search_knob(Counted(lambda v: 1.1 * fn(v)), knob, 1.0, tolerance=0.01)
    missed = search_knob(off, knob, 1.0, tolerance=0.01, hint=(cold.value, cold.bits))
    assert not hits(1.1 * fn(cold.value), 1.0, 0.01)
    assert abs(missed.bits - 1.0) <= 0.01 and off.calls <= len(reference.trials) + 1
    assert cold.value in dict(missed.trials)


def test_a_hint_that_measures_the_same_bits_ends_a_search_that_cannot_hit():
    """A step-wise size (a rank) that has no step within 1 % of the target: the cold search takes many
    trials to find the closest step; the same layout again takes one, and ends on the same step."""
    steps = Counted(lambda v: 0.3 * math.floor(v / 0.3) + 0.05)  # 0.95 and 1.25 around the target 1.0
    knob = SizeKnob("bits", 0.01, 32.0, lambda v: {"bits": v})
    cold = search_knob(steps, knob, 1.0, tolerance=0.01)
    assert not hits(cold.bits, 1.0, 0.01) and steps.calls > 3
    again = Counted(steps.fn)
    warm = search_knob(again, knob, 1.0, tolerance=0.01, hint=(cold.value, cold.bits))
    assert (warm.bits, again.calls) == (cold.bits, 1)


def test_search_on_a_decreasing_knob():
    # DARE-like: 1-bit mask + 16 bits per survivor at drop probability p
    knob = SizeKnob("p", 0.0, 0.999, lambda v: {"p": v}, decreasing=True)
    match = search_knob(lambda p: 1 + 16 * (1 - p), knob, 2.0, tolerance=0.001)
    assert match.value == pytest.approx(1 - 1 / 16, abs=1e-4)


def test_search_on_a_step_function_returns_the_closest_step_and_stops():
    # a rank-like knob: sizes only in steps of 0.3 bits, none within 1 % of 1.0
    size = Counted(lambda v: 0.3 * math.floor(v / 0.3 + 1e-9) + 0.3)
    match = search_knob(size, SizeKnob("bits", 0.01, 32.0, lambda v: {"bits": v}), 1.0, tolerance=0.01)
    assert match.bits == pytest.approx(0.9)  # steps 0.9 and 1.2: 0.9 is closer
    assert size.calls < 24  # the bracket closes before max_trials


def test_search_on_an_integer_ladder():
    ladder = [1.27, 1.5, 2.14, 2.3, 3.2, 4.1]
    match = search_knob(lambda i: ladder[int(i)], SizeKnob("setting", 0, 5, lambda i: {}, integer=True), 2.2)
    assert match.value == 2 and match.bits == 2.14  # the closest setting, not within 1 %
    assert all(float(v).is_integer() for v, _ in match.trials)


@pytest.mark.parametrize("target", [0.5, 20.0], ids=["below-minimum", "above-maximum"])
def test_unreachable_targets_name_the_method_and_the_range(target):
    knob = SizeKnob("bits/group_size", 0, 5, lambda i: {}, integer=True)
    ladder = [1.27, 1.5, 2.14, 2.3, 3.2, 4.1]
    with pytest.raises(ConfigError) as err:
        search_knob(lambda i: ladder[int(i)], knob, target, method="rtn")
    assert str(err.value).startswith(f"method 'rtn' cannot reach budget.bits={target:g}: its files measure "
                                     "1.27 to 4.1 bits/param")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------ knobs of the methods

def test_every_method_either_has_a_monotone_knob_or_one_size():
    fixed = {"bitdelta", "bitdelta_axis", "bitdelta_distilled", "none", "zero"}
    # large enough that deltadct_auto's per-layer maps and header entries fit its smallest budget
    delta = torch.randn(128, 256, generator=torch.Generator().manual_seed(0)) * 1e-3
    for name in list_methods():
        method = create_method(name, {"header_reserve_bytes": 0} if name == "deltadct_auto" else None)
        knob = method.size_knob()
        if knob is None:
            assert name in fixed
            continue
        assert name not in fixed and knob.low < knob.high
        sizes = []
        for value in (knob.low, (knob.low + knob.high) / 2, knob.high):
            value = round(value) if knob.integer else value
            m = create_method(name, {**method.config.to_dict(), **knob.options(value)})
            if m.needs_plan:
                m.plan([("w", delta)])
            # calibrated methods' layout is independent of the Hessian (tests/test_calibration.py)
            extra = {"hessian": torch.eye(delta.shape[1])} if m.needs_calibration else {}
            sizes.append(m.compress(delta, name="w", **extra).payload_bytes)
        assert sizes == sorted(sizes, reverse=knob.decreasing), name


@pytest.mark.parametrize("bits, expected", [(1.0, (0.2, 0.6, 0.2)), (0.5, (0.1, 0.3, 0.6)), (1.5, (0.6, 0.3, 0.1)),
                                            (2.0, (1.0, 0.0, 0.0))])
def test_deltadct_ratios_along_the_path_spend_the_bits(bits, expected):
    ratios = ratios_for_bits((0.2, 0.6, 0.2), (2, 1, 0), bits)
    assert ratios == pytest.approx(expected)
    assert sum(r * b for r, b in zip(ratios, (2, 1, 0), strict=True)) == pytest.approx(bits)


# ------------------------------------------------------------------ the runner on the fast zoo

@pytest.mark.parametrize("method", ["magnitude", "deltadct"])
def test_matched_bits_run_hits_the_target_on_the_written_file(method, tmp_path, monkeypatch):
    from experiments import run
    from experiments.run import run_job

    monkeypatch.setattr(run, "LAST_KNOB", {})  # a full search, not one started where an earlier test ended
    store = tmp_path / "records.jsonl"
    cfg = _compose([*FAST, f"method={method}", "budget.bits=1.5"])
    (record,) = run_job(cfg, run_dir=tmp_path / "run", store_path=store)
    info = deltadct.info(tmp_path / "run" / "delta_parity.safetensors")
    assert record["bits_per_param"] == info["bits_per_param"]
    assert abs(info["bits_per_param"] - 1.5) <= 0.01 * 1.5
    budget = record["budget"]
    assert budget["target"] == 1.5 and budget["hit"] and budget["bits"] == info["bits_per_param"]
    # the record holds the options that were run: the knob's chosen value among them
    assert record["method_options"] == {**record["method_options"], **budget["knob_options"]}
    assert budget["knob_value"] is not None and budget["trials"] >= 3
    table = build_table(select(ResultStore(store).records()))
    assert [row.label for row in table.rows] == [f"{method} (bits_target=1.5)"]


def test_later_tasks_of_a_pair_start_their_search_at_the_value_chosen_before(tmp_path, monkeypatch):
    """parity and geq5 share every shape (two-class heads): the second search is one trial, still a hit."""
    from experiments import run
    from experiments.run import run_job

    overrides = [o for o in FAST if not o.startswith("tasks=")]
    monkeypatch.setattr(run, "LAST_KNOB", {})  # no search of an earlier test in this process
    cfg = _compose([*overrides, "tasks=[parity,geq5]", "method=magnitude", "budget.bits=1.5"])
    first, second = run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "records.jsonl")
    assert first["budget"]["trials"] >= 3 and second["budget"]["trials"] == 1
    assert second["budget"]["knob_value"] == first["budget"]["knob_value"]
    assert first["budget"]["hit"] and second["budget"]["hit"]
    # the next job of a sweep (here another pair: one task) starts there too
    (third,) = run_job(_compose([*overrides, "tasks=[geq5]", "method=magnitude", "budget.bits=1.5"]),
                       run_dir=tmp_path / "run2", store_path=tmp_path / "other.jsonl")
    assert third["budget"]["trials"] == 1 and third["budget"]["hit"]


def test_a_method_of_one_size_is_reported_as_it_is_and_marked(tmp_path):
    from experiments.run import run_job

    cfg = _compose([*FAST, "method=bitdelta", "budget.bits=2.0"])
    (record,) = run_job(cfg, run_dir=tmp_path / "run", store_path=tmp_path / "r.jsonl")
    assert record["budget"]["knob"] is None and not record["budget"]["hit"]
    assert record["budget"]["bits"] == record["bits_per_param"]
    table = build_table([record])
    assert table.rows[0].label.endswith("†") and "† missed" in table.markdown()


def test_unreachable_target_is_one_line_exit_nonzero_and_no_record(tmp_path):
    import subprocess
    import sys

    script = Path(sys.executable).with_name("deltadct-run")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "experiments.run"]
    store = tmp_path / "results" / "records.jsonl"
    proc = subprocess.run([*command, *FAST, "reference=true", "method=rtn", "budget.bits=0.5", f"store.path={store}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith("deltadct-run: error: method 'rtn' cannot reach budget.bits=0.5: its files measure ")
    assert "Traceback" not in proc.stderr
    assert not store.exists() or not store.read_text().strip()  # not even the reference record


def test_target_above_the_maximum_is_refused_before_any_record(tmp_path):
    from experiments.run import run_job

    store = tmp_path / "records.jsonl"
    cfg = _compose([*FAST, "reference=true", "method=magnitude", "budget.bits=40"])
    message = r"method 'magnitude' cannot reach budget.bits=40: .* to 1[67]\.\d+ bits/param"
    with pytest.raises(ConfigError, match=message):
        run_job(cfg, run_dir=tmp_path / "run", store_path=store)
    assert not store.exists() or not store.read_text().strip()


def test_budget_section_is_validated_before_loading(tmp_path):
    from experiments.config import validate

    for override, word in (("budget.bits=-1", "budget.bits"), ("budget.tolerance=0", "budget.tolerance"),
                           ("budget.max_trials=1", "budget.max_trials"),
                           ("budget.unreachable=skip", "budget.unreachable")):
        with pytest.raises(ConfigError, match=word):
            validate(_compose([*FAST, "method=lowrank", override]))


def test_runs_without_a_target_keep_their_store_keys():
    from omegaconf import OmegaConf

    from experiments.run import identity

    config = OmegaConf.to_container(_compose([*FAST, "method=bitdelta"]), resolve=True)
    assert "budget" not in identity(config)
    config["budget"]["bits"] = 1.0
    assert identity(config)["budget"]["bits"] == 1.0
    assert json.dumps(identity(config), sort_keys=True)  # hashable as the store hashes it


def test_closest_runs_an_unreachable_target_at_the_nearest_size_and_records_the_miss():
    ladder = [1.27, 1.5, 2.14]
    knob = SizeKnob("setting", 0, 2, lambda i: {}, integer=True)
    assert search_knob(lambda i: ladder[int(i)], knob, 1.0, unreachable="closest").bits == 1.27
    assert search_knob(lambda i: ladder[int(i)], knob, 9.0, unreachable="closest").bits == 2.14


PAPER_PRESETS = ("vision_vit_b32", "vision_vit_l14", "glue_roberta_base", "glue_t5_base", "llm_math", "llm_code",
                 "llm_chat", "beit3_tasks")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_every_paper_preset_has_a_matched_bits_variant(preset):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        plain = compose("config", overrides=[f"experiment={preset}"])
        matched = compose("config", overrides=[f"experiment={preset}_matched"], return_hydra_config=True)
    assert matched.experiment == f"{preset}_matched" and matched.model == plain.model
    assert matched.hydra.sweeper.params["budget.bits"] == "0.5,1.0,2.0"
    assert matched.hydra.sweeper.params["method"] == "glob(*)" and matched.budget.unreachable == "closest"
