"""ViT family (timm): a small VisionTransformer on scikit-learn's real 8x8 handwritten digits.

The base is pre-trained to tell apart the digits 0-4 only (a 5-way head) on one part of the
images; each task fully fine-tunes it, with a new head, on other images for a different labelling.
The base never saw the digits 5-9, nor rotated digits, so fine-tuning clearly beats it.
Checkpoints are timm hub-format dirs (``config.json`` + ``model.safetensors``) that load with
``timm.create_model("local-dir:<dir>", pretrained=True)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits

from experiments.zoo.common import ZooEntry, ZooTask, base_like_state, batch_indices, deterministic, train_loop

ARCHITECTURE = "vit_tiny_patch16_224"
# Multiples of 64 for embed and MLP dims, so every Delta-DCT patch size 8..64 divides them.
MODEL_ARGS = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)
MEAN, STD = (0.5,), (0.5,)
DATA_CONFIG = dict(input_size=(1, 8, 8), mean=MEAN, std=STD, interpolation="bilinear", crop_pct=1.0)
PRETRAIN_CLASSES = 5  # the base learns digits 0-4 only
SPLIT_SEED = 0  # the image split is fixed; the zoo seed only changes initialisation and batch order
STEPS = {  # (pre-training steps, fine-tuning steps per task)
    "fast": (120, 60),
    "full": (1500, 500),
}
BATCH = 64


@dataclass(frozen=True)
class VisionTask:
    name: str
    num_classes: int
    label: Callable[[np.ndarray], np.ndarray]  # digit -> task label
    transform: Callable[[np.ndarray], np.ndarray] = lambda images: images  # (N, 8, 8) uint8 -> same


TASKS = (
    VisionTask("digits", 10, lambda d: d),
    VisionTask("parity", 2, lambda d: d % 2),
    VisionTask("geq5", 2, lambda d: (d >= 5).astype(np.int64)),
    VisionTask("rotated", 10, lambda d: d, lambda images: np.rot90(images, k=1, axes=(1, 2)).copy()),
)


def digit_images() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as uint8 images (exactly what the PNG files hold) and their digits."""
    digits = load_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return images, digits.target.astype(np.int64)


def splits(n: int) -> dict[str, np.ndarray]:
    """Fixed disjoint index sets: 40% pre-training, 35% fine-tuning, 25% validation."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    a, b = int(0.40 * n), int(0.75 * n)
    return {"pretrain": perm[:a], "finetune": perm[a:b], "val": perm[b:]}


def training_images(task_name: str) -> np.ndarray:
    """The uint8 images (N, 8, 8) a task was fine-tuned on, as its model saw them (calibration data)."""
    task = {t.name: t for t in TASKS}[task_name]
    images, digits = digit_images()
    return task.transform(images[splits(len(digits))["finetune"]])


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 8, 8) -> normalised float (N, 1, 8, 8), the same as timm's eval transform."""
    x = torch.from_numpy(images).float().div(255.0).unsqueeze(1)
    return (x - MEAN[0]) / STD[0]


def create(num_classes: int) -> torch.nn.Module:
    return timm.create_model(ARCHITECTURE, pretrained=False, num_classes=num_classes, **MODEL_ARGS)


def fit(model, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int, desc: str, progress: bool):
    def loss(step: int) -> torch.Tensor:
        idx = torch.from_numpy(batch_indices(len(y), BATCH, step, seed))
        return F.cross_entropy(model(x[idx]), y[idx])

    train_loop(model, loss, steps, lr, desc, progress, weight_decay=0.05)


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def save(model, path: Path) -> None:
    # The tag replaces the ImageNet tag timm copies from the architecture's default config.
    timm.models.save_for_hf(model, str(path), model_config={"pretrained_cfg": {"tag": "deltadct_zoo"}},
                            safe_serialization=True, data_config=DATA_CONFIG)


def write_image_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """``root/<label>/<i>.png`` grayscale files; label folder names sort in label order (< 10 classes
    per digit count, and "0".."9" sort numerically)."""
    for i, (img, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / str(int(label))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")


def build(out: Path, *, mode: str, seed: int, progress: bool, final: Path) -> ZooEntry:
    pre_steps, ft_steps = STEPS[mode]
    images, digits = digit_images()
    idx = splits(len(digits))

    with deterministic(seed):
        pre = idx["pretrain"][digits[idx["pretrain"]] < PRETRAIN_CLASSES]
        base = create(PRETRAIN_CLASSES)
        fit(base, to_tensor(images[pre]), torch.from_numpy(digits[pre]), pre_steps, 1e-3, seed,
            "vit: pre-train base", progress)
        save(base, out / "base")
        base_state = base.state_dict()

        tasks = {}
        for t_i, task in enumerate(TASKS):
            torch.manual_seed(seed * 1000 + t_i)
            x_tr = to_tensor(task.transform(images[idx["finetune"]]))
            y_tr = torch.from_numpy(task.label(digits[idx["finetune"]]))
            val_images = task.transform(images[idx["val"]])
            x_va, y_va = to_tensor(val_images), torch.from_numpy(task.label(digits[idx["val"]]))

            model = create(task.num_classes)
            model.load_state_dict(base_like_state(model.state_dict(), base_state))  # base body, new head
            fit(model, x_tr, y_tr, ft_steps, 5e-4, seed + t_i + 1, f"vit: fine-tune {task.name}", progress)
            path = out / "tasks" / task.name
            save(model, path)

            reference = create(task.num_classes)
            reference.load_state_dict(base_like_state(model.state_dict(), base_state))
            val_root = out / "data" / task.name / "val"
            write_image_folder(val_root, val_images, y_va.numpy())
            tasks[task.name] = ZooTask(
                name=task.name, path=path, metric="accuracy",
                finetuned_score=accuracy(model, x_va, y_va), base_score=accuracy(reference, x_va, y_va),
                data={"kind": "imagefolder", "root": val_root, "num_classes": task.num_classes,
                      "image_mode": "L", "input_size": list(DATA_CONFIG["input_size"]),
                      "mean": list(MEAN), "std": list(STD)},
            )
    return ZooEntry("vit", mode, seed, out / "base", tasks, out)
