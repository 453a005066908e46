"""Compression time of the GPTQ-based methods on a model-shaped delta, on the CPU or a GPU.

The delta has RoBERTa-base's weight shapes (12 layers × q/k/v/o 768×768, up 3072×768, down 768×3072;
``--model llama7b``: Llama-2-7B's seven projections per layer), heavy-tailed like a real fine-tuning
delta (``bench_shapes.synthetic_delta``). Each matrix gets the Hessian H = 2·XᵀX/n of ``--tokens``
synthetic calibration inputs with unequal, correlated features (built before timing starts:
collecting Hessians is a forward pass of the model, not the method). For each method the table gives
the total ``compress`` time over all matrices, the time per matrix, ``reconstruct`` time, payload
bits/param, the relative weight error and the relative output error ‖(Δ̂ − Δ)X‖ / ‖ΔX‖ on the
calibration inputs; the data-free methods of the same size are timed alongside for reference.

    python benchmarks/bench_gptq.py --threads 1 --out results/benchmarks/cpu-gptq.md
    python benchmarks/bench_gptq.py --layers 2          # a quick look
    python benchmarks/bench_gptq.py --model llama7b --layers 1 --device cuda --tokens 2048

On CUDA each method's matrices are timed with the device synchronised before and after.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from bench_shapes import MODELS, synthetic_delta
from deltadct.gptq import hessian
from deltadct.methods import create_method

#: (label, registered method, config): the calibrated methods, then the data-free ones they are compared with
METHODS = [
    ("delta_come (GPTQ, 8/3/2 bits)", "delta_come", {}),
    ("deltazip (2:4 + 2-bit GPTQ)", "deltazip", {}),
    ("delta_come_rtn (data-free)", "delta_come_rtn", {}),
    ("rtn 2-bit g128 (data-free)", "rtn", {}),
    ("bitdelta (data-free)", "bitdelta", {}),
]


def calibration_inputs(features: int, tokens: int, seed: int) -> torch.Tensor:
    """(tokens, features) inputs with log-spread feature scales and a shared random mixing."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(features) + torch.randn(features, features, generator=gen) / features ** 0.5
    return (torch.randn(tokens, features, generator=gen) @ mix) * torch.logspace(-1, 0.5, features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="roberta")
    parser.add_argument("--layers", type=int, help="layers (default: all of the model's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tokens", type=int, default=1024, help="calibration inputs per matrix")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    layers, shapes = MODELS[args.model]
    layers = args.layers or layers
    inputs = {n: calibration_inputs(n, args.tokens, seed=n).to(device) for n in {shape[1] for _, shape in shapes}}
    hessians = {n: hessian(x.T @ x, len(x)) for n, x in inputs.items()}
    deltas = [(f"layer.{i}.{name}", synthetic_delta(shape, seed=i * 10 + j, device=device).float())
              for i in range(layers) for j, (name, shape) in enumerate(shapes)]
    numel = sum(d.numel() for _, d in deltas)

    rows = []
    for label, name, cfg in METHODS:
        method = create_method(name, cfg)
        packed, compress_s = [], 0.0
        for key, delta in deltas:
            extra = {"hessian": hessians[delta.shape[1]]} if method.needs_calibration else {}
            sync()
            start = time.perf_counter()
            packed.append(method.compress(delta, name=key, **extra))
            sync()
            compress_s += time.perf_counter() - start
        start = time.perf_counter()
        approx = [method.reconstruct(p, d.shape) for p, (_, d) in zip(packed, deltas, strict=True)]
        sync()
        reconstruct_s = time.perf_counter() - start
        err = sum(float((a - d).square().sum()) for a, (_, d) in zip(approx, deltas, strict=True))
        ref = sum(float(d.square().sum()) for _, d in deltas)
        out_err = sum(float(((a - d) @ inputs[d.shape[1]].T).square().sum())
                      for a, (_, d) in zip(approx, deltas, strict=True))
        out_ref = sum(float((d @ inputs[d.shape[1]].T).square().sum()) for _, d in deltas)
        bits = sum(p.payload_bytes for p in packed) * 8 / numel
        rows.append((label, compress_s, compress_s / len(deltas), reconstruct_s, bits, (err / ref) ** 0.5,
                     (out_err / out_ref) ** 0.5))
        print(f"{label}: {compress_s:.1f} s", file=sys.stderr)

    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{platform.processor() or platform.machine()}, {args.threads} torch thread(s)")
    lines = [f"# GPTQ-based methods on a {args.model}-shaped delta, {device.type.upper()} ({layers} layers, "
             f"{len(deltas)} matrices, {numel / 1e6:.1f} M parameters)", "",
             f"{where}, torch {torch.__version__}; "
             f"Hessians of {args.tokens} synthetic calibration inputs per matrix, built before timing.", "",
             "| method | compress (s) | per matrix (s) | reconstruct (s) | payload bits/param | rel. weight error | "
             "rel. output error |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.3f} | {r[5]:.4f} | {r[6]:.4f} |" for r in rows]
    lines += ["", "Command: `python benchmarks/bench_gptq.py " + " ".join(sys.argv[1:]) + "`"]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)


if __name__ == "__main__":
    main()
