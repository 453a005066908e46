"""Speed and memory of the compression methods on synthetic deltas with real model shapes.

Deltas have the exact weight shapes of Llama-2-7B (per layer: q/k/v/o 4096×4096, gate/up
11008×4096, down 4096×11008; 32 layers) or RoBERTa-base (per layer: q/k/v/o 768×768, up 3072×768,
down 768×3072; 12 layers), stored in bf16 like a real fine-tuning delta, and heavy-tailed like one:
Student-t (3 degrees of freedom) noise plus a rank-8 component. They are generated on the target
device before timing starts, so the numbers are the codec's, not the disk's.

For each method it times ``compress`` (bf16 → fp32 conversion, transform, quantisation and bit
packing included) and ``reconstruct`` over every matrix, best of ``--repeats`` passes, and reports
throughput in GB of bf16 delta per second, peak extra memory, payload bits per parameter and the
time relative to BitDelta. Methods not registered (yet) are skipped with a note.

    python benchmarks/bench_shapes.py --device cuda --model llama7b
    python benchmarks/bench_shapes.py --device cpu --model roberta --threads 2
    python benchmarks/bench_shapes.py --device cpu --model llama7b --layers 1

Writes the Markdown table to ``results/benchmarks/<device>-<model>.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from deltadct import codec
from deltadct.profiling import PeakMemory
from deltadct.methods import create_method, list_methods

MODELS = {
    # name: (layers, [(tensor name, (out, in)), ...] per layer)
    "llama7b": (32, [("q_proj", (4096, 4096)), ("k_proj", (4096, 4096)), ("v_proj", (4096, 4096)),
                     ("o_proj", (4096, 4096)), ("gate_proj", (11008, 4096)), ("up_proj", (11008, 4096)),
                     ("down_proj", (4096, 11008))]),
    "roberta": (12, [("query", (768, 768)), ("key", (768, 768)), ("value", (768, 768)),
                     ("attention.output", (768, 768)), ("intermediate", (3072, 768)), ("output", (768, 3072))]),
}

#: (label, registered method name, config) in table order; BitDelta is the reference for the ratios
METHODS = [
    ("deltadct p=8", "deltadct", {"patch_size": 8}),
    ("deltadct p=16", "deltadct", {"patch_size": 16}),
    ("deltadct p=32", "deltadct", {"patch_size": 32}),
    ("bitdelta", "bitdelta", {}),
    ("delta_come_rtn", "delta_come_rtn", {}),
    ("lowrank", "lowrank", {}),
]
#: on CUDA, Delta-DCT p=16 again down the slower code paths (deltadct.codec switches), same bytes
CUDA_PATHS = [
    ("deltadct p=16 fused-eager", {"use_cuda_graphs": False}),
    ("deltadct p=16 torch-ops", {"use_cuda_graphs": False, "use_fused_kernels": False}),
]
REFERENCE = "bitdelta"


def synthetic_delta(shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    """Heavy-tailed bf16 delta: Student-t(3) · 1e-3 plus a rank-8 part of comparable energy."""
    gen = torch.Generator(device=device).manual_seed(seed)
    m, n = shape
    z = torch.randn(shape, generator=gen, device=device)
    chi2 = torch.randn((3, m, n), generator=gen, device=device).square_().sum(0)
    delta = z.mul_(torch.rsqrt(chi2.div_(3.0).clamp_(min=1e-6))).mul_(1e-3)
    del chi2
    rank = 8
    a = torch.randn((m, rank), generator=gen, device=device)
    b = torch.randn((rank, n), generator=gen, device=device)
    delta.addmm_(a, b, alpha=1e-3 / math.sqrt(rank))
    return delta.to(torch.bfloat16)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_extra_memory(device: torch.device):
    """Yields a dict that receives ``extra``: peak bytes above the start (CUDA allocator, else process RSS)."""
    out: dict[str, int] = {}
    with PeakMemory(device, interval=0.005) as memory:
        yield out
    out["extra"] = memory.cuda_extra_bytes if device.type == "cuda" else memory.extra_rss_bytes


@dataclass
class Result:
    label: str
    compress_s: float
    reconstruct_s: float
    compress_cpu_s: float
    reconstruct_cpu_s: float
    peak_bytes: int
    bits_per_param: float
    rel_error: float


@contextlib.contextmanager
def codec_switches(switches: dict[str, bool]):
    saved = {k: getattr(codec, k) for k in switches}
    for k, v in switches.items():
        setattr(codec, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(codec, k, v)


def run_method(label: str, name: str, cfg: dict, deltas: list[tuple[str, torch.Tensor]],
               device: torch.device, repeats: int) -> Result:
    method = create_method(name, cfg)
    # warm-up on the first layer's shapes: kernel selection, caches, lazy imports stay out of the timings
    warm = {tuple(d.shape): d for _, d in deltas}
    for d in warm.values():
        method.reconstruct(method.compress(d.float(), name="warmup"), tuple(d.shape))
    synchronize(device)

    best_c = best_r = best_cc = best_rc = math.inf
    peak = 0
    packed = []
    for _ in range(repeats):
        packed = []
        with peak_extra_memory(device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            for tname, d in deltas:
                packed.append(method.compress(d.float(), name=tname))
            synchronize(device)
            t1, c1 = time.perf_counter(), time.process_time()
            for (_, d), comp in zip(deltas, packed, strict=True):
                method.reconstruct(comp, tuple(d.shape))
            synchronize(device)
            t2, c2 = time.perf_counter(), time.process_time()
        best_c, best_r = min(best_c, t1 - t0), min(best_r, t2 - t1)
        best_cc, best_rc = min(best_cc, c1 - c0), min(best_rc, c2 - c1)
        peak = max(peak, mem["extra"])

    params = sum(d.numel() for _, d in deltas)
    payload = sum(c.payload_bytes for c in packed)
    # error on a few matrices only (it costs a reconstruction each)
    errs = []
    for (_, d), comp in list(zip(deltas, packed, strict=True))[:: max(1, len(deltas) // 7)]:
        ref = d.float()
        errs.append(float(torch.linalg.vector_norm(method.reconstruct(comp, tuple(d.shape)) - ref)
                          / torch.linalg.vector_norm(ref)))
    return Result(label, best_c, best_r, best_cc, best_rc, peak, payload * 8 / params, statistics.mean(errs))


def device_description(device: torch.device) -> tuple[str, str]:
    """(slug for the file name, human description)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        slug = "cuda-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        return slug, f"{name} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return "cpu", f"CPU {cpu}, {torch.get_num_threads()} torch threads"


def markdown(results: list[Result], skipped: list[str], *, model: str, layers: int, params: int,
             device: torch.device, repeats: int) -> str:
    _, desc = device_description(device)
    gb = params * 2 / 1e9
    ref = next((r for r in results if r.label == REFERENCE), None)
    cpu = device.type == "cpu"
    head = ["method", "compress s", "reconstruct s", "compress GB/s", "reconstruct GB/s"]
    head += ["compress CPU-s", "reconstruct CPU-s"] if cpu else []
    head += ["peak extra MiB", "bits/param", "rel. error", "compress × bitdelta", "reconstruct × bitdelta"]
    lines = [
        f"# Benchmark: {model}-shaped bf16 delta, {layers} layer(s), {params / 1e6:.1f} M parameters ({gb:.2f} GB)",
        "",
        f"Device: {desc}. torch {torch.__version__}, Python {platform.python_version()}. "
        f"Best of {repeats} passes after a warm-up; `python benchmarks/bench_shapes.py --device {device.type} "
        f"--model {model} --layers {layers}`.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in results:
        row = [r.label, f"{r.compress_s:.3f}", f"{r.reconstruct_s:.3f}", f"{gb / r.compress_s:.2f}",
               f"{gb / r.reconstruct_s:.2f}"]
        row += [f"{r.compress_cpu_s:.2f}", f"{r.reconstruct_cpu_s:.2f}"] if cpu else []
        row += [f"{r.peak_bytes / 2**20:.0f}", f"{r.bits_per_param:.3f}", f"{r.rel_error:.4f}",
                f"{r.compress_s / ref.compress_s:.2f}" if ref else "–",
                f"{r.reconstruct_s / ref.reconstruct_s:.2f}" if ref else "–"]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("Peak extra memory: above what the resident deltas already use "
                 + ("(process RSS, sampled every 5 ms)." if cpu else "(torch.cuda.max_memory_allocated)."))
    if cpu:
        lines.append("CPU-s: process CPU time (all threads); on a shared machine wall time is noisy, CPU time less so.")
    else:
        lines.append("deltadct p=16 fused-eager: the fused kernels without CUDA graph replay; torch-ops: neither "
                     "(`deltadct.codec` switches). All three write the same bytes.")
    if skipped:
        lines.append("Skipped (not registered in this checkout): " + ", ".join(skipped) + ".")
    return "\n".join(lines) + "\n"


def profile_deltadct(deltas, device: torch.device, patch_size: int) -> str:
    """torch.profiler table of one compress + reconstruct pass of Delta-DCT over one layer."""
    from torch.profiler import ProfilerActivity, profile

    method = create_method("deltadct", patch_size=patch_size)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for tname, d in deltas:
            method.reconstruct(method.compress(d.float(), name=tname), tuple(d.shape))
        synchronize(device)
    key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=20)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=sorted(MODELS), default="llama7b")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: all)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--methods", default=None,
                    help="comma-separated labels to run (default: all), e.g. 'deltadct p=16,bitdelta'")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results" / "benchmarks")
    ap.add_argument("--profile", action="store_true", help="also print a torch.profiler table for deltadct p=16")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    num_layers, layer_shapes = MODELS[args.model]
    layers = num_layers if args.layers is None else args.layers
    if not 1 <= layers <= num_layers:
        ap.error(f"--layers must be in 1..{num_layers}")

    deltas = [(f"layers.{i}.{tname}", synthetic_delta(shape, 1000 * i + j, device))
              for i in range(layers) for j, (tname, shape) in enumerate(layer_shapes)]
    synchronize(device)
    params = sum(d.numel() for _, d in deltas)

    wanted = None if args.methods is None else {m.strip() for m in args.methods.split(",")}
    results, skipped = [], []
    runs = [(label, name, cfg, {}) for label, name, cfg in METHODS]
    if device.type == "cuda":
        runs += [(label, "deltadct", {"patch_size": 16}, switches) for label, switches in CUDA_PATHS]
    for label, name, cfg, switches in runs:
        if wanted is not None and label not in wanted:
            continue
        if name not in list_methods():
            skipped.append(label)
            print(f"skip {label}: method {name!r} is not registered", file=sys.stderr)
            continue
        with codec_switches(switches):
            res = run_method(label, name, cfg, deltas, device, args.repeats)
        print(f"{label}: compress {res.compress_s:.3f}s reconstruct {res.reconstruct_s:.3f}s", file=sys.stderr)
        results.append(res)

    table = markdown(results, skipped, model=args.model, layers=layers, params=params, device=device,
                     repeats=args.repeats)
    print(table)
    if args.profile:
        with codec_switches({"use_cuda_graphs": False}):  # op by op, so the table names each op
            print(profile_deltadct(deltas[: len(layer_shapes)], device, 16))
    slug, _ = device_description(device)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if layers == num_layers else f"-{layers}layers"
    path = args.out / f"{slug}-{args.model}{suffix}.md"
    path.write_text(table)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
