"""conf/ checked against the code: config groups 1:1 with the registries, the evaluator list built from the
registry, the paths/ and debug/ groups, and composed configs of committed records hashing as they did."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deltadct.methods import METHODS
from eval import EVALUATORS
from experiments.config import CONF_DIR, register_configs
from experiments.run import identity
from experiments.store import REFERENCE_METHOD, config_hash

REPO = Path(__file__).resolve().parents[1]
register_configs()


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"(?s).*validated against ConfigStore schema")
        return compose("config", overrides=overrides)


def _built_in(registry, package: str) -> list[str]:
    """Entries defined in this repository's ``package`` (plugins from other packages bring no yaml)."""
    return sorted(n for n in registry.names() if registry.get(n).__module__.startswith(f"{package}."))


@pytest.mark.parametrize("group, registry, package, defaults", [
    ("method", METHODS, "deltadct.methods", lambda cls: cls.Config().to_dict()),
    ("eval", EVALUATORS, "eval", lambda cls: cls.Options().to_dict()),
])
def test_config_group_is_one_to_one_with_its_registry(group, registry, package, defaults):
    files = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert files == _built_in(registry, package)
    for name in files:
        values = yaml.safe_load((CONF_DIR / group / f"{name}.yaml").read_text())
        assert values.pop("name") == name
        assert values == defaults(registry.get(name)), f"conf/{group}/{name}.yaml differs from the class defaults"


def test_every_registered_evaluator_has_options_in_the_composed_config():
    assert _compose(["eval.glue.max_samples=7"]).eval.glue.max_samples == 7
    cfg = _compose([])
    assert sorted(cfg.eval) == EVALUATORS.names()
    for name in EVALUATORS.names():
        options = OmegaConf.to_container(cfg.eval[name])
        assert options.pop("name") == name and options == EVALUATORS.get(name).Options().to_dict()


def test_one_ratio_sweep_preset_and_the_rate_distortion_grid_in_its_preset():
    presets = [p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")  # presets that sweep the ratios alone
               if set(yaml.safe_load(p.read_text())["hydra"]["sweeper"]["params"]) == {"method.ratios"}]
    assert presets == ["ablation_ratio"]
    from experiments import rate_distortion

    preset = yaml.safe_load((CONF_DIR / "experiment" / "rate_distortion.yaml").read_text())
    assert rate_distortion.GRID == preset["study"]["grid"] and rate_distortion.ENDS == ("none", "zero")
    assert rate_distortion.GRID["deltadct"][2] == {"bit_widths": [2, 1, 0], "ratios": [0.2, 0.6, 0.2], "budget": 1.0}
    assert len(rate_distortion.GRID["dare"]) == 12  # four drop rates, three seeds each
    assert set(rate_distortion.GRID) | set(rate_distortion.ENDS) <= set(METHODS.names())


def test_paths_group_feeds_the_other_keys(tmp_path):
    cfg = _compose([f"paths.store={tmp_path / 'r.jsonl'}", f"paths.cache_dir={tmp_path / 'cache'}",
                    f"paths.data_dir={tmp_path / 'data'}", "model=vit_b32_tasks"])
    assert cfg.store.path == str(tmp_path / "r.jsonl") and cfg.zoo.cache_dir == str(tmp_path / "cache")
    assert cfg.model.tasks.cars.data.root == f"{tmp_path / 'data'}/vision/cars/test"
    default = _compose([])
    assert default.store.path == "results/records.jsonl" and default.paths.output_dir == "outputs"
    # paths never change what a run computes
    moved = _compose([f"paths.store={tmp_path / 'r.jsonl'}", f"paths.output_dir={tmp_path}"])
    assert identity(OmegaConf.to_container(moved, resolve=True)) == identity(
        OmegaConf.to_container(default, resolve=True))


def test_debug_fast_is_a_quick_run_into_a_scratch_store():
    cfg = _compose(["debug=fast", "experiment=ablation_ratio", "model=zoo_t5"])
    assert cfg.zoo.mode == "fast" and cfg.progress is True
    assert cfg.eval.vision.max_samples == 64 and cfg.eval.glue.max_samples == 64 and cfg.eval.lm_eval.limit == 16
    assert cfg.store.path == "outputs/debug/records.jsonl"
    assert cfg.experiment == "ablation_ratio" and cfg.model.name == "zoo_t5"


def _committed_records(limit_per_store: int = 6):
    for store in sorted((REPO / "results").glob("*/records.jsonl")):
        seen = 0
        for line in store.read_text().splitlines():
            record = json.loads(line)
            # the rate-distortion driver records only its per-point overrides, not the model and preset
            complete = any(o.startswith("experiment=") for o in record["overrides"])
            if record["method"] != REFERENCE_METHOD and complete and seen < limit_per_store:
                seen += 1
                yield pytest.param(record, id=f"{store.parent.name}-{seen}")


@pytest.mark.parametrize("record", list(_committed_records()))
def test_committed_records_compose_to_their_config_hash(record):
    """The stored records' configs are found again (so a re-run skips them) after conf/ changes."""
    if set(record["method_options"]) != set(METHODS.get(record["method"]).Config().to_dict()):
        pytest.skip(f"{record['method']}'s options have changed since the record (a new option is a new config)")
    if config_hash(identity(record["config"])) != record["config_hash"]:
        # its own resolved config no longer gives its key: the zoo it ran on has a newer recipe (other
        # checkpoints), so a re-run recomputes it, rightly
        pytest.skip(f"the {record['config']['model']['zoo']} zoo's recipe has changed since the record")
    overrides = [o for o in record["overrides"] if not o.startswith("hydra")]
    cfg = _compose(overrides)
    recorded = record["config"]["model"]["evaluators"]
    if list(cfg.model.evaluators) != recorded:
        # the model has gained an evaluator since (fidelity): a record without its metrics is a different
        # run, found again only by asking for the evaluators it was made with
        cfg = _compose([*overrides, f"model.evaluators=[{','.join(recorded)}]"])
    assert config_hash(identity(OmegaConf.to_container(cfg, resolve=True))) == record["config_hash"]
