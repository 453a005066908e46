"""CPU time of the eight-task MiniLM GLUE study (``experiment=glue_minilm_matched``), from its two costs.

Measures, on the real all-MiniLM-L6-v2 and the real GLUE validation sets, with however many threads
torch is given (``--threads``):

- one forward pass over each task's whole validation set, at the zoo's max length and eval batch:
  the study runs one per (method, bits target, fine-tune, task) and one of each fine-tuned reference
  (the task metric and the fidelity evaluator share them, and a sweep's jobs share the reference's:
  ``eval.base.shared_outputs``);
- a few fine-tuning steps per task at the zoo's batch size and length (the full recipe's step counts
  give the zoo build).

and projects the study run as one sweep (one process): zoo builds for ``--seeds`` fine-tunes, then
``--methods`` rows at ``--targets`` bits targets plus the reference. Compression itself is not in the
projection (on two cores: 0.3–3 s per task and trial for most methods, 3–8 s of calibration and
13–43 s of BitDelta's scale distillation per task). Run:
``python benchmarks/bench_minilm_study.py [--threads 2] [--train-steps 3] [--targets 1] [--tasks sst2 mnli]``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from experiments.zoo.glue import GLUE_TASKS, SPLIT_SEED, finetune_splits, subsample
from experiments.zoo.minilm import EVAL_BATCH, SCHEDULE, copy_base, encode
from experiments.zoo.hf import quiet_transformers


def time_task(base_dir, tokenizer, name: str, train_steps: int) -> tuple[int, float, float]:
    """(validation examples, seconds for one pass over them, seconds per training step)."""
    steps, batch, _lr, max_length, max_eval = SCHEDULE["full"][name]
    train, val = finetune_splits(name)
    val = subsample(val, max_eval, SPLIT_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(
        base_dir, num_labels=len(GLUE_TASKS[name].label_words) or 1)
    model.eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(val), EVAL_BATCH):
            model(**encode(tokenizer, val[i:i + EVAL_BATCH], max_length))
    eval_s = time.perf_counter() - start
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    labels = torch.zeros(batch, dtype=torch.float32 if GLUE_TASKS[name].is_regression else torch.long)
    step_times = []
    for step in range(train_steps + 1):  # the first step warms up and is not counted
        start = time.perf_counter()
        loss = model(**encode(tokenizer, train[step * batch:(step + 1) * batch], max_length), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step:
            step_times.append(time.perf_counter() - start)
    return len(val), eval_s, sorted(step_times)[len(step_times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps per task (median)")
    parser.add_argument("--tasks", nargs="+", default=list(SCHEDULE["full"]), choices=list(SCHEDULE["full"]))
    parser.add_argument("--seeds", type=int, default=3, help="fine-tunes per task in the projection")
    parser.add_argument("--methods", type=int, default=17, help="compressed rows in the projection")
    parser.add_argument("--targets", type=int, default=1, help="bits targets in the projection (the preset: 3)")
    parser.add_argument("--base-dir", default="/tmp/deltadct-bench-minilm-base")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base_dir = Path(args.base_dir)
    with quiet_transformers():
        if not (base_dir / "model.safetensors").exists():
            copy_base(base_dir)
        tokenizer = AutoTokenizer.from_pretrained(base_dir)
        rows = [(name, *time_task(base_dir, tokenizer, name, args.train_steps)) for name in args.tasks]

    print(f"torch threads: {args.threads}")
    print("| task | val examples | one eval pass (s) | train step (s) | full-recipe steps | zoo fine-tune (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    pass_s = train_s = 0.0
    for name, n_val, eval_s, step_s in rows:
        steps = SCHEDULE["full"][name][0]
        pass_s += eval_s
        train_s += steps * step_s
        print(f"| {name} | {n_val} | {eval_s:.1f} | {step_s:.2f} | {steps} | {steps * step_s:.0f} |")
    # each zoo task is also scored fine-tuned and as the base: two passes
    zoo_s = args.seeds * (train_s + 2 * pass_s)
    study_s = args.seeds * (args.methods * args.targets + 1) * pass_s
    print(f"\none pass over every validation set: {pass_s:.0f} s; fine-tuning every task once: {train_s:.0f} s")
    print(f"projection, {args.seeds} fine-tunes x ({args.methods} methods x {args.targets} bits target(s) + "
          f"reference), one process: zoo {zoo_s / 3600:.2f} h + evaluation {study_s / 3600:.2f} h = "
          f"{(zoo_s + study_s) / 3600:.2f} h (compression not included)")


if __name__ == "__main__":
    main()
