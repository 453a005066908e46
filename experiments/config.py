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
    zoo:        mode / seed / cache dir of the offline zoo (used by pairs with ``model.zoo`` set)
    store:      where result records go
    experiment: tag stored with every record; tables filter on it (conf/experiment/ presets set it)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from deltadct.api import resolve_device
from deltadct.errors import ConfigError
from deltadct.methods import MethodConfig, get_method_class
from deltadct.policy import TensorPolicy

LOGGERS = ("none", "wandb")
WANDB_MODES = ("online", "offline", "disabled")
ZOO_MODES = ("fast", "full")


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


@dataclass
class StoreConf:
    #: JSON-lines result store; relative paths are taken from the directory deltadct-run was started in
    path: str = "results/records.jsonl"


@dataclass
class RunConf:
    model: ModelConf = MISSING
    method: Dict[str, Any] = MISSING
    eval: Dict[str, Any] = field(default_factory=dict)
    logger: LoggerConf = field(default_factory=LoggerConf)
    zoo: ZooConf = field(default_factory=ZooConf)
    store: StoreConf = field(default_factory=StoreConf)
    #: tag stored in every record (tables filter on it); presets in conf/experiment/ set it
    experiment: str = "adhoc"
    #: run only these tasks of the pair; null: all
    tasks: Optional[List[str]] = None
    #: also evaluate the uncompressed fine-tuned model (recorded once per task as method "finetuned")
    reference: bool = True
    #: table hints for deltadct-tables, stored with the records (title, metric)
    table: Dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    #: re-run configs already in the store
    force: bool = False
    #: keep delta_<task>.safetensors in the run dir (false: delete once evaluated)
    keep_deltas: bool = True
    progress: bool = False


def register_configs() -> None:
    """Put the schema in Hydra's ConfigStore; conf/config.yaml lists it first in its defaults."""
    ConfigStore.instance().store(name="run_schema", node=RunConf)


#: keys that do not change what a run computes, left out of the config hash
VOLATILE_KEYS = ("logger", "store", "force", "progress", "keep_deltas", "table")


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


def validate(cfg: DictConfig) -> RunSpec:
    """Check every option that can be checked without loading a model; raise one-line errors."""
    from deltadct.adapters import get_adapter
    from eval import get_evaluator

    name, options = method_options(cfg)
    method_config = get_method_class(name).Config.from_dict(options)
    if cfg.logger.name not in LOGGERS:
        raise ConfigError(f"logger.name {cfg.logger.name!r} is not one of {list(LOGGERS)}")
    if cfg.logger.mode not in WANDB_MODES:
        raise ConfigError(f"logger.mode {cfg.logger.mode!r} is not one of {list(WANDB_MODES)}")
    if cfg.zoo.mode not in ZOO_MODES:
        raise ConfigError(f"zoo.mode {cfg.zoo.mode!r} is not one of {list(ZOO_MODES)}")
    resolve_device(cfg.device)
    model = cfg.model
    if model.zoo is None and (model.base is None or not model.tasks):
        raise ConfigError(f"model {model.name!r}: set either model.zoo or both model.base and model.tasks")
    if model.zoo is not None and (model.base is not None or model.tasks):
        raise ConfigError(f"model {model.name!r}: model.zoo excludes model.base / model.tasks")
    if model.zoo is None and cfg.tasks is not None:
        unknown = sorted(set(cfg.tasks) - set(model.tasks))
        if unknown:
            raise ConfigError(f"tasks {unknown} are not tasks of model {model.name!r}: {sorted(model.tasks)}")
    adapter = get_adapter(model.adapter)
    policy = TensorPolicy.from_dict({**adapter.policy_defaults,
                                     **OmegaConf.to_container(model.policy, resolve=True)})
    if not model.evaluators:
        raise ConfigError(f"model {model.name!r} lists no evaluators")
    evaluators = {}
    for ev in model.evaluators:
        evaluators[ev] = evaluator_options(cfg, ev)
        get_evaluator(ev)(**evaluators[ev])  # unknown names / options fail here, before any model loads
    return RunSpec(name, method_config, policy, evaluators)
