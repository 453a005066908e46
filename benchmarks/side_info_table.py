"""Side information of Delta-DCT: fp16 min/max (the paper) against log-scale codes at 5/6/7 bits.

For each encoding, prints the measured bits/param of the compressed file (in memory, header
included) and the mean relative L2 error over the compressed matrices, on

* a real fine-tuning delta: the zoo's MiniLM pair when it is already built (``build_zoo("minilm",
  "fast")``), else the digits-MLP fine-tuning of ``tests/conftest.py``;
* the RoBERTa-base-sized synthetic stack of ``synthetic.py`` (``--layers`` of its 12 layers).

Run: ``python benchmarks/side_info_table.py [--layers 2] [--real auto|minilm|digits]``.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import deltadct
from synthetic import roberta_base_deltas

ENCODINGS = {"fp16 (paper)": dict(range_encoding="fp16"), "log 5-bit": dict(range_encoding="log", range_bits=5),
             "log 6-bit (default)": dict(range_encoding="log", range_bits=6),
             "log 7-bit": dict(range_encoding="log", range_bits=7)}
REPO = Path(__file__).resolve().parents[1]


def measure(base: Path, finetuned: Path, options: dict, policy: dict) -> tuple[float, float]:
    dfile = deltadct.compress(base, finetuned, progress=False, policy=policy, **options)
    info = dfile.info()
    errors = [layer["rel_error"] for layer in info["layers"].values()]
    return info["bits_per_param"], sum(errors) / len(errors)


def real_pair(choice: str, workdir: Path) -> tuple[str, Path, Path, dict]:
    if choice in ("auto", "minilm"):
        from experiments.zoo import build_zoo, zoo_policy
        from experiments.zoo.common import read_manifest, zoo_dir

        if choice == "minilm" or read_manifest(zoo_dir("minilm", "fast", 0)) is not None:
            entry = build_zoo("minilm", "fast", progress=False)
            task = next(iter(entry.tasks.values()))
            return f"MiniLM zoo, task {task.name}", entry.base_path, task.path, zoo_policy("minilm")
    spec = importlib.util.spec_from_file_location("deltadct_tests_conftest", REPO / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    base, finetuned = conftest.train_digits_pair()
    save_file(base, workdir / "base.safetensors")
    save_file(finetuned, workdir / "finetuned.safetensors")
    return "digits MLP (tests/conftest.py)", workdir / "base.safetensors", workdir / "finetuned.safetensors", {}


def synthetic_pair(layers: int, workdir: Path) -> tuple[str, Path, Path, dict]:
    deltas = roberta_base_deltas(layers)
    gen = torch.Generator().manual_seed(1)
    base = {k: torch.randn(d.shape, generator=gen) * 0.02 for k, d in deltas.items()}
    save_file(base, workdir / "syn_base.safetensors")
    save_file({k: base[k] + d for k, d in deltas.items()}, workdir / "syn_ft.safetensors")
    params = sum(d.numel() for d in deltas.values())
    return (f"RoBERTa-sized synthetic, {layers} layer(s), {params / 1e6:.1f}M params",
            workdir / "syn_base.safetensors", workdir / "syn_ft.safetensors", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--real", choices=("auto", "minilm", "digits"), default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pairs = [real_pair(args.real, tmp), synthetic_pair(args.layers, tmp)]
        print("| side information | " + " | ".join(f"{label}: bits/param | rel. error" for label, *_ in pairs) + " |")
        print("|---|" + "---:|---:|" * len(pairs))
        for name, options in ENCODINGS.items():
            cells = []
            for _, base, finetuned, policy in pairs:
                bits, err = measure(base, finetuned, options, policy)
                cells += [f"{bits:.4f}", f"{err:.4f}"]
            print(f"| {name} | " + " | ".join(cells) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
