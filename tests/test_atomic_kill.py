"""Outputs are atomic: SIGKILL at any moment leaves either nothing or a complete, verifiable output.

``deltadct compress`` / ``apply`` run in child processes forked from a forkserver that has already
imported deltadct (so a trial costs the compress, not a torch import) and are killed with SIGKILL
after a seeded random delay drawn over the measured runtime of one uninterrupted run (shortened when a run
finishes before its kill), so kills land while tensors are read, compressed, spooled, assembled and renamed.

A killed process cannot clean up after itself, so its temporaries may remain: the spool
(``.deltadct-spool.*.tmp``) and the output being assembled (``.deltadct-<output name>.*.tmp``). They
are dot-prefixed, end in ``.tmp`` and never carry the output's name, so nothing that reads ``--out``
can mistake one for a result; the next run writing into that folder removes them (they are older
than it and no live process holds their lock). Anything else in the directory fails the test.
"""
from __future__ import annotations

import multiprocessing
import random
import re
import stat
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltadct
from deltadct import cli
from deltadct.io import OUTPUT_MARKER

SEED = 20250309
COMPRESS_TRIALS = 20
APPLY_TRIALS = 8
#: trials are drawn until that many kills landed mid-run, at most this many times the count
MAX_TRIALS_FACTOR = 3
#: what a killed writer may leave: its dot-prefixed temporaries (spool, or the output being assembled)
TEMP_NAME = re.compile(r"^\.deltadct-(spool|out\.safetensors|model)\.[a-z0-9_]{8}\.tmp$")


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["deltadct.cli"])
    warm = ctx.Process(target=deltadct.list_methods)  # starts the server, so no trial pays for the import
    warm.start()
    warm.join()
    return ctx


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """Four 256×256 matrices to compress and 2 MB of tensors kept exactly: a 2 MB delta file."""
    root = tmp_path_factory.mktemp("kill_pair")
    g = torch.Generator().manual_seed(0)
    base = {f"layer{i}.weight": torch.randn(256, 256, generator=g) for i in range(4)}
    base.update({f"layer{i}.norm": torch.randn(125_000, generator=g) for i in range(4)})
    ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
    save_file(base, root / "base.safetensors")
    save_file(ft, root / "ft.safetensors")
    return root / "base.safetensors", root / "ft.safetensors"


def _run(ctx, argv: list[str], kill_after: float | None) -> tuple[float, bool]:
    """Run ``deltadct argv`` in a forked child; SIGKILL it after ``kill_after`` s. Returns (seconds, killed)."""
    proc = ctx.Process(target=cli.main, args=(argv,))
    start = time.perf_counter()
    proc.start()
    proc.join(kill_after)
    killed = proc.is_alive()
    if killed:
        proc.kill()
        proc.join()
    assert killed or proc.exitcode == 0, f"deltadct {argv[0]} failed on its own (exit {proc.exitcode})"
    return time.perf_counter() - start, killed


def _next_window(window: float, elapsed: float, killed: bool) -> float:
    """Kill delays are drawn from [0, window]; a run that finished first shows the window is too long.

    Wall time on a shared machine drifts, so the window follows the runs rather than one first timing.
    """
    return window if killed else 0.9 * min(window, elapsed)


def _leftovers(directory: Path, final: str) -> tuple[bool, list[str]]:
    """(whether the final output exists, names of anything else), asserting the rest are temporaries."""
    names = sorted(p.name for p in directory.iterdir())
    others = [n for n in names if n != final]
    for name in others:
        assert TEMP_NAME.match(name), f"unexpected file {name!r} after a kill"
        assert not name.startswith(final), name
    return final in names, others


def _clean(directory: Path) -> None:
    import shutil

    for p in directory.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def test_sigkill_during_compress_leaves_nothing_or_a_verified_file(forkserver, pair, tmp_path):
    base, ft = pair
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "out.safetensors"
    argv = ["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(out), "--quiet", "--no-errors"]
    runtime, _ = _run(forkserver, argv, None)
    deltadct.verify(out, base)
    _clean(out_dir)

    rng = random.Random(SEED)
    outcomes = {"nothing": 0, "complete": 0, "temporaries_left": 0}
    window, interrupted, trials = runtime, 0, 0
    while interrupted < COMPRESS_TRIALS and trials < MAX_TRIALS_FACTOR * COMPRESS_TRIALS:
        trials += 1
        elapsed, killed = _run(forkserver, argv, rng.uniform(0.0, window))
        window = _next_window(window, elapsed, killed)
        interrupted += killed
        complete, others = _leftovers(out_dir, out.name)
        if complete:
            assert deltadct.verify(out, base) == {"path": str(out), "checksum": "ok", "method": "deltadct",
                                                  "fingerprint": "ok"}
        assert complete or killed
        outcomes["complete" if complete else "nothing"] += 1
        outcomes["temporaries_left"] += bool(others)
        if complete:
            out.unlink()  # the next trial writes it anew; temporaries stay, for the next run to sweep
    print(f"compress runtime {runtime:.2f}s, {trials} trials, {interrupted} kills mid-run: {outcomes}")
    assert interrupted >= COMPRESS_TRIALS  # the kills really landed inside the run
    assert outcomes["nothing"] >= 1
    time.sleep(0.05)  # the next run starts strictly after the last temporary was written
    _run(forkserver, argv, None)  # one uninterrupted run removes whatever the killed ones left
    assert sorted(p.name for p in out_dir.iterdir()) == [out.name]


def test_sigkill_during_apply_leaves_nothing_or_a_complete_model_dir(forkserver, pair, tmp_path):
    base, ft = pair
    delta = tmp_path / "delta.safetensors"
    deltadct.compress(base, ft, out=delta, progress=False, record_errors=False)
    expected = deltadct.apply(base, delta, progress=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["apply", "--base", str(base), "--delta", str(delta), "--out", str(out_dir / "model"), "--quiet"]
    runtime, _ = _run(forkserver, argv, None)
    _clean(out_dir)

    rng = random.Random(SEED + 1)
    window, killed_count, trials = runtime, 0, 0
    while killed_count < APPLY_TRIALS and trials < MAX_TRIALS_FACTOR * APPLY_TRIALS:
        trials += 1
        elapsed, killed = _run(forkserver, argv, rng.uniform(0.0, window))
        window = _next_window(window, elapsed, killed)
        killed_count += killed
        complete, _ = _leftovers(out_dir, "model")
        if complete:
            assert sorted(p.name for p in (out_dir / "model").iterdir()) == [OUTPUT_MARKER, "model.safetensors"]
            got = load_file(out_dir / "model" / "model.safetensors")
            assert got.keys() == expected.keys()
            assert all(torch.equal(got[k], expected[k]) for k in expected)
        _clean(out_dir)
    assert killed_count >= APPLY_TRIALS


def test_outputs_get_ordinary_permissions(pair, tmp_path):
    """Temporaries are private while written, but the finished output has the umask's permissions."""
    import os

    base, ft = pair
    mask = os.umask(0o022)
    try:
        deltadct.compress(base, ft, out=tmp_path / "d.safetensors", progress=False, record_errors=False)
        deltadct.apply(base, tmp_path / "d.safetensors", tmp_path / "model", progress=False)
    finally:
        os.umask(mask)
    assert stat.S_IMODE((tmp_path / "d.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "model").stat().st_mode) == 0o755
