"""deltadct_auto vs Delta-DCT's fixed ratios vs BitDelta at the same *measured* bits per parameter.

For each zoo task and each target budget, every fixed-ratio family of the paper, (a, 1−2a, a) for
a = 0.1 … 0.5, is scaled so its file measures about the target (widths 2/1/0 up to 1 bit of payload,
4/2/0 above), the best of them by error is kept, and ``deltadct_auto`` is compressed with exactly
that file's measured bits/param as its budget. Fixed ratios are run with the paper's Eq. 6 rescale
(``mean_abs``) and with ``lstsq``, so the table separates the allocation's gain from the rescale's.
Error = ‖Δ̂ − Δ‖ / ‖Δ‖ over all compressed tensors of a task (global relative error).

    python benchmarks/auto_vs_fixed.py --zoo vit:full
    python benchmarks/auto_vs_fixed.py --pair base.safetensors finetuned.safetensors --targets 0.5 1.0
"""
from __future__ import annotations

import argparse
import os
import time

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import deltadct  # noqa: E402
from deltadct.checkpoints import open_checkpoint  # noqa: E402

SHARES = (0.1, 0.2, 0.3, 0.4, 0.5)
TARGETS = (0.5, 1.0, 1.5, 2.0)


def fixed_config(share: float, payload: float) -> dict:
    """Ratios (a, 1−2a, a) scaled to spend ``payload`` bits/param: widths 2/1/0 up to 1 bit, 4/2/0 to 2."""
    widths, scale = ((2, 1, 0), payload) if payload <= 1 else ((4, 2, 0), payload / 2)
    high, mid = share * scale, (1 - 2 * share) * scale
    return {"ratios": (high, mid, 1 - high - mid), "bit_widths": widths, "budget": max(payload, 1e-6)}


def relative_error(dfile, base, finetuned) -> float:
    base_ckpt, ft_ckpt = open_checkpoint(base), open_checkpoint(finetuned)
    num = den = 0.0
    for name in dfile.names("compressed"):
        bname = dfile.header["key_map"]["base_prefix"] + name[len(dfile.header["key_map"]["finetuned_prefix"]):]
        delta = ft_ckpt.get(name).float() - base_ckpt.get(bname).float()
        num += float((dfile.reconstruct(name) - delta).pow(2).sum())
        den += float(delta.pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0


def run(base, finetuned, method: str, policy: dict | None = None, **cfg) -> tuple[float, float]:
    """(measured bits/param, relative error) of one in-memory compression (same bytes as the file)."""
    dfile = deltadct.compress(base, finetuned, method=method, policy=policy, progress=False, record_errors=False,
                              **cfg)
    return dfile.info()["bits_per_param"], relative_error(dfile, base, finetuned)


def best_fixed(base, finetuned, target: float, rescale: str, policy: dict | None) -> tuple[float, float, float]:
    """(bits, error, share a) of the best fixed ratio family calibrated to measure about ``target``."""
    results = []
    for share in SHARES:
        payload = target
        for _ in range(2):  # one correction: side information and headers come on top of the payload
            bits, err = run(base, finetuned, "deltadct", policy, rescale=rescale, **fixed_config(share, payload))
            payload = max(payload - (bits - target), 0.05)
        results.append((err, bits, share))
    err, bits, share = min(results)
    return bits, err, share


def compare(base, finetuned, targets=TARGETS, reserve: int | None = None, policy: dict | None = None) -> list[dict]:
    auto_cfg = {} if reserve is None else {"header_reserve_bytes": reserve}
    rows = []
    for target in targets:
        row = {"target": target}
        for rescale in ("mean_abs", "lstsq"):
            bits, err, share = best_fixed(base, finetuned, target, rescale, policy)
            row[f"fixed_{rescale}"] = (bits, err, share)
        # auto gets the lowest of the two fixed files' measured bits: never more than either
        budget = min(row["fixed_mean_abs"][0], row["fixed_lstsq"][0])
        row["auto"] = run(base, finetuned, "deltadct_auto", policy, budget=budget, **auto_cfg)
        rows.append(row)
    bits, err = run(base, finetuned, "bitdelta", policy)
    rows.append({"target": "bitdelta", "bitdelta": (bits, err),
                 "auto": run(base, finetuned, "deltadct_auto", policy, budget=bits, **auto_cfg)})
    return rows


def markdown(model: str, task: str, rows: list[dict]) -> str:
    lines = []
    for r in rows:
        auto = f"{r['auto'][1]:.4f} ({r['auto'][0]:.3f})"
        if r["target"] == "bitdelta":
            lines.append(f"| {model} | {task} | {r['bitdelta'][0]:.3f} | BitDelta {r['bitdelta'][1]:.4f} | | {auto} |")
            continue
        fm, fl = r["fixed_mean_abs"], r["fixed_lstsq"]
        lines.append(f"| {model} | {task} | {r['target']:.1f} | {fm[1]:.4f} ({fm[0]:.3f}, a={fm[2]}) "
                     f"| {fl[1]:.4f} ({fl[0]:.3f}, a={fl[2]}) | {auto} |")
    return "\n".join(lines)


HEADER = ("| model | task | target bits | best fixed, Eq. 6 rescale: error (bits, share a) "
          "| best fixed, lstsq rescale | deltadct_auto: error (bits) |\n|---|---|---|---|---|---|")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", action="append", default=None,
                        help="family:mode to benchmark (repeatable; default vit:full and minilm:fast)")
    parser.add_argument("--pair", nargs=2, metavar=("BASE", "FINETUNED"), default=None,
                        help="benchmark one checkpoint pair instead of zoos")
    parser.add_argument("--tasks", type=int, default=None, help="at most this many tasks per zoo")
    parser.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    parser.add_argument("--reserve", type=int, default=None,
                        help="deltadct_auto header_reserve_bytes "
                             "(default: the method's; compress() measures the header)")
    args = parser.parse_args(argv)
    print(HEADER, flush=True)
    if args.pair:
        print(markdown("pair", "-", compare(*args.pair, tuple(args.targets), args.reserve)), flush=True)
        return
    from experiments.zoo import build_zoo, zoo_policy

    for spec in args.zoo or ["vit:full", "minilm:fast"]:
        family, mode = spec.split(":")
        entry = build_zoo(family, mode, progress=False)
        for task in list(entry.tasks)[: args.tasks]:
            start = time.perf_counter()
            rows = compare(entry.base_path, entry.tasks[task].path, tuple(args.targets), args.reserve,
                           zoo_policy(family))
            print(markdown(f"{family}-{mode}", task, rows), flush=True)
            print(f"<!-- {family}-{mode}/{task}: {time.perf_counter() - start:.0f} s -->", flush=True)


if __name__ == "__main__":
    main()
