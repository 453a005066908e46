"""Delta-DCT beyond the paper: each codec option against the paper's Delta-DCT and the baselines, in
function (output KL on real validation inputs, task score) and weight error, at matched measured bits.

    python -m experiments.deltadct_plus_study --zoo vit t5 gpt           # choose (fast zoos)
    python -m experiments.deltadct_plus_study --zoo minilm --configs confirm     # confirm the preset
    python -m experiments.deltadct_plus_study --side-info --zoo vit      # side-information table

For each zoo, budget (0.5 / 1.0 / 2.0 bits/param) and configuration, the configuration's rate knob
(the kept share of patches for Delta-DCT variants, ``bits`` for the SVD methods) is searched on
the first task until the bits/param measured on the written file is within 1 % of the budget; the
same knob then runs on every task. Each run compresses with ``deltadct.compress`` into a file,
rebuilds the model from it and measures:

- ``kl``: mean KL(fine-tuned ‖ compressed) of the output distributions on the task's validation
  inputs (images; sentences for MiniLM; the templated prompts teacher-forced on the label word for
  T5; the validation sentences' next-token distributions for GPT);
- ``score``: the task metric of the project's evaluator for the family (vision, glue, lm_eval);
- ``rel_error``: ‖Δ̂ − Δ‖ / ‖Δ‖ over the compressed tensors.

Rows are appended to ``<out>/study.csv`` (a row already there is not run again).
"""
from __future__ import annotations

import argparse
import csv
import io
import lzma
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import deltadct  # noqa: E402
from deltadct.io import atomic_write_text  # noqa: E402

BUDGETS = (0.5, 1.0, 2.0)
#: which tasks each zoo runs (the fast text zoos learn SST-2 only; see README's zoo table)
ZOO_TASKS = {"vit": ("digits", "parity"), "minilm": ("sst2",),
             "t5": ("sst2",), "gpt": ("sst2",)}
ZOO_ADAPTER = {"vit": "timm_vit", "minilm": "hf_seqcls", "t5": "hf_t5", "gpt": "hf_causal_lm"}
ZOO_EVALUATOR = {"vit": "vision", "minilm": "glue", "t5": "glue", "gpt": "lm_eval"}
COLUMNS = ["zoo", "task", "budget", "config", "method", "knob", "bits_per_param", "rel_error", "kl", "score",
           "finetuned_score", "seconds"]
KNOB_TOLERANCE = 0.01


# --------------------------------------------------------------------------- configurations

def dct_ratios(width: int, share: float) -> dict[str, Any]:
    """Widths (w+1, w, 0) with shares (k/4, 3k/4, 1 − k): the paper's 0.2/0.6/0.2 at w = 1, k = 0.8."""
    share = min(max(share, 0.0), 1.0)
    return {"bit_widths": [width + 1, width, 0], "ratios": [share / 4, 3 * share / 4, 1 - share],
            "budget": 8.0}


def _dct_width(budget: float) -> int:
    return 1 if budget <= 1.0 else 2


class Config:
    """A named setting and how its rate knob maps to method options for a budget."""

    def __init__(self, name: str, method: str, options: Callable[[float, float], dict[str, Any]],
                 knob: Callable[[float], tuple[float, float, float]], budgets=BUDGETS):
        self.name, self.method, self.options, self.knob, self.budgets = name, method, options, knob, budgets


def _patch_config(name: str, head_share: float = 0.0, method: str | None = None, **fixed: Any) -> Config:
    """A Delta-DCT(+) setting; ``head_share`` of the payload goes to the low-rank head (deltadct_plus).

    The knob is the kept share of patches without a head; with one it scales head and patches
    together from their nominal split (head ``head_share``·budget, patches the rest).
    """
    method = method or ("deltadct" if not fixed and not head_share else "deltadct_plus")
    nominal_share = lambda budget: budget * (1 - head_share) / (_dct_width(budget) + 0.25)  # noqa: E731

    def options(budget: float, knob: float) -> dict[str, Any]:
        if not head_share:
            return {**dct_ratios(_dct_width(budget), knob), **fixed}
        return {**dct_ratios(_dct_width(budget), knob * nominal_share(budget)), **fixed,
                "lowrank_bits": knob * head_share * budget}

    def knob(budget: float) -> tuple[float, float, float]:  # (start, lowest, highest)
        return (1.0, 0.0, 2.0) if head_share else (nominal_share(budget), 0.0, 1.0)

    return Config(name, method, options, knob)


def _svd_config(name: str, method: str) -> Config:
    return Config(name, method, lambda budget, knob: {"bits": knob}, lambda b: (b, b / 4, 2 * b))


PAPER = _patch_config("deltadct (paper)")
SYM = dict(quantizer="symmetric", rescale="none")
CONFIGS: dict[str, Config] = {c.name: c for c in [
    PAPER,
    _patch_config("symmetric", **SYM),
    _patch_config("lloyd", quantizer="lloyd", rescale="none"),
    _patch_config("symmetric + dc", **SYM, dc_bits=8),
    _patch_config("symmetric, transform none", **SYM, transform="none"),
    _patch_config("symmetric, transform dct_rows", **SYM, transform="dct_rows"),
    _patch_config("symmetric + lowrank head 0.5", head_share=0.5, **SYM),
    _patch_config("symmetric none + lowrank head 0.5", head_share=0.5, **SYM, transform="none"),
    _patch_config("symmetric, rescale mean_abs", quantizer="symmetric"),
    _patch_config("symmetric none + lowrank head 0.5, rescale mean_abs", head_share=0.5, quantizer="symmetric",
                  transform="none"),
    _patch_config("symmetric none + lowrank head 0.75", head_share=0.75, **SYM, transform="none"),
    _patch_config("symmetric none + lowrank head 0.9", head_share=0.9, **SYM, transform="none"),
    _svd_config("delta_come_rtn", "delta_come_rtn"),
    _svd_config("lowrank", "lowrank"),
    Config("bitdelta", "bitdelta", lambda budget, knob: {}, lambda b: (0.0, 0.0, 0.0), budgets=(1.0,)),
]}
#: the chosen preset: deltadct_plus at its defaults, the knob only sets the rate
PRESET = "deltadct_plus (preset)"


def preset_config() -> Config:
    """deltadct_plus at its defaults, which are its 1 bit/param point (``lowrank_bits`` = the head's
    share of the payload); at other budgets head and patches scale with the same split."""
    from deltadct.methods.deltadct_plus import DeltaDCTPlusConfig

    return _patch_config(PRESET, head_share=DeltaDCTPlusConfig().lowrank_bits, method="deltadct_plus")


SETS = {"choose": [*CONFIGS], "confirm": ["deltadct (paper)", PRESET, "delta_come_rtn", "lowrank", "bitdelta"]}


# --------------------------------------------------------------------------- measurements

class Zoo:
    """One fast zoo: its pair, adapter, evaluator and validation inputs for the KL."""

    def __init__(self, family: str, mode: str = "fast"):
        from deltadct.adapters import get_adapter
        from experiments.zoo import build_zoo

        self.family = family
        self.entry = build_zoo(family, mode, progress=False)
        self.adapter = get_adapter(ZOO_ADAPTER[family])
        self.policy = dict(self.adapter.policy_defaults)  # as the runner compresses this family

    def task_path(self, task: str) -> Path:
        return Path(self.entry.tasks[task].path)

    def context(self, task: str, reference):
        from eval import EvalContext

        path = self.task_path(task)
        data = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.entry.tasks[task].data.items()}
        return EvalContext(task=task, data=data, processor=self.adapter.load_processor(path),
                           adapter=self.adapter.name, reference=reference)

    def score(self, model, ctx) -> float:
        from eval import get_evaluator

        options = {"progress": False} if ZOO_EVALUATOR[self.family] != "lm_eval" else {}
        return float(get_evaluator(ZOO_EVALUATOR[self.family])(**options).evaluate(model, ctx)["score"])

    @torch.no_grad()
    def log_probs(self, model, ctx) -> torch.Tensor:
        """(positions, classes) log-probabilities of ``model`` on the task's validation inputs."""
        if self.family == "vit":
            from eval.vision import ImageSource, preprocess

            source = ImageSource(ctx.data, ctx.data.get("image_mode") or "L")
            pixels = preprocess(ctx.processor, [source.image(i) for i in range(len(source))])
            return F.log_softmax(model(pixels).float(), -1)
        tok = ctx.processor
        if self.family == "gpt":
            return self._causal_log_probs(model, ctx)
        from eval.glue import glue_task, load_glue_split

        task = glue_task(ctx.data.get("task", ctx.task))
        texts, labels = load_glue_split(task, ctx.data.get("split", "validation"), ctx.data.get("data_dir"))
        tok = ctx.processor
        if self.family == "minilm":
            enc = tok(*zip(*texts, strict=True), truncation=True, max_length=ctx.data.get("max_length", 128),
                      padding="longest",
                      return_tensors="pt")
            return F.log_softmax(model(**enc).logits.float(), -1)
        if self.family == "t5":
            prompts = [ctx.data["input_template"].format(**dict(zip(task.text_columns, t, strict=True))) for t in texts]
            enc = tok(prompts, truncation=True, max_length=ctx.data.get("max_input_length", 96), padding="longest",
                      return_tensors="pt")
            words = tok([ctx.data["label_words"][int(y)] for y in labels], padding="longest", return_tensors="pt")
            start = torch.full((len(texts), 1), model.config.decoder_start_token_id)
            decoder = torch.cat([start, words.input_ids[:, :-1]], dim=1)
            logits = model(**enc, decoder_input_ids=decoder).logits.float()
            return F.log_softmax(logits[words.attention_mask.bool()], -1)
        raise ValueError(f"no validation inputs for zoo family {self.family!r}")

    def _causal_log_probs(self, model, ctx) -> torch.Tensor:
        """Next-token distributions at every position of each validation example, written as the zoo's
        lm-eval task presents it (prompt, then the gold answer)."""
        import json

        import yaml

        task = ctx.data["task"]
        spec = yaml.safe_load((Path(ctx.data["include_path"]) / f"{task}.yaml").read_text())
        docs = [json.loads(line) for line in (Path(ctx.data["include_path"]) / f"{task}.jsonl").read_text().splitlines()
                if line.strip()]
        prompt = spec["doc_to_text"].replace("{{", "{").replace("}}", "}")
        delimiter = spec.get("target_delimiter", " ")
        texts = [prompt.format(**doc) + delimiter + spec["doc_to_choice"][doc[spec["doc_to_target"]]]
                 for doc in docs]
        tok = ctx.processor
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, truncation=True, max_length=128, padding="longest", return_tensors="pt")
        logits = model(**enc).logits.float()
        return F.log_softmax(logits[enc.attention_mask.bool()], -1)


def kl_divergence(reference: torch.Tensor, model: torch.Tensor) -> float:
    """Mean over positions of KL(reference ‖ model) from log-probabilities."""
    return float((reference.exp() * (reference - model)).sum(-1).mean().clamp_min(0.0))


def compress_to_file(zoo: Zoo, task: str, method: str, options: dict[str, Any], out: Path) -> float:
    deltadct.compress(zoo.entry.base_path, zoo.task_path(task), method, out=out, policy=zoo.policy, progress=False,
                      overwrite=True, record_errors=False, **options)
    return float(deltadct.info(out)["bits_per_param"])


def match_knob(zoo: Zoo, task: str, config: Config, budget: float, scratch: Path,
               tolerance: float = KNOB_TOLERANCE) -> float:
    """The knob whose file lands within ``tolerance`` (relative) of ``budget`` (secant steps, bisection)."""
    start, lo, hi = config.knob(budget)
    if lo == hi:
        return start
    path = scratch / "probe.safetensors"
    measure = lambda k: compress_to_file(zoo, task, config.method, config.options(budget, k), path)  # noqa: E731
    points = [(start, measure(start))]
    knob = start
    for _ in range(8):
        k, bits = points[-1]
        if abs(bits - budget) <= tolerance * budget:
            return k
        if bits > budget:
            hi = min(hi, k)
        else:
            lo = max(lo, k)
        if len(points) == 1:
            knob = k * budget / bits if bits > 0 else hi
        else:
            (k0, b0), (k1, b1) = points[-2], points[-1]
            knob = k1 + (budget - b1) * (k1 - k0) / (b1 - b0) if b1 != b0 else (lo + hi) / 2
        if not lo < knob < hi:
            knob = (lo + hi) / 2
        points.append((knob, measure(knob)))
    return min(points, key=lambda p: abs(p[1] - budget))[0]


def delta_error(base: dict, finetuned: dict, rebuilt: dict, names) -> float:
    num = den = 0.0
    for name in names:
        delta = finetuned[name].float() - base[name].float()
        num += float((rebuilt[name].float() - finetuned[name].float()).double().pow(2).sum())
        den += float(delta.double().pow(2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def run_point(zoo: Zoo, task: str, config: Config, budget: float, knob: float, scratch: Path,
              reference_cache: dict) -> dict[str, Any]:
    from deltadct.checkpoints import match_keys, open_checkpoint

    if task not in reference_cache:
        reference = zoo.adapter.load(zoo.task_path(task))
        ctx = zoo.context(task, reference)
        reference_cache[task] = (ctx, zoo.log_probs(reference, ctx), zoo.score(reference, ctx))
    ctx, ref_logp, ft_score = reference_cache[task]
    path = scratch / "point.safetensors"
    began = time.perf_counter()
    bits = compress_to_file(zoo, task, config.method, config.options(budget, knob), path)
    seconds = time.perf_counter() - began
    header = deltadct.info(path)
    rebuilt = deltadct.apply(zoo.entry.base_path, path, progress=False)
    base_ckpt, ft_ckpt = open_checkpoint(zoo.entry.base_path), open_checkpoint(zoo.task_path(task))
    names = list(header["layers"])
    base_name = match_keys(base_ckpt, ft_ckpt).pairs  # a prefix such as "bert." may differ
    base = {n: base_ckpt.get(base_name[n]) for n in names}
    finetuned = {n: ft_ckpt.get(n) for n in names}
    model = zoo.adapter.load_with_state_dict(zoo.task_path(task), rebuilt)
    return {"zoo": zoo.family, "task": task, "budget": budget, "config": config.name, "method": config.method,
            "knob": round(knob, 6), "bits_per_param": bits, "rel_error": delta_error(base, finetuned, rebuilt, names),
            "kl": kl_divergence(ref_logp, zoo.log_probs(model, ctx)), "score": zoo.score(model, ctx),
            "finetuned_score": ft_score, "seconds": round(seconds, 3)}


# --------------------------------------------------------------------------- store

def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = list(csv.DictReader(path.read_text().splitlines()))
    for row in rows:
        for key in ("budget", "knob", "bits_per_param", "rel_error", "kl", "score", "finetuned_score", "seconds"):
            row[key] = float(row[key])
    return rows


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


def summary(rows: list[dict[str, Any]]) -> str:
    """Markdown: per zoo and budget, each config's mean over tasks, best data-free KL marked."""
    out = []
    for zoo in dict.fromkeys(r["zoo"] for r in rows):
        out.append(f"\n### {zoo} (fast zoo)\n")
        out.append("| budget | config | bits/param | rel. weight error | KL(ft ‖ compressed) | score | KL / paper |")
        out.append("|---:|---|---:|---:|---:|---:|---:|")
        for budget in sorted({r["budget"] for r in rows if r["zoo"] == zoo}):
            mine = [r for r in rows if r["zoo"] == zoo and r["budget"] == budget]
            means = {}
            for name in dict.fromkeys(r["config"] for r in mine):
                sel = [r for r in mine if r["config"] == name]
                means[name] = {k: sum(r[k] for r in sel) / len(sel)
                               for k in ("bits_per_param", "rel_error", "kl", "score")}
            paper = means.get(PAPER.name, {}).get("kl")
            for name, m in means.items():
                ratio = f"{m['kl'] / paper:.3f}" if paper else ""
                out.append(f"| {budget:g} | {name} | {m['bits_per_param']:.3f} | {m['rel_error']:.3f} | "
                           f"{m['kl']:.4g} | {m['score']:.4f} | {ratio} |")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- side information

def entropy_bits(values: torch.Tensor) -> float:
    """Zeroth-order empirical entropy × count: what an ideal entropy coder of independent symbols needs."""
    if values.numel() == 0:
        return 0.0
    counts = torch.bincount(values.reshape(-1).long()).double()
    p = counts[counts > 0] / values.numel()
    return float(-(p * p.log2()).sum() * values.numel())


def side_info_table(zoo: Zoo, task: str, budget: float, knob: float, scratch: Path) -> str:
    """Measured bits/param of the preset's file with each side-information choice, and what entropy
    coding the file's fields could save at most (zeroth-order entropy) and does save (LZMA)."""
    from deltadct import codec
    from deltadct import format as fmt
    from deltadct import quant as Q

    config = preset_config()
    lines = ["| setting | measured bits/param | fields, fixed width | fields, ideal entropy coder | file, LZMA |",
             "|---|---:|---:|---:|---:|"]
    for label, extra in (("per-patch scale fp16", {"range_encoding": "fp16"}),
                         ("per-patch scale log-coded, 6 bits", {"range_bits": 6}),
                         ("per-patch scale log-coded, 4 bits", {"range_bits": 4})):
        path = scratch / "side.safetensors"
        options = {**config.options(budget, knob), **extra}
        bits = compress_to_file(zoo, task, config.method, options, path)
        dfile = fmt.load(path)
        params = dfile.info()["num_params"]
        alloc_bits = codec.alloc_bits_for(max(options["bit_widths"]))
        # packed fields whose symbols an entropy coder would model: field -> symbol width
        symbols = {**{f"codes{b}": b for b in range(1, 9)}, "scale_codes": options.get("range_bits", 6),
                   "alloc": alloc_bits}
        fixed = ideal = 0.0
        for name in dfile.names("compressed"):
            for field, tensor in dfile.fields(name).items():
                size = tensor.numel() * tensor.element_size() * 8
                fixed += size
                width = symbols.get(field)
                ideal += size if width is None else entropy_bits(Q.unpack_bits(tensor, width, size // width))
        raw = path.read_bytes()
        lzma_bits = len(lzma.compress(raw, preset=9)) * 8 - (len(raw) * 8 - bits * params)
        lines.append(f"| {label} | {bits:.4f} | {fixed / params:.4f} | {ideal / params:.4f} | "
                     f"{lzma_bits / params:.4f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.deltadct_plus_study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", nargs="+", default=["vit", "t5", "gpt"], choices=sorted(ZOO_ADAPTER))
    parser.add_argument("--configs", nargs="+", default=["choose"],
                        help="config names, or the sets 'choose' / 'confirm' (default %(default)s)")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS))
    parser.add_argument("--tasks", nargs="+", default=None, help="tasks to run (default: the zoo's study tasks)")
    parser.add_argument("--out", default="results/deltadct_plus")
    parser.add_argument("--tolerance", type=float, default=KNOB_TOLERANCE,
                        help="relative distance of the measured bits from the budget (default %(default)s)")
    parser.add_argument("--side-info", action="store_true", help="write the side-information table instead")
    parser.add_argument("--summary-only", action="store_true", help="only rebuild summary.md from study.csv")
    args = parser.parse_args(argv)

    from deltadct.errors import DeltaDCTError

    out = Path(args.out)
    store = out / "study.csv"
    configs = {**CONFIGS, PRESET: preset_config()}
    names = [name for item in args.configs for name in SETS.get(item, [item])]
    unknown = [n for n in names if n not in configs]
    if unknown:
        print(f"deltadct_plus_study: error: unknown config(s) {unknown}; known: {sorted(configs)}", file=sys.stderr)
        return 2
    rows = read_rows(store)
    try:
        with tempfile.TemporaryDirectory(prefix="deltadct-plus-") as scratch_dir:
            scratch = Path(scratch_dir)
            for family in ([] if args.summary_only else args.zoo):
                zoo = Zoo(family)
                tasks = args.tasks or list(ZOO_TASKS[family])
                if args.side_info:
                    knob = match_knob(zoo, tasks[0], configs[PRESET], 1.0, scratch)
                    table = side_info_table(zoo, tasks[0], 1.0, knob, scratch)
                    atomic_write_text(out / f"side_info_{family}.md", table)
                    print(table)
                    continue
                references: dict = {}
                for budget in args.budgets:
                    for name in names:
                        config = configs[name]
                        if budget not in config.budgets:
                            continue
                        if all(any(r["zoo"] == family and r["task"] == t and r["budget"] == budget
                                   and r["config"] == name for r in rows) for t in tasks):
                            continue
                        knob = match_knob(zoo, tasks[0], config, budget, scratch, args.tolerance)
                        for task in tasks:
                            row = run_point(zoo, task, config, budget, knob, scratch, references)
                            # re-read first: studies of other zoos may be writing the same store
                            rows = [r for r in read_rows(store) if not (
                                r["zoo"] == family and r["task"] == task and r["budget"] == budget
                                and r["config"] == name)] + [row]
                            write_rows(store, rows)
                            print(f"{family} {task} {budget:g} {name:40s} bits={row['bits_per_param']:.3f} "
                                  f"err={row['rel_error']:.3f} kl={row['kl']:.4g} score={row['score']:.4f}",
                                  flush=True)
    except DeltaDCTError as err:
        print(f"deltadct_plus_study: error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 2
    rows = read_rows(store)
    if rows and not args.side_info:
        atomic_write_text(out / "summary.md", summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
