"""Layer streaming: sharded checkpoints are compressed tensor by tensor, with bounded memory.

* A sharded pair (HF directory, index + shards) gives byte for byte the file that the same tensors
  in single files give, and the same as the in-memory artifact saved afterwards.
* A subprocess compresses and applies a 2-shard pair whose total size is several times the memory
  budget (20 layers over the interpreter's own baseline, less than one shard) and stays under it:
  tensors are read one by one (``pread``), a bounded number ahead, never a shard at a time.
  Memory is measured as anonymous RSS: pages of the memory-mapped shards are page cache the kernel
  may drop, and ``ru_maxrss`` counts them too.
* The streamed file is byte for byte the saved in-memory artifact, for several methods; the applied
  checkpoint, written in place by several threads, equals the in-memory apply.
* The base fingerprint is the chunked sha256 written out in this file; files that record the old
  sequential sha256 (no algorithm field) still verify and apply, and refuse a wrong base.
* A shard truncated or deleted while compress/apply runs stops the command with one line and
  leaves no output behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

import deltadct
from deltadct import cli
from deltadct.checkpoints import CheckpointReader
from deltadct.errors import FingerprintMismatchError, FormatError


def _pair(num: int, shape: tuple[int, int], seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    base = {f"layers.{i}.weight": torch.randn(shape, generator=gen) for i in range(num)}
    base["norm.weight"] = torch.ones(shape[1])
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    return base, ft


def _write_sharded(tensors: dict[str, torch.Tensor], directory, shards: int) -> None:
    directory.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        part = names[s::shards]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, directory / file)
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_pair_gives_the_same_file_as_single_files_and_in_memory(tmp_path):
    base, ft = _pair(6, (64, 96))
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    _write_sharded(base, tmp_path / "base", 3)
    _write_sharded(ft, tmp_path / "ft", 2)

    single = deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors",
                               out=tmp_path / "single.dd", progress=False, patch_size=16)
    sharded = deltadct.compress(tmp_path / "base", tmp_path / "ft", out=tmp_path / "sharded.dd",
                                progress=False, patch_size=16)
    memory = deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", progress=False,
                               patch_size=16)
    memory.save(tmp_path / "memory.dd")
    data = (tmp_path / "single.dd").read_bytes()
    assert (tmp_path / "sharded.dd").read_bytes() == data
    assert (tmp_path / "memory.dd").read_bytes() == data
    assert single.info()["num_compressed"] == sharded.info()["num_compressed"] == 6
    # and applying the streamed file reproduces what the in-memory artifact gives
    applied = deltadct.apply(tmp_path / "base", tmp_path / "sharded.dd", progress=False)
    from_memory = deltadct.apply(tmp_path / "base", memory, progress=False)
    for name in ft:
        assert torch.equal(applied[name], from_memory[name])


_MEASURE = textwrap.dedent("""
    import json, sys, threading, time
    import torch
    import deltadct
    from deltadct.profiling import anon_rss_bytes, peak_rss_bytes

    torch.set_num_threads(1)
    src, out = sys.argv[1], sys.argv[2]
    # warm-up on a tiny pair so lazily loaded kernels and modules count in the baseline
    deltadct.methods.create_method("deltadct").compress(torch.randn(64, 64))
    baseline = anon_rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    deltadct.compress(src + "/base", src + "/ft", out=out, progress=False)
    deltadct.apply(src + "/base", out, out=out + ".applied", progress=False)
    done.set()
    sampler.join()
    print(json.dumps({"baseline": baseline, "peak_anon": peak[0], "peak_rss": peak_rss_bytes()}))
""")


@pytest.mark.parametrize("layers_per_shard,side", [(32, 768)])
def test_streaming_peak_memory_is_a_few_layers_whatever_the_shard_size(tmp_path, layers_per_shard, side):
    shards = 2
    base, ft = _pair(shards * layers_per_shard, (side, side))
    _write_sharded(base, tmp_path / "base", shards)
    _write_sharded(ft, tmp_path / "ft", shards)
    del base, ft
    largest_shard = max(f.stat().st_size for f in (tmp_path / "base").glob("*.safetensors"))
    largest_layer = side * side * 4
    total = sum(f.stat().st_size for d in ("base", "ft") for f in (tmp_path / d).glob("*.safetensors"))
    # glibc raises its mmap threshold after large frees and then keeps freed layer buffers on the heap,
    # so RSS creeps up with the layer count although nothing is held (60 MiB vs 41 here without it);
    # a fixed threshold hands every freed layer buffer back to the OS, which is what we measure
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), str(tmp_path / "out.dd")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    used = stats["peak_anon"] - stats["baseline"]
    # what the pipeline may hold: 4 read-ahead pairs (8 layers), 4 base layers awaiting the fingerprint,
    # and the codec's working copies of the layer in flight (~8); never a shard (shards are not read whole)
    budget = 20 * largest_layer
    assert budget < largest_shard and total > 6 * budget  # the pair, even one shard, is larger than may be held
    assert used <= budget, (f"streaming held {used / 2**20:.0f} MiB over baseline; budget "
                            f"{budget / 2**20:.0f} MiB (20 layers); pair {total / 2**20:.0f} MiB")


# ---------------------------------------------------------------- the streaming pipeline

@pytest.mark.parametrize("method,options", [("deltadct", {"patch_size": 16}), ("bitdelta", {}), ("magnitude", {})])
def test_streamed_file_is_byte_identical_to_the_saved_in_memory_artifact(tmp_path, method, options):
    base, ft = _pair(5, (48, 80), seed=3)
    ft["head.weight"] = torch.randn(3, 80)  # a new tensor, stored in full
    _write_sharded(base, tmp_path / "base", 2)
    _write_sharded(ft, tmp_path / "ft", 3)
    policy = {"extra_keys": "keep"}
    streamed = deltadct.compress(tmp_path / "base", tmp_path / "ft", method, out=tmp_path / "streamed.dd",
                                 policy=policy, progress=False, **options)
    memory = deltadct.compress(tmp_path / "base", tmp_path / "ft", method, policy=policy, progress=False, **options)
    memory.save(tmp_path / "memory.dd")
    assert (tmp_path / "streamed.dd").read_bytes() == (tmp_path / "memory.dd").read_bytes()
    assert streamed.info()["num_compressed"] == 5 and streamed.info()["num_new"] == 1
    # the applied checkpoint, written in place by several threads, holds what the in-memory apply gives
    deltadct.apply(tmp_path / "base", tmp_path / "streamed.dd", out=tmp_path / "applied", progress=False)
    from safetensors.torch import load_file
    written = load_file(tmp_path / "applied" / "model.safetensors")
    expected = deltadct.apply(tmp_path / "base", memory, progress=False)
    assert sorted(written) == sorted(expected)
    for name in expected:
        assert written[name].dtype == expected[name].dtype and torch.equal(written[name], expected[name])
    # and the reconstruction is base + the decoded delta, computed here in float32 from the pieces
    for name in streamed.names("compressed"):
        assert torch.equal(expected[name], base[name] + streamed.reconstruct(name))


def _sequential_sha256(tensors) -> str:
    """The fingerprint of files written before the algorithm was recorded, written out from its definition."""
    digest = hashlib.sha256()
    for name, tensor in tensors:
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _chunked_sha256(tensors) -> str:
    digest = hashlib.sha256()
    for name, tensor in tensors:
        raw = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        digest.update(f"{name}|{str(tensor.dtype).removeprefix('torch.')}|{list(tensor.shape)}\n".encode())
        digest.update(b"".join(hashlib.sha256(raw[i:i + 2**24]).digest() for i in range(0, len(raw), 2**24)))
    return digest.hexdigest()


def _rewrite_header(path, change) -> None:
    """Rewrite a delta file's deltadct header with ``change(header)`` and a fresh content checksum."""
    from deltadct import format as F
    from deltadct.io import encode_header

    header, offset, index = F.read_header(path)
    data = path.read_bytes()[offset:]
    change(header)
    header.pop("content_sha256")
    header["content_sha256"] = F.content_checksum(header, hashlib.sha256(data).hexdigest(), index)
    path.write_bytes(encode_header(index, {"deltadct": F.canonical_json(header)}) + data)


def test_fingerprint_is_the_chunked_sha256_and_old_sequential_files_still_verify(tmp_path):
    gen = torch.Generator().manual_seed(5)
    # one tensor spans two 16 MiB chunks, so the chunking itself is checked
    base = {"big.weight": torch.randn(2048, 4608, generator=gen),  # 37.7 MB of fp32: three 16 MiB chunks
            "small.weight": torch.randn(64, 64, generator=gen).to(torch.bfloat16)}
    ft = {k: v + 1e-2 * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    save_file(base, tmp_path / "base.safetensors")
    save_file(ft, tmp_path / "ft.safetensors")
    other = {k: v + 1 for k, v in base.items()}
    save_file(other, tmp_path / "other.safetensors")
    delta = tmp_path / "d.dd"
    deltadct.compress(tmp_path / "base.safetensors", tmp_path / "ft.safetensors", "bitdelta", out=delta,
                      progress=False)
    header = deltadct.load(delta).header
    compressed_base = sorted(base.items())
    assert header["base_fingerprint_algorithm"] == "sha256-chunked-16MiB"
    assert header["base_fingerprint"] == _chunked_sha256(compressed_base)
    assert deltadct.verify(delta, base=tmp_path / "base.safetensors")["fingerprint"] == "ok"

    # a file as written before the algorithm field: plain sha256 over names and bytes
    _rewrite_header(delta, lambda h: (h.pop("base_fingerprint_algorithm"),
                                      h.update(base_fingerprint=_sequential_sha256(compressed_base))))
    assert "base_fingerprint_algorithm" not in deltadct.load(delta).header
    assert deltadct.verify(delta, base=tmp_path / "base.safetensors") == {
        "path": str(delta), "checksum": "ok", "method": "bitdelta", "fingerprint": "ok"}
    applied = deltadct.apply(tmp_path / "base.safetensors", delta, progress=False)
    assert torch.allclose(applied["small.weight"], ft["small.weight"], atol=0.05)
    with pytest.raises(FingerprintMismatchError, match="fingerprint mismatch"):
        deltadct.verify(delta, base=tmp_path / "other.safetensors")
    with pytest.raises(FingerprintMismatchError):
        deltadct.apply(tmp_path / "other.safetensors", delta, progress=False)
    _rewrite_header(delta, lambda h: h.update(base_fingerprint_algorithm="md5"))
    with pytest.raises(FormatError, match="fingerprint algorithm 'md5'"):
        deltadct.verify(delta, base=tmp_path / "base.safetensors")


@pytest.mark.parametrize("command", ["compress", "apply"])
@pytest.mark.parametrize("fault", ["truncated", "deleted"])
def test_a_shard_that_changes_mid_run_stops_with_one_line_and_leaves_no_output(tmp_path, monkeypatch, capsys,
                                                                                fault, command):
    base, ft = _pair(8, (64, 64), seed=1)
    _write_sharded(base, tmp_path / "base", 2)
    _write_sharded(ft, tmp_path / "ft", 2)
    delta = tmp_path / "d.dd"
    if command == "apply":
        deltadct.compress(tmp_path / "base", tmp_path / "ft", out=delta, progress=False)
    victim = tmp_path / "base" / "model-00002-of-00002.safetensors"
    reads, original_get = [], CheckpointReader.get

    def get(self, key, **kwargs):
        reads.append(key)
        if len(reads) == 3:  # the run is under way: the second base shard changes under it
            if fault == "truncated":
                os.truncate(victim, victim.stat().st_size - 1000)
            else:
                victim.unlink()
        return original_get(self, key, **kwargs)

    monkeypatch.setattr(CheckpointReader, "get", get)
    out = tmp_path / "out"
    args = (["compress", "--base", str(tmp_path / "base"), "--finetuned", str(tmp_path / "ft"), "--out", str(out)]
            if command == "compress" else ["apply", "--base", str(tmp_path / "base"), "--delta", str(delta),
                                           "--out", str(out)])
    assert cli.main([*args, "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("deltadct: error: ") and "Traceback" not in err
    assert str(victim) in err and ("truncated" if fault == "truncated" else "no longer readable") in err
    assert not out.exists()
    expected = ["base", "ft"] + (["d.dd"] if command == "apply" else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(expected)
