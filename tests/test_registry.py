"""The one registry behind methods, adapters, evaluators and zoo families: the same contract for each
kind, and plugins that another package registers through an entry point (a method that appears in
``deltadct methods`` and runs in ``deltadct-run`` without a line of this repository changed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import deltadct
from deltadct.adapters import ADAPTERS, ModelAdapter, create_adapter, get_adapter, get_adapter_class
from deltadct.errors import ConfigError, UnknownMethodError, UnknownNameError
from deltadct.methods import METHODS, MethodConfig, create_method
from deltadct.registry import Registry
from eval import EVALUATORS, Evaluator, create_evaluator, get_evaluator
from experiments.zoo import ZOO_FAMILIES, ZooError, ZooFamily, get_family

REPO = Path(__file__).resolve().parents[1]
REGISTRIES = {"methods": METHODS, "adapters": ADAPTERS, "evaluators": EVALUATORS, "zoo families": ZOO_FAMILIES}
ENTRIES = [(kind, name) for kind, registry in REGISTRIES.items() for name in registry.names()]


# ------------------------------------------------------------------ the contract, for every kind and entry

@pytest.mark.parametrize("kind, name", ENTRIES)
def test_every_entry_is_a_concrete_subclass_under_its_own_name(kind, name):
    registry = REGISTRIES[kind]
    cls = registry.get(name)
    assert issubclass(cls, registry.base) and cls.name == name
    instance = registry.create(name)  # every kind builds with its defaults
    assert isinstance(instance, registry.base)
    assert name in registry and name in list(registry)


@pytest.mark.parametrize("kind", REGISTRIES)
def test_unknown_name_is_one_error_naming_every_entry(kind):
    registry = REGISTRIES[kind]
    with pytest.raises(UnknownNameError) as caught:
        registry.get("no-such-entry")
    message = str(caught.value)
    assert isinstance(caught.value, ConfigError) and "\n" not in message
    assert message.startswith(f"unknown {registry.kind} 'no-such-entry'; available: ")
    assert message.endswith(", ".join(registry.names()))
    with pytest.raises(UnknownNameError):
        registry.get(["unhashable"])  # a list from a YAML file is an unknown name too, not a TypeError


def test_each_kind_keeps_its_own_error_type():
    with pytest.raises(UnknownMethodError):
        METHODS.get("nope")
    with pytest.raises(ZooError):  # the zoo CLI catches ZooError
        ZOO_FAMILIES.get("nope")


@pytest.mark.parametrize("kind", REGISTRIES)
def test_registration_checks_the_class(kind):
    base = REGISTRIES[kind].base
    registry = Registry("thing", base)

    class NotDerived:
        name = "x"

    with pytest.raises(TypeError, match="not a subclass"):
        registry.register(NotDerived)
    abstract = type("Abstract", (base,), {"name": "abstract"})
    with pytest.raises(TypeError, match="does not implement"):
        registry.register(abstract)
    concrete = type("Concrete", (base,), {name: (lambda self, *a, **k: None) for name in base.__abstractmethods__})
    with pytest.raises(TypeError, match="has no name"):
        registry.register(concrete)
    first = registry.register(type("First", (concrete,), {"name": "one"}))
    assert registry.register(first) is first  # registering the same class again is harmless
    with pytest.raises(ValueError, match="'one' registered twice"):
        registry.register(type("Second", (concrete,), {"name": "one"}))
    registry.unregister("one")
    assert registry.names() == []


def test_getters_return_classes_and_creators_instances():
    assert deltadct.get_method_class("bitdelta") is METHODS.get("bitdelta")
    assert isinstance(deltadct.create_method("bitdelta"), METHODS.get("bitdelta"))
    assert get_evaluator("glue") is EVALUATORS.get("glue")
    assert create_evaluator("glue", batch_size=8).options.batch_size == 8
    assert get_adapter_class("timm_vit") is ADAPTERS.get("timm_vit")
    assert isinstance(create_adapter("timm_vit"), ModelAdapter)
    assert type(get_adapter("timm_vit")) is get_adapter_class("timm_vit")  # the name callers already use
    assert isinstance(get_family("vit"), ZooFamily)
    assert issubclass(get_evaluator("vision"), Evaluator)


def test_create_method_takes_a_config_object_or_a_method():
    config = METHODS.get("deltadct").Config(patch_size=32)
    method = create_method(config)
    assert type(method) is METHODS.get("deltadct") and method.config is config
    assert create_method(method) is method
    assert create_method(method, patch_size=8).config.patch_size == 8 and method.config.patch_size == 32
    with pytest.raises(ConfigError, match="patch_size"):
        create_method(METHODS.get("deltadct").Config(patch_size=0))
    with pytest.raises(UnknownMethodError, match="no registered method is configured by MethodConfig"):
        create_method(MethodConfig())


# ------------------------------------------------------------------ plugins through entry points

PLUGIN = '''
"""A method that stores each delta at half precision: a plugin package, not part of deltadct."""
from dataclasses import dataclass

import torch

from deltadct.methods import Compressed, Method, MethodConfig
from deltadct.methods.base import check_choice


@dataclass
class HalfConfig(MethodConfig):
    dtype: str = "float16"

    def validate(self):
        check_choice("dtype", self.dtype, ("float16", "bfloat16"))


class HalfDelta(Method):
    name = "half_delta"
    Config = HalfConfig

    def compress(self, delta, *, name=""):
        return Compressed({"values": delta.to(getattr(torch, self.config.dtype))})

    def reconstruct(self, compressed, shape):
        return compressed.tensors["values"].float().reshape(shape)
'''


def write_plugin(root: Path, entry_point: str = "half_delta = deltadct_half_plugin:HalfDelta",
                 source: str = PLUGIN) -> dict[str, str]:
    """A package importable from ``root`` with an installed-distribution record (dist-info) whose
    entry_points.txt declares ``entry_point`` in the ``deltadct.methods`` group; the environment that
    puts it and this repository on the path."""
    (root / "deltadct_half_plugin.py").write_text(textwrap.dedent(source))
    info = root / "deltadct_half_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: deltadct-half-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[deltadct.methods]\n{entry_point}\n")
    path = os.pathsep.join([str(root), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def python(code: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_plugin_method_is_listed_and_compresses(tmp_path):
    env = write_plugin(tmp_path)
    cli = python("import sys; from deltadct.cli import main; sys.exit(main(['methods', '--json']))", env, tmp_path)
    assert cli.returncode == 0, cli.stderr
    table = json.loads(cli.stdout)
    assert table["half_delta"] == {"dtype": "float16", "seed": 0}
    assert set(deltadct.list_methods()) < set(table)  # the built-in ones are all still there
    roundtrip = python(textwrap.dedent("""
        import torch, deltadct
        delta = torch.randn(64, 64) * 1e-3
        method = deltadct.create_method("half_delta", dtype="bfloat16")
        approx = method.reconstruct(method.compress(delta), delta.shape)
        print(float((approx - delta).abs().max() / delta.abs().max()))
    """), env, tmp_path)
    assert roundtrip.returncode == 0, roundtrip.stderr
    assert 0 < float(roundtrip.stdout) <= 2 ** -8  # bfloat16 keeps 8 significant bits


def test_a_broken_plugin_is_one_config_error(tmp_path):
    env = write_plugin(tmp_path, source="raise ImportError('needs libfoo')\n")
    cli = python("import sys; from deltadct.cli import main; sys.exit(main(['methods']))", env, tmp_path)
    assert cli.returncode == 2 and "Traceback" not in cli.stderr
    assert cli.stderr.strip() == ("deltadct: error: method plugin 'half_delta' (deltadct_half_plugin:HalfDelta, "
                                  "entry point group deltadct.methods) does not load: ImportError: needs libfoo")


@pytest.mark.slow
def test_plugin_method_runs_in_deltadct_run_on_the_fast_vit_zoo(tmp_path):
    env = write_plugin(tmp_path)
    store = tmp_path / "records.jsonl"
    run = subprocess.run([sys.executable, "-m", "experiments.run", "model=zoo_vit", "zoo.mode=fast", "tasks=[parity]",
                          "method=half_delta", "eval.vision.max_samples=64", "eval.reconstruction.num_inputs=2",
                          f"store.path={store}", f"hydra.run.dir={tmp_path / 'run'}"],
                         env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reference, record = [json.loads(line) for line in store.read_text().splitlines()]
    assert record["method"] == "half_delta" and record["method_options"] == {"dtype": "float16", "seed": 0}
    # fp16 keeps 11 significant bits of each delta: the model is the fine-tuned one up to rounding
    assert record["metrics"]["reconstruction/rel_error"] < 1e-3
    assert record["score"] == pytest.approx(reference["score"], abs=1 / 64)
    assert 16 < record["bits_per_param"] < 17  # 16 bits per value plus the file's header
