"""How far apart Delta-DCT encodings of the same delta are across devices and code paths.

Three encoders: the torch path on the CPU, the torch path on CUDA, and the fused Triton kernels on
CUDA (the default there). Evidence for tests/test_gpu.py.

    python benchmarks/device_parity.py          # Llama-2-7B q_proj and down_proj shapes, p = 8, 16, 32
"""
from __future__ import annotations

import torch

from bench_shapes import synthetic_delta  # run as a script: benchmarks/ is on sys.path
from deltadct import codec
from deltadct.methods import create_method


def compare(name: str, m, a, b, shape, delta) -> None:
    same_bytes = all(torch.equal(a.tensors[k].cpu(), b.tensors[k].cpu()) for k in a.tensors)
    alloc = (a.tensors["alloc"].cpu() != b.tensors["alloc"].cpu()).float().mean().item()
    fields = {k: f"{(a.tensors[k].cpu() != b.tensors[k].cpu()).float().mean().item():.2e}" for k in a.tensors
              if (k.startswith("codes") or k == "range_codes") and a.tensors[k].shape == b.tensors[k].shape}
    ra, rb = m.reconstruct(a, shape).cpu(), m.reconstruct(b, shape).cpu()
    diff = float((ra - rb).norm() / ra.norm())
    err_a, err_b = (float((r - delta).norm() / delta.norm()) for r in (ra, rb))
    print(f"  {name}: byte-identical={same_bytes} alloc bytes differing={alloc:.2e} "
          f"bytes differing={fields} rel(rec diff)={diff:.2e} codec rel error={err_a:.4f} vs {err_b:.4f}")


def main() -> None:
    for shape in ((4096, 4096), (4096, 11008)):
        delta = synthetic_delta(shape, 1, torch.device("cpu")).float()
        for p in (8, 16, 32):
            m = create_method("deltadct", patch_size=p)
            cpu = m.compress(delta)
            codec.use_fused_kernels = False
            gpu_torch = m.compress(delta.cuda())
            codec.use_fused_kernels = True
            gpu_fused = m.compress(delta.cuda())
            print(f"{shape} p={p}")
            compare("CPU vs CUDA torch path", m, cpu, gpu_torch, shape, delta)
            compare("CUDA torch path vs CUDA fused kernels", m, gpu_torch, gpu_fused, shape, delta)


if __name__ == "__main__":
    main()
