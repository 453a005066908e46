"""CPU time to compress and reconstruct a RoBERTa-base-sized delta: Delta-DCT next to BitDelta.

The delta covers all 12 layers' attention q/k/v/o (768×768) and MLP (3072×768, 768×3072) matrices,
85M fp32 parameters, heavy-tailed with low-rank structure (``synthetic.py``). Each method compresses
every matrix and reconstructs it; times are wall-clock, best of ``--repeats``, on however many
threads torch uses here. Run: ``python benchmarks/bench_core_cpu.py [--layers 12] [--repeats 1]``.
"""
from __future__ import annotations

import argparse
import time

import torch

import deltadct
from synthetic import roberta_base_deltas

METHODS = ("deltadct", "bitdelta")


def time_method(name: str, deltas: dict[str, torch.Tensor], repeats: int) -> tuple[float, float, float]:
    """(compress seconds, reconstruct seconds, mean relative error) over all matrices, best of ``repeats``."""
    best_c = best_r = float("inf")
    for _ in range(repeats):
        method = deltadct.create_method(name)
        start = time.perf_counter()
        packed = {k: method.compress(d, name=k) for k, d in deltas.items()}
        mid = time.perf_counter()
        approx = {k: method.reconstruct(packed[k], d.shape) for k, d in deltas.items()}
        end = time.perf_counter()
        best_c, best_r = min(best_c, mid - start), min(best_r, end - mid)
    errors = [float(torch.linalg.vector_norm(approx[k] - d) / torch.linalg.vector_norm(d)) for k, d in deltas.items()]
    return best_c, best_r, sum(errors) / len(errors)


def wait_for_methods(names, timeout_s: float = 600.0) -> None:
    """BitDelta was written alongside this benchmark: poll until its module imports (and registers)."""
    import importlib

    deadline = time.monotonic() + timeout_s
    for name in names:
        while name not in deltadct.list_methods():
            try:
                importlib.import_module(f"deltadct.methods.{name}")
            except ImportError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"method {name!r} is not registered") from None
                time.sleep(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    wait_for_methods(METHODS)
    deltas = roberta_base_deltas(args.layers)
    params = sum(d.numel() for d in deltas.values())
    print(f"RoBERTa-base-sized delta: {len(deltas)} matrices, {params / 1e6:.1f}M params, fp32, CPU, "
          f"{torch.get_num_threads()} torch threads, torch {torch.__version__}\n")
    rows = {name: time_method(name, deltas, args.repeats) for name in METHODS}
    print("| method | compress (s) | reconstruct (s) | mean rel. error |")
    print("|---|---:|---:|---:|")
    for name, (c, r, e) in rows.items():
        print(f"| {name} | {c:.2f} | {r:.2f} | {e:.4f} |")
    (dc, dr, _), (bc, br, _) = rows["deltadct"], rows["bitdelta"]
    print(f"| deltadct / bitdelta | {dc / bc:.2f}× | {dr / br:.2f}× | |")


if __name__ == "__main__":
    main()
