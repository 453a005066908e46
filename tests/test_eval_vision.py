"""Vision evaluator on the zoo's timm ViT checkpoints, a CLIP-style zero-shot head, and bad inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from deltadct.adapters import get_adapter
from eval import EvalContext, EvalError, get_evaluator
from eval_zoo import fast_zoo, zero_reconstruction


@pytest.fixture(scope="module")
def vit():
    return fast_zoo("vit")


def vision(**options):
    return get_evaluator("vision")(progress=False, **options)


def context(task):
    return EvalContext(task.name, task.data, get_adapter("timm_vit").load_processor(task.path), "timm_vit")


def test_reproduces_the_zoo_accuracies(vit):
    adapter = get_adapter("timm_vit")
    for task in vit.tasks.values():
        metrics = vision().evaluate(adapter.load(task.path), context(task))
        assert metrics["accuracy"] == pytest.approx(task.finetuned_score, abs=1e-6), task.name
        assert metrics["score"] == metrics["accuracy"]
    parity = vit.tasks["parity"]  # the `zero` reconstruction: base body + fine-tuned head
    base = vision().evaluate(zero_reconstruction("timm_vit", "vit", "parity"), context(parity))
    assert base["accuracy"] == pytest.approx(parity.base_score, abs=1e-6)


def folder_images(root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The folder's images normalised by hand ((x/255 − 0.5)/0.5, the zoo's preprocessing) and labels."""
    classes = sorted(p.name for p in root.iterdir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            images.append(np.asarray(Image.open(file), dtype=np.float32))
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).unsqueeze(1) / 255.0
    return (x - 0.5) / 0.5, torch.tensor(labels)


def test_zero_shot_head_matches_a_hand_computation(vit, tmp_path):
    task = vit.tasks["digits"]
    model = get_adapter("timm_vit").load(task.path)
    x, y = folder_images(Path(task.data["root"]))
    with torch.no_grad():
        features = F.normalize(model.forward_head(model.forward_features(x), pre_logits=True), dim=-1)
    # a synthetic class-embedding head: noisy class centroids of the features
    g = torch.Generator().manual_seed(0)
    head = torch.stack([features[y == c].mean(0) for c in range(10)]) + 0.05 * torch.randn(10, features.shape[1],
                                                                                           generator=g)
    expected = float(((features @ F.normalize(head, dim=-1).T).argmax(-1) == y).float().mean())
    save_file({"head": head}, tmp_path / "head.safetensors")
    metrics = vision().evaluate(model, EvalContext("digits", {**task.data, "head": tmp_path / "head.safetensors"},
                                                   context(task).processor))
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0.5  # the centroids really classify (chance is 0.1)

    torch.save(head[:4], tmp_path / "head4.pt")
    with pytest.raises(EvalError, match="predicts 4 classes but the data of task 'digits' has 10"):
        vision().evaluate(model, EvalContext("digits", {**task.data, "head": tmp_path / "head4.pt"},
                                             context(task).processor))
    torch.save(torch.zeros(10, 7), tmp_path / "head7.pt")
    with pytest.raises(EvalError, match="features have dim .* head .* has dim 7"):
        vision().evaluate(model, EvalContext("digits", {**task.data, "head": tmp_path / "head7.pt"},
                                             context(task).processor))


def test_zero_shot_head_in_the_projection_space(vit, tmp_path):
    """A head as wide as the model's own head output scores the projected embedding, as for timm's
    CLIP towers (their ``head`` is CLIP's image projection, the text embeddings' width)."""
    task = vit.tasks["digits"]
    model = get_adapter("timm_vit").load(task.path)
    x, y = folder_images(Path(task.data["root"]))
    with torch.no_grad():
        projected = F.normalize(model(x), dim=-1)  # [N, 10]: this toy model's "projection" is its classifier
    assert model.num_classes != model.num_features
    g = torch.Generator().manual_seed(1)
    head = torch.stack([projected[y == c].mean(0) for c in range(10)]) + 0.05 * torch.randn(10, 10, generator=g)
    expected = float(((projected @ F.normalize(head, dim=-1).T).argmax(-1) == y).float().mean())
    save_file({"head": head}, tmp_path / "head.safetensors")
    metrics = vision().evaluate(model, EvalContext("digits", {**task.data, "head": tmp_path / "head.safetensors"},
                                                   context(task).processor))
    assert metrics["accuracy"] == pytest.approx(expected, abs=1e-6)
    assert expected > 0.5


def test_bad_inputs(vit, tmp_path):
    digits, parity = vit.tasks["digits"], vit.tasks["parity"]
    model = get_adapter("timm_vit").load(digits.path)
    with pytest.raises(EvalError, match="predicts 10 classes but the data of task 'parity' has 2"):
        vision().evaluate(model, context(parity))
    with pytest.raises(EvalError, match="image folder .*nope does not exist"):
        vision().evaluate(model, EvalContext("x", {"kind": "imagefolder", "root": tmp_path / "nope"},
                                             context(digits).processor))
    with pytest.raises(EvalError, match="needs an image transform"):
        vision().evaluate(model, EvalContext("digits", digits.data))
    with pytest.raises(EvalError, match="data kind 'webdataset' is not supported"):
        vision().evaluate(model, EvalContext("digits", {"kind": "webdataset"}, context(digits).processor))


def test_hf_image_classifier_on_an_image_folder(tmp_path):
    """The hf_vit path: AutoImageProcessor + AutoModelForImageClassification, RGB images, sorted classes.
    Images are filed under the class the model predicts for them, one deliberately in a wrong folder."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=3)).eval()
    adapter = get_adapter("hf_vit")
    processor = ViTImageProcessor(size={"height": 8, "width": 8})
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(30)]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values=pixels).logits
        model.classifier.bias.sub_(logits.mean(0))  # centre the random model's logits: all classes predicted
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    path = adapter.save(model, tmp_path / "ft")
    processor.save_pretrained(path)
    processor = adapter.load_processor(path)
    names = ["ants", "bees", "cats"]  # sorted folder names = class ids
    assert set(predicted.tolist()) == {0, 1, 2}
    for i, (img, label) in enumerate(zip(images, predicted.tolist(), strict=True)):
        folder = names[(label + 1) % 3] if i == 0 else names[label]
        (tmp_path / "val" / folder).mkdir(parents=True, exist_ok=True)
        img.save(tmp_path / "val" / folder / f"{i}.png")
    loaded = adapter.load_with_state_dict(path, dict(model.state_dict()))
    ctx = EvalContext("toy", {"kind": "imagefolder", "root": tmp_path / "val"}, processor, "hf_vit")
    assert vision().evaluate(loaded, ctx)["accuracy"] == pytest.approx(29 / 30, abs=1e-12)
