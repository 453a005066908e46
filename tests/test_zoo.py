"""The offline zoo: fast zoos build, load through each family's normal loader, and hold real,
reproducible fine-tuning deltas whose fine-tuned models beat their bases."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from experiments.zoo import FAMILIES, ZooError, build_zoo, main
from experiments.config import ZOO_DEVICES
from experiments.zoo.common import DEVICES, ZooDataError, base_like_state, cache_root, read_manifest, zoo_dir
from experiments.zoo.glue import GLUE_TASKS, read_tsv


@pytest.fixture(scope="session")
def zoo_cache() -> Path:
    """The cache every test file shares ($DELTADCT_CACHE or ~/.cache/deltadct), so each fast zoo is built
    once per machine; a zoo of an older recipe there is rebuilt, and building from nothing is tested by
    test_incomplete_zoo_is_rebuilt_bit_identical."""
    return cache_root()


@pytest.fixture(scope="session")
def fast_zoo(zoo_cache):
    built = {}

    def get(family: str):
        if family not in built:
            built[family] = build_zoo(family, "fast", cache_dir=zoo_cache, progress=False)
        return built[family]

    return get


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def assert_differs_from_base(entry) -> None:
    base = tensors(entry.base_path)
    for task in entry.tasks.values():
        ft = tensors(task.path)
        reference = base_like_state(ft, base)
        changed = [k for k in ft if not torch.equal(ft[k], reference[k])]
        assert len(changed) > len(ft) // 2, f"{task.name}: fine-tuning changed only {changed}"


@pytest.mark.parametrize("family", FAMILIES)
def test_manifest_matches_entry_and_files(fast_zoo, family):
    entry = fast_zoo(family)
    manifest = json.loads((entry.root / "zoo.json").read_text())
    assert manifest["family"] == family and manifest["mode"] == "fast"
    assert entry.root.name == f"{family}-fast-s0"
    for name, task in entry.tasks.items():
        assert manifest["tasks"][name]["path"] == f"tasks/{name}"  # relative: the cache can move
        assert np.isfinite(task.finetuned_score) and np.isfinite(task.base_score)
    assert read_manifest(entry.root) == entry


def test_vit_loads_with_timm_and_beats_base(fast_zoo):
    import timm

    entry = fast_zoo("vit")
    assert len(entry.tasks) >= 4
    base = timm.create_model(f"local-dir:{entry.base_path}", pretrained=True)
    assert base.pretrained_cfg["input_size"] == (1, 8, 8)
    assert_differs_from_base(entry)
    for task in entry.tasks.values():
        model = timm.create_model(f"local-dir:{task.path}", pretrained=True).eval()
        assert torch.equal(model.head.weight, tensors(task.path)["head.weight"])
        # Score the PNG folder independently, through timm's own eval transform.
        transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
        pngs = sorted(Path(task.data["root"]).glob("*/*.png"))
        x = torch.stack([transform(Image.open(p)) for p in pngs])
        y = torch.tensor([int(p.parent.name) for p in pngs])
        with torch.no_grad():
            acc = float((model(x).argmax(-1) == y).float().mean())
        assert acc == pytest.approx(task.finetuned_score, abs=1e-6)
        assert task.finetuned_score > task.base_score + 0.15, task


def test_minilm_loads_with_transformers_and_sst2_beats_base(fast_zoo):
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    entry = fast_zoo("minilm")
    assert set(entry.tasks) == {"sst2", "cola", "rte"}  # fast mode; full mode has all eight
    AutoModel.from_pretrained(entry.base_path)
    AutoTokenizer.from_pretrained(entry.base_path)
    sst2 = entry.tasks["sst2"]
    model = AutoModelForSequenceClassification.from_pretrained(sst2.path)
    assert model.config.num_labels == 2
    assert "bert.encoder.layer.0.attention.self.query.weight" in tensors(sst2.path)
    assert "encoder.layer.0.attention.self.query.weight" in tensors(entry.base_path)  # no bert. prefix
    assert_differs_from_base(entry)
    assert sst2.metric == "accuracy" and entry.tasks["cola"].metric == "matthews_correlation"
    examples = read_tsv(Path(sst2.data["data_dir"]) / "sst2" / "validation.tsv", GLUE_TASKS["sst2"])
    assert len(examples) == sst2.data["num_examples"]
    assert sst2.finetuned_score > sst2.base_score + 0.05


def test_t5_loads_and_generates_label_words(fast_zoo):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    entry = fast_zoo("t5")
    tokenizer = AutoTokenizer.from_pretrained(entry.base_path)
    assert tokenizer.decode(tokenizer("not_entailment", add_special_tokens=False)["input_ids"]) == "not_entailment"
    assert_differs_from_base(entry)
    model = AutoModelForSeq2SeqLM.from_pretrained(entry.tasks["sst2"].path)
    assert model.config.d_model == 128
    # The base was never taught label words, so it scores no better than the fine-tuned model.
    for task in entry.tasks.values():
        assert task.finetuned_score >= task.base_score
    # A real gap on SST-2: the fine-tune beats always answering the majority class, not just the base.
    sst2 = entry.tasks["sst2"]
    labels = [ex["label"] for ex in read_tsv(Path(sst2.data["data_dir"]) / "sst2" / "validation.tsv",
                                             GLUE_TASKS["sst2"])]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert sst2.finetuned_score > majority + 0.1, (sst2.finetuned_score, majority)


def test_gpt_loads_and_lm_eval_task_loads(fast_zoo):
    from transformers import AutoModelForCausalLM

    entry = fast_zoo("gpt")
    assert_differs_from_base(entry)
    sst2 = entry.tasks["sst2"]
    # the fine-tune learned SST-2 (CoLA, as for MiniLM, is beyond a model this small and this fast)
    assert sst2.finetuned_score > sst2.base_score + 0.1
    AutoModelForCausalLM.from_pretrained(sst2.path)
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(sst2.data["include_path"]))
    assert sst2.data["task"] in manager.all_tasks
    docs = manager.load_task_or_group([sst2.data["task"]])[sst2.data["task"]]
    assert len(list(docs.validation_docs())) == sst2.data["num_examples"]


def test_zoo_of_another_recipe_is_stale(fast_zoo):
    """A cached zoo built with another training recipe (RECIPE_VERSION) is not reused."""
    entry = fast_zoo("vit")
    assert read_manifest(entry.root, recipe_version=1) == entry
    assert read_manifest(entry.root, recipe_version=2) is None


def test_second_call_is_cached(fast_zoo, zoo_cache):
    entry = fast_zoo("vit")
    mtime = (entry.root / "zoo.json").stat().st_mtime_ns
    assert build_zoo("vit", "fast", cache_dir=zoo_cache, progress=False) == entry
    assert (entry.root / "zoo.json").stat().st_mtime_ns == mtime


def test_incomplete_zoo_is_rebuilt_bit_identical(fast_zoo, tmp_path):
    """A zoo missing a file is rebuilt, and the same seed reproduces every weight exactly."""
    import shutil

    first = fast_zoo("vit")
    shutil.copytree(first.root, tmp_path / "zoo" / "vit-fast-s0")
    (tmp_path / "zoo" / "vit-fast-s0" / "tasks" / "parity" / "model.safetensors").unlink()
    assert read_manifest(tmp_path / "zoo" / "vit-fast-s0") is None
    again = build_zoo("vit", "fast", cache_dir=tmp_path, progress=False)
    pairs = [(first.base_path, again.base_path)] + [(t.path, again.tasks[n].path) for n, t in first.tasks.items()]
    for a, b in pairs:
        ta, tb = tensors(a), tensors(b)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), b
    assert [t.finetuned_score for t in again.tasks.values()] == [t.finetuned_score for t in first.tasks.values()]


@pytest.mark.parametrize("family", ["t5", "gpt"])
def test_trained_tokenizer_is_the_same_in_another_process(fast_zoo, family, tmp_path):
    """The text zoos train their tokenizers; a fresh process must train the very same one, or a rebuilt
    zoo gets other token ids (SentencePiece's Unigram trainer failed this, hence BPE for T5)."""
    import subprocess
    import sys

    script = (f"import sys; from experiments.zoo import {family} as f; from experiments.zoo.glue import "
              f"pretraining_sentences; f.train_tokenizer(pretraining_sentences()).save_pretrained(sys.argv[1])")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=300)
    fresh, built = (json.loads((d / "tokenizer.json").read_text()) for d in (tmp_path, fast_zoo(family).base_path))
    # everything that decides token ids (the zoo's file also records the truncation it last ran with)
    for part in ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor"):
        assert fresh[part] == built[part], part


def test_t5_tokenizer_depends_only_on_the_zoos_own_tasks(monkeypatch):
    """The MiniLM zoo's tasks (MRPC, MNLI, ...) joined GLUE_TASKS after the T5 zoos of this recipe were
    built; their label words must not enter the T5 tokenizer, or every rebuilt T5 zoo differs."""
    from experiments.zoo import glue, t5

    sentences = glue.pretraining_sentences()[:300]
    before = json.loads(t5.train_tokenizer(sentences).backend_tokenizer.to_str())["model"]
    extra = glue.GlueTask("extra", ("sentence",), "accuracy", ("zyzzyva", "quokka"))
    monkeypatch.setitem(glue.GLUE_TASKS, "extra", extra)
    after = json.loads(t5.train_tokenizer(sentences).backend_tokenizer.to_str())["model"]
    assert after == before and "▁zyzzyva" not in after["vocab"]


def test_missing_glue_data_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTADCT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ZooDataError, match=r"GLUE sst2 train data not found: no file .*nowhere/glue/sst2/train.tsv"):
        build_zoo("minilm", "fast", cache_dir=tmp_path, progress=False)
    assert not (tmp_path / "zoo" / "minilm-fast-s0").exists()  # no half zoo left behind
    assert main(["--cache-dir", str(tmp_path), "build", "gpt", "--quiet"]) == 1


def test_unknown_family_and_mode():
    with pytest.raises(ZooError, match="unknown zoo family 'bert'"):
        build_zoo("bert")
    with pytest.raises(ZooError, match="unknown zoo mode 'slow'"):
        build_zoo("vit", mode="slow")


def test_zoo_device_is_checked_and_names_its_own_cache_dir(tmp_path):
    """A GPU-built zoo is another zoo: its own dir; a CPU-only recipe or a missing GPU is a clear error,
    and nothing is left in the cache."""
    assert zoo_dir("minilm", "full", 2, tmp_path).name == "minilm-full-s2"
    assert zoo_dir("minilm", "full", 2, tmp_path, device="cuda").name == "minilm-full-s2-cuda"
    assert ZOO_DEVICES == DEVICES  # run configs are validated against the builders' list
    with pytest.raises(ZooError, match="the vit zoo cannot be built on 'cuda': its recipe trains on cpu"):
        build_zoo("vit", "fast", cache_dir=tmp_path, device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ZooError, match="zoo device 'cuda' was asked for but torch sees none"):
            build_zoo("minilm", "fast", cache_dir=tmp_path, device="cuda")
    assert not (tmp_path / "zoo").exists() or not any((tmp_path / "zoo").iterdir())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_minilm_zoo_rebuilds_bit_identical(tmp_path):
    """Deterministic CUDA build (fixed cuBLAS workspace, math attention kernel): two builds, same bytes."""
    first = build_zoo("minilm", "fast", cache_dir=tmp_path / "a", progress=False, device="cuda")
    second = build_zoo("minilm", "fast", cache_dir=tmp_path / "b", progress=False, device="cuda")
    assert first.root.name == "minilm-fast-s0-cuda"
    for task in first.tasks:
        a = load_file(first.tasks[task].path / "model.safetensors")
        b = load_file(second.tasks[task].path / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_list_prints_scores(fast_zoo, zoo_cache, capsys):
    entry = fast_zoo("vit")
    assert main(["--cache-dir", str(zoo_cache), "list"]) == 0
    out = capsys.readouterr().out
    assert "vit-fast-s0" in out and f"fine-tuned {entry.tasks['digits'].finetuned_score:7.4f}" in out
