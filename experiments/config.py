"""The runner's structured config (registered in Hydra's ConfigStore) and its start-up validation.

The dataclasses type every key Hydra composes, so a misspelt key or a wrong type fails while the
config is composed. What the dataclasses cannot know (the options of the selected method, which
evaluators and adapters exist) is checked by :func:`validate`, which builds the method's own
``Config`` from the registry and instantiates each evaluator before anything is loaded.

Layout of a composed config (``deltadct-run --cfg job`` prints it)::

    model:      a base + fine-tuned pair (conf/model/*.yaml, schema :class:`ModelConf`)
    method:     ``name`` + the method's Config fields (conf/method/<name>.yaml, 1:1 with the registry)
    eval:       evaluator name -> its options (conf/eval/<name>.yaml); ``model.evaluators`` picks which run
    logger:     none | wandb (conf/logger/)
    calibration: none | task: calibration data for the methods that need it (conf/calibration/)
    zoo:        mode / seed / cache dir of the offline zoo (used by pairs with ``model.zoo`` set)
    paths:      data, checkpoint, cache, output dirs and the store (conf/paths/); other keys refer to them
    store:      where result records go (``${paths.store}``)
    budget:     matched-bits target (``budget.bits``; null = each method at its own options)
    experiment: tag stored with every record; tables filter on it (conf/experiment/ presets set it)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from deltadct.api import resolve_device
from deltadct.errors import ConfigError
from deltadct.methods import MethodConfig, get_method_class, list_methods
from deltadct.policy import TensorPolicy
from experiments.budget import UNREACHABLE
from experiments.calibration import check_modality, uses_calibration
from experiments.zoo.common import DEVICES as ZOO_DEVICES
from experiments.zoo.common import MODES as ZOO_MODES

LOGGERS = ("none", "wandb")
CALIBRATION_SOURCES = ("none", "task")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class TaskConf:
    """One fine-tuned checkpoint of a hub/local pair: where it is and how its evaluators find data."""

    #: local checkpoint (dir or file) or a hub name already in the local Hugging Face cache
    path: str = MISSING
    #: the task's data spec handed to evaluators as ``EvalContext.data`` (e.g. {kind: glue, task: sst2})
    data: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConf:
    """A base checkpoint and its fine-tuned tasks, either from the offline zoo or given by path."""

    #: label of the pair in records and tables
    name: str = MISSING
    #: model family label (tables filter on it), e.g. vit, minilm, roberta, llama
    family: str = MISSING
    #: adapter registry name (deltadct.adapters) that loads, evaluates and saves this family
    adapter: str = MISSING
    #: zoo family to build/load with experiments.zoo.build_zoo; null for a hub/local pair
    zoo: Optional[str] = None
    #: base checkpoint of a hub/local pair
    base: Optional[str] = None
    #: tasks of a hub/local pair (a zoo pair takes its tasks from the zoo manifest)
    tasks: Dict[str, TaskConf] = field(default_factory=dict)
    #: evaluators to run on each reconstructed model; the first one's "score" is the headline metric
    evaluators: List[str] = field(default_factory=lambda: ["reconstruction"])
    #: tensor-policy overrides on top of the adapter's policy_defaults (deltadct.policy.TensorPolicy)
    policy: Dict[str, Any] = field(default_factory=dict)


@dataclass
class LoggerConf:
    name: str = "none"
    #: W&B mode: offline needs no network; sync later with `wandb sync <run dir>/wandb`
    mode: str = "offline"
    project: str = "deltadct"
    entity: Optional[str] = None
    #: W&B group; null: the experiment tag
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class ZooConf:
    mode: str = "full"
    seed: int = 0
    #: null: $DELTADCT_CACHE, else ~/.cache/deltadct
    cache_dir: Optional[str] = None
    #: print a line per build step on stderr while a zoo is built (false: quiet)
    progress: bool = True
    #: where the zoo is trained when it is not cached: cpu, or cuda for families whose recipe supports
    #: it (minilm); a GPU-built zoo is another zoo (cached apart, part of a run's identity)
    device: str = "cpu"


@dataclass
class PathsConf:
    """Where runs read and write (conf/paths/default.yaml); other keys refer to these."""

    #: real datasets (GLUE TSVs, image folders) that hub pairs' data specs point into
    data_dir: str = "../shared/data"
    #: local copies of hub checkpoints
    checkpoint_dir: str = "checkpoints"
    #: offline zoo cache; null: $DELTADCT_CACHE, else ~/.cache/deltadct
    cache_dir: Optional[str] = None
    #: run dirs (<output_dir>/<experiment>/<time>) and sweep dirs
    output_dir: str = "outputs"
    sweep_dir: str = "multirun"
    #: the result store (JSON lines)
    store: str = "results/records.jsonl"


@dataclass
class CalibrationConf:
    """Calibration data (experiments/calibration.py); only methods that need it read it."""

    #: none | task (samples of the task's own training split)
    name: str = "task"
    num_samples: int = 128
    #: token limit of each text sample
    seq_len: int = 128
    seed: int = 0
    split: str = "train"


@dataclass
class StoreConf:
    #: JSON-lines result store; relative paths are taken from the directory deltadct-run was started in
    path: str = "results/records.jsonl"


@dataclass
class BudgetConf:
    """Matched-bits mode (experiments/budget.py): every method searches its size knob for this target."""

    #: bits/param the written file must measure (header and side information included); null: off
    bits: Optional[float] = None
    #: relative tolerance of a hit (0.01 = ±1 %)
    tolerance: float = 0.01
    #: most trial compressions (in memory) per task
    max_trials: int = 24
    #: a target the method cannot reach: "error" (one line, nothing recorded), or "closest" (run at the
    #: knob's nearest end and record the miss; for sweeps, so one method out of reach stops no other)
    unreachable: str = "error"


@dataclass
class RunConf:
    model: ModelConf = MISSING
    method: Dict[str, Any] = MISSING
    eval: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConf = field(default_factory=LoggerConf)
    zoo: ZooConf = field(default_factory=ZooConf)
    calibration: CalibrationConf = field(default_factory=CalibrationConf)
    store: StoreConf = field(default_factory=StoreConf)
    paths: PathsConf = field(default_factory=PathsConf)
    budget: BudgetConf = field(default_factory=BudgetConf)
    #: tag stored in every record (tables filter on it); presets in conf/experiment/ set it
    experiment: str = "adhoc"
    #: run only these tasks of the pair; null: all
    tasks: Optional[List[str]] = None
    #: also evaluate the uncompressed fine-tuned model (recorded once per task as method "finetuned")
    reference: bool = True
    #: table hints for deltadct-tables, stored with the records (title, metric)
    table: Dict[str, Any] = field(default_factory=dict)
    #: the points of a study that a driver runs job by job (e.g. ``study.grid`` of rate_distortion,
    #: read by experiments/rate_distortion.py); deltadct-run itself ignores it
    study: Dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    #: re-run configs already in the store
    force: bool = False
    #: keep delta_<task>.safetensors in the run dir (false: delete once evaluated)
    keep_deltas: bool = True
    progress: bool = False


#: the config tree: an absolute path, because relative ones resolve against the module's package when
#: started as the `deltadct-run` console script (Hydra then looks for a `conf` package)
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore (conf/config.yaml lists it first in its defaults), and a
    ``method/<name>`` node with the defaults of every registered method that has no conf/method/<name>.yaml:
    methods that other packages register (entry points) run with ``method=<name>`` like the built-in ones."""
    from eval import get_evaluator, list_evaluators

    store = ConfigStore.instance()
    store.store(name="run_schema", node=RunConf)
    for name in list_methods():
        if not (CONF_DIR / "method" / f"{name}.yaml").is_file():
            store.store(group="method", name=name, node={"name": name, **get_method_class(name).Config().to_dict()})
    for name in list_evaluators():
        if not (CONF_DIR / "eval" / f"{name}.yaml").is_file():
            store.store(group="eval", name=name, node={"name": name, **get_evaluator(name).Options().to_dict()})
    # every registered evaluator's options under eval.<name>, so `eval.<name>.<option>=...` always works
    store.store(name="evaluators", node={"defaults": [{f"eval@eval.{name}": name} for name in list_evaluators()]})


#: keys that do not change what a run computes, left out of the config hash
VOLATILE_KEYS = ("logger", "store", "paths", "force", "progress", "keep_deltas", "table", "study")


@dataclass
class RunSpec:
    """What :func:`validate` derives from a composed config, before anything heavy happens."""

    method_name: str
    method_config: MethodConfig
    policy: TensorPolicy
    evaluators: Dict[str, Dict[str, Any]]  # name -> options, in model.evaluators order


def evaluator_options(cfg: DictConfig, name: str) -> Dict[str, Any]:
    section = cfg.eval.get(name)
    options = {} if section is None else OmegaConf.to_container(section, resolve=True)
    declared = options.pop("name", name)
    if declared != name:
        raise ConfigError(f"eval.{name} declares name {declared!r}; it must match its key {name!r}")
    return options


def method_options(cfg: DictConfig) -> tuple[str, Dict[str, Any]]:
    options = OmegaConf.to_container(cfg.method, resolve=True)
    name = options.pop("name", None)
    if not name:
        raise ConfigError("method.name is missing; select a method with method=<name>")
    return name, options


def _validate_calibration(cfg: DictConfig, method: str) -> None:
    cal = cfg.calibration
    if cal.name not in CALIBRATION_SOURCES:
        raise ConfigError(f"calibration.name {cal.name!r} is not one of {list(CALIBRATION_SOURCES)}")
    if cal.num_samples < 1 or cal.seq_len < 1:
        raise ConfigError(f"calibration.num_samples and calibration.seq_len must be >= 1 (got {cal.num_samples}, "
                          f"{cal.seq_len})")
    if cal.name == "none" and uses_calibration(get_method_class(method)):
        raise ConfigError(f"method {method!r} needs calibration data but calibration=none; set calibration=task")


def validate(cfg: DictConfig) -> RunSpec:
    """Check every option that can be checked without loading a model; raise one-line errors."""
    from deltadct.adapters import create_adapter
    from eval import create_evaluator

    name, options = method_options(cfg)
    method_config = get_method_class(name).Config.from_dict(options)
    if cfg.logger.name not in LOGGERS:
        raise ConfigError(f"logger.name {cfg.logger.name!r} is not one of {list(LOGGERS)}")
    if cfg.logger.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode {cfg.logger.mode!r} is not one of {list(WANDB_MODES)}")
    if cfg.zoo.mode not in ZOO_MODES:
        raise ConfigError(f"zoo.mode {cfg.zoo.mode!r} is not one of {list(ZOO_MODES)}")
    if cfg.zoo.device not in ZOO_DEVICES:
        raise ConfigError(f"zoo.device {cfg.zoo.device!r} is not one of {list(ZOO_DEVICES)}")
    resolve_device(cfg.device)
    budget = cfg.budget
    if budget.bits is not None and not 0 < budget.bits <= 64:
        raise ConfigError(f"budget.bits {budget.bits!r} must be in (0, 64] bits/param, or null for no target")
    if not 0 < budget.tolerance < 1:
        raise ConfigError(f"budget.tolerance {budget.tolerance!r} must be in (0, 1) (relative, 0.01 = 1 %)")
    if budget.unreachable not in UNREACHABLE:
        raise ConfigError(f"budget.unreachable {budget.unreachable!r} is not one of {list(UNREACHABLE)}")
    if budget.max_trials < 2:
        raise ConfigError(f"budget.max_trials {budget.max_trials!r} must be at least 2 (both ends of a knob)")
    _validate_calibration(cfg, name)
    model = cfg.model
    if model.zoo is None and (model.base is None or not model.tasks):
        raise ConfigError(f"model {model.name!r}: set either model.zoo or both model.base and model.tasks")
    if model.zoo is not None and (model.base is not None or model.tasks):
        raise ConfigError(f"model {model.name!r}: model.zoo excludes model.base / model.tasks")
    if model.zoo is None and cfg.tasks is not None:
        unknown = sorted(set(cfg.tasks) - set(model.tasks))
        if unknown:
            raise ConfigError(f"tasks {unknown} are not tasks of model {model.name!r}: {sorted(model.tasks)}")
    adapter = create_adapter(model.adapter)
    if uses_calibration(get_method_class(name)) and model.zoo is None:
        for task_name, task in model.tasks.items():
            check_modality(OmegaConf.to_container(task.data, resolve=True), task_name, adapter)
    policy = TensorPolicy.from_dict({**adapter.policy_defaults,
                                     **OmegaConf.to_container(model.policy, resolve=True)})
    if not model.evaluators:
        raise ConfigError(f"model {model.name!r} lists no evaluators")
    evaluators = {}
    for ev in model.evaluators:
        evaluators[ev] = evaluator_options(cfg, ev)
        create_evaluator(ev, **evaluators[ev])  # unknown names / options fail here, before any model loads
    return RunSpec(name, method_config, policy, evaluators)
