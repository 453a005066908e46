"""How far apart CPU and CUDA Delta-DCT encodings of the same delta are (evidence for tests/test_gpu.py).

    python benchmarks/device_parity.py          # Llama-2-7B q_proj and down_proj shapes, p = 8, 16, 32
"""
from __future__ import annotations

import torch

from bench_shapes import synthetic_delta  # run as a script: benchmarks/ is on sys.path
from deltadct.methods import create_method


def main() -> None:
    for shape in ((4096, 4096), (4096, 11008)):
        delta = synthetic_delta(shape, 1, torch.device("cpu")).float()
        for p in (8, 16, 32):
            m = create_method("deltadct", patch_size=p)
            cpu, gpu = m.compress(delta), m.compress(delta.cuda())
            same_bytes = all(torch.equal(cpu.tensors[k], gpu.tensors[k].cpu()) for k in cpu.tensors)
            alloc = (cpu.tensors["alloc"] != gpu.tensors["alloc"].cpu()).float().mean().item()
            codes = {k: (cpu.tensors[k] != gpu.tensors[k].cpu()).float().mean().item()
                     for k in cpu.tensors if k.startswith("codes") and cpu.tensors[k].shape == gpu.tensors[k].shape}
            rc, rg = m.reconstruct(cpu, shape), m.reconstruct(gpu, shape).cpu()
            diff = float((rc - rg).norm() / rc.norm())
            err = float((rc - delta).norm() / delta.norm())
            print(f"{shape} p={p}: byte-identical={same_bytes} alloc bytes differing={alloc:.2e} "
                  f"code bytes differing={codes} rel(rec_gpu-rec_cpu)={diff:.2e} codec rel error={err:.3f}")


if __name__ == "__main__":
    main()
