"""The user's path disk to disk: ``deltadct compress`` and ``deltadct apply`` against the time to read the inputs.

Builds a model-shaped pair on local disk the way a hub checkout holds it (``config.json``, bf16
safetensors shards of about 5 GB with an index; RoBERTa-base: one fp32 ``model.safetensors``),
every tensor of the real model, the fine-tuned side = base + small noise. Then, with the files in
the page cache (each step reads them once before it is timed):

* ``cat`` of both checkpoints to /dev/null: the read time every other step is divided by;
* the codec alone over the same deltas already in memory (on the device);
* the CLI ``compress`` for Delta-DCT and BitDelta (``--no-errors``) and ``apply`` (which writes the
  whole fine-tuned checkpoint), each in a fresh process; on CUDA Delta-DCT runs once with an empty
  Triton kernel cache (cold: the kernels compile) and once with the cache that run filled (warm).

Memory is the peak *anonymous* RSS of the command (sampled from /proc every 5 ms): pages of the
memory-mapped or page-cached inputs are not counted, since the kernel can drop them at any time;
the peak of all resident pages (VmHWM) is shown beside it.

    python benchmarks/bench_disk.py --model llama7b --device cuda --workdir /tmp/bench-disk
    python benchmarks/bench_disk.py --model roberta --device cpu
    python benchmarks/bench_disk.py --model llama7b --layers 1 --device cpu

Writes the Markdown table to ``results/benchmarks/<device>-disk-<model>.md`` (``--out`` to change).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
SHARD_BYTES = 5 * 10**9  # what the hub's Llama-2 checkpoints use (~5 GB shards)


def llama7b_tensors(layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of Llama-2-7B (``layers`` of its 32 decoder layers), in HF names."""
    hidden, inter, vocab = 4096, 11008, 32000
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[f"{p}.mlp.gate_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.up_proj.weight"] = (inter, hidden)
        shapes[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        shapes[f"{p}.input_layernorm.weight"] = (hidden,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def roberta_base_tensors(layers: int) -> dict[str, tuple[int, ...]]:
    """Every tensor of RoBERTa-base (``layers`` of its 12 encoder layers), in HF names."""
    hidden, inter = 768, 3072
    shapes: dict[str, tuple[int, ...]] = {
        "roberta.embeddings.word_embeddings.weight": (50265, hidden),
        "roberta.embeddings.position_embeddings.weight": (514, hidden),
        "roberta.embeddings.token_type_embeddings.weight": (1, hidden),
        "roberta.embeddings.LayerNorm.weight": (hidden,), "roberta.embeddings.LayerNorm.bias": (hidden,)}
    for i in range(layers):
        p = f"roberta.encoder.layer.{i}"
        for proj in ("query", "key", "value"):
            shapes[f"{p}.attention.self.{proj}.weight"] = (hidden, hidden)
            shapes[f"{p}.attention.self.{proj}.bias"] = (hidden,)
        shapes[f"{p}.attention.output.dense.weight"] = (hidden, hidden)
        shapes[f"{p}.attention.output.dense.bias"] = (hidden,)
        shapes[f"{p}.intermediate.dense.weight"] = (inter, hidden)
        shapes[f"{p}.intermediate.dense.bias"] = (inter,)
        shapes[f"{p}.output.dense.weight"] = (hidden, inter)
        shapes[f"{p}.output.dense.bias"] = (hidden,)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{p}.{ln}.weight"] = (hidden,)
            shapes[f"{p}.{ln}.bias"] = (hidden,)
    shapes["roberta.pooler.dense.weight"] = (hidden, hidden)
    shapes["roberta.pooler.dense.bias"] = (hidden,)
    return shapes


MODELS = {  # name: (tensors for a layer count, full layer count, dtype, sharded)
    "llama7b": (llama7b_tensors, 32, torch.bfloat16, True),
    "roberta": (roberta_base_tensors, 12, torch.float32, False),
}


def build_pair(root: Path, model: str, layers: int, device: torch.device) -> tuple[Path, Path]:
    """``root/base`` and ``root/ft`` as model directories (reused when already built)."""
    tensors_for, _, dtype, sharded = MODELS[model]
    shapes = tensors_for(layers)
    base_dir, ft_dir = root / "base", root / "ft"
    if (root / "complete").exists():
        return base_dir, ft_dir
    shutil.rmtree(root, ignore_errors=True)
    base_dir.mkdir(parents=True)
    ft_dir.mkdir()
    gen = torch.Generator(device=device).manual_seed(0)
    # shards in name order, ~SHARD_BYTES each, the same split on both sides
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        if sharded and current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))] if sharded \
        else ["model.safetensors"]
    for file, names in zip(files, shards, strict=True):
        base, ft = {}, {}
        for name in names:
            w = torch.randn(shapes[name], generator=gen, device=device).mul_(0.02)
            base[name] = w.to(dtype).cpu()
            ft[name] = w.add_(torch.randn(shapes[name], generator=gen, device=device), alpha=1e-3).to(dtype).cpu()
            del w
        save_file(base, base_dir / file, metadata={"format": "pt"})
        save_file(ft, ft_dir / file, metadata={"format": "pt"})
        del base, ft
    config = {"model_type": "llama" if model == "llama7b" else "roberta", "num_hidden_layers": layers,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    for directory in (base_dir, ft_dir):
        (directory / "config.json").write_text(json.dumps(config))
        if sharded:
            weight_map = {name: file for file, names in zip(files, shards, strict=True) for name in names}
            (directory / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "complete").touch()
    return base_dir, ft_dir


def weight_files(*dirs: Path) -> list[Path]:
    return sorted(f for d in dirs for f in d.glob("*.safetensors"))


def run_measured(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time, peak anonymous RSS (sampled) and ru_maxrss of one command."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon:": 0, "VmHWM:": 0}
    done = threading.Event()

    def sample() -> None:
        status = f"/proc/{proc.pid}/status"
        while not done.is_set():
            try:
                with open(status) as fh:
                    for line in fh:
                        key = line.split(maxsplit=1)[0]
                        if key in peak:
                            peak[key] = max(peak[key], int(line.split()[1]) * 1024)
            except (OSError, IndexError):
                pass
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{stderr[-3000:]}")
    # VmHWM, not the child's ru_maxrss: Linux carries ru_maxrss over from the forking parent
    return {"wall": wall, "anon": peak["RssAnon:"], "rss": peak["VmHWM:"]}


def time_cat(files: list[Path]) -> float:
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)  # into the page cache
    start = time.perf_counter()
    subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def codec_in_memory(base_dir: Path, ft_dir: Path, method: str, device: torch.device) -> float:
    """Seconds of ``Method.compress`` over every compressed tensor, deltas already on the device (best of 2)."""
    import deltadct
    from deltadct.api import plan_tensors
    from deltadct.checkpoints import open_checkpoint
    from deltadct.policy import TensorPolicy

    codec = deltadct.create_method(method)
    base, ft = open_checkpoint(base_dir), open_checkpoint(ft_dir)
    match, plan = plan_tensors(base, ft, codec, TensorPolicy.from_dict({}))
    best = float("inf")
    for _ in range(2):
        elapsed = 0.0
        for name in plan.compressed:  # one delta in memory at a time: a 7B model's do not fit at once
            delta = ft.get(name).to(device).float() - base.get(match.pairs[name]).to(device).float()
            sync(device)
            start = time.perf_counter()
            codec.compress(delta, name=name)
            sync(device)
            elapsed += time.perf_counter() - start
        best = min(best, elapsed)
    return best


def read_through_pipeline(base_dir: Path, ft_dir: Path, device: torch.device) -> float:
    """Seconds to read every tensor of both sides with the pipeline's readers alone (no copy to the
    device, no compute): the floor under compress with the current reading code."""
    from deltadct.checkpoints import open_checkpoint
    from deltadct.pipeline import prefetch

    readers = [open_checkpoint(base_dir), open_checkpoint(ft_dir)]
    keys = [(reader, key) for reader in readers for key in reader.keys()]
    pin = device.type == "cuda"
    start = time.perf_counter()
    for _ in prefetch(lambda item: item[0].get(item[1], pin_memory=pin), keys):
        pass
    return time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="llama7b")
    parser.add_argument("--layers", type=int, help="decoder/encoder layers (default: all of the model's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", type=Path, help="where the pair and outputs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the built pair for the next run")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    layers = args.layers or MODELS[args.model][1]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-disk-"))
    root = workdir / f"{args.model}-{layers}"
    load_before = os.getloadavg()
    base_dir, ft_dir = build_pair(root, args.model, layers, device)
    inputs = weight_files(base_dir, ft_dir)
    input_bytes = sum(f.stat().st_size for f in inputs)
    read_s = time_cat(inputs)
    print(f"pair: {len(inputs)} files, {input_bytes / 1e9:.2f} GB; cat {read_s:.2f} s", flush=True)

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    cli = [sys.executable, "-m", "deltadct.cli"]
    rows: list[tuple[str, dict[str, float]]] = []
    out_dir = workdir / "outputs"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir()

    def step(label: str, cmd: list[str], extra_env: dict[str, str] | None = None, *, refresh: bool = True) -> None:
        if refresh:  # the inputs back in the page cache if an earlier step's output pushed them out
            subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
        result = run_measured(cmd, {**env, **(extra_env or {})})
        rows.append((label, result))
        print(f"{label}: {result['wall']:.2f} s, anon {result['anon'] / 2**30:.2f} GiB", flush=True)

    common = ["--base", str(base_dir), "--finetuned", str(ft_dir), "--device", args.device, "--quiet",
              "--no-errors", "--overwrite"]
    delta_file = out_dir / "deltadct.delta.safetensors"
    if device.type == "cuda":
        cache = out_dir / "triton-cache"
        step("compress deltadct (cold kernel cache)", [*cli, "compress", *common, "--method", "deltadct",
                                                       "--out", str(delta_file)], {"TRITON_CACHE_DIR": str(cache)})
        step("compress deltadct (warm kernel cache)", [*cli, "compress", *common, "--method", "deltadct",
                                                       "--out", str(delta_file)], {"TRITON_CACHE_DIR": str(cache)})
    else:
        step("compress deltadct", [*cli, "compress", *common, "--method", "deltadct", "--out", str(delta_file)])
    step("compress bitdelta", [*cli, "compress", *common, "--method", "bitdelta",
                               "--out", str(out_dir / "bitdelta.delta.safetensors")])
    applied = out_dir / "applied"
    step("apply deltadct (writes the checkpoint)", [*cli, "apply", "--base", str(base_dir), "--delta", str(delta_file),
                                                     "--out", str(applied), "--device", args.device, "--quiet",
                                                     "--overwrite"])
    step("verify --base (checksum + fingerprint)", [*cli, "verify", str(delta_file), "--base", str(base_dir)])

    step("startup: `deltadct methods` (imports, no work)", [*cli, "methods"], refresh=False)
    subprocess.run(["cat", *map(str, inputs)], stdout=subprocess.DEVNULL, check=True)
    pipeline_read_s = read_through_pipeline(base_dir, ft_dir, device)
    codec = {m: codec_in_memory(base_dir, ft_dir, m, device) for m in ("deltadct", "bitdelta")}
    load_after = os.getloadavg()

    shapes, _, dtype = MODELS[args.model][:3]
    largest = max(torch.Size(s).numel() for s in shapes(layers).values()) * dtype.itemsize
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"# Disk to disk: {args.model} ({layers} layers) on {device.type} ({name}, {os.cpu_count()} cores)",
        "",
        f"`python benchmarks/bench_disk.py --model {args.model} --layers {layers} --device {args.device}`; "
        f"torch {torch.__version__}, Python {platform.python_version()}. Load average (1 min) before/after: "
        f"{load_before[0]:.2f} / {load_after[0]:.2f}.",
        "",
        f"Inputs: {len(inputs)} safetensors files, {input_bytes / 1e9:.2f} GB for both sides (largest tensor "
        f"{largest / 1e6:.0f} MB), in the page cache. `cat` of both to /dev/null: **{read_s:.2f} s** "
        f"({input_bytes / read_s / 1e9:.2f} GB/s). Codec alone over the same deltas in {device.type} memory: "
        f"Delta-DCT {codec['deltadct']:.2f} s, BitDelta {codec['bitdelta']:.2f} s. Every tensor of both read by "
        f"the pipeline's reader threads alone (`pread`{' into page-locked buffers' if device.type == 'cuda' else ''}, "
        f"in process, no compute): {pipeline_read_s:.2f} s.",
        "",
        "| step (fresh process each) | wall s | × read | peak anon RSS GiB | peak RSS GiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in rows:
        lines.append(f"| {label} | {r['wall']:.2f} | {r['wall'] / read_s:.2f} | {r['anon'] / 2**30:.2f} | "
                     f"{r['rss'] / 2**30:.2f} |")
    lines += ["", "Peak anonymous RSS leaves out file-backed pages (the page cache and memory-mapped inputs); "
              "peak RSS (VmHWM) counts every resident page of the process, those included."]
    table = "\n".join(lines) + "\n"
    print(table)
    slug = "cpu" if device.type == "cpu" else "cuda-" + name.lower().replace(" ", "-")
    out = args.out or REPO / "results" / "benchmarks" / f"{slug}-disk-{args.model}-{layers}layers.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"wrote {out}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
