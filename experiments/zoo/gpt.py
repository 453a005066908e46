"""GPT family (causal LM / LLM role): a tiny GPT-2 pre-trained here on SST-2 and CoLA sentences,
then fully fine-tuned on prompted tasks scored by comparing the log-likelihoods of answer choices.

Each task also gets a local lm-eval task (YAML + JSONL of the evaluation set, no hub) that
lm-eval 0.4.13 runs with ``TaskManager(include_path=...)``; its ``acc``/``mcc`` equals the score
recorded here, because both pick the answer word with the highest summed log-likelihood.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from experiments.zoo.common import ZooEntry, batch_indices, deterministic, finetune_each_task, save_base, train_loop
from experiments.zoo.glue import GLUE_TASKS, pretraining_sentences
from experiments.zoo.hf import quiet_transformers

VOCAB = 4096  # multiple of 64
EOS = "<|endoftext|>"
MODEL = dict(n_positions=128, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
MAX_LEN = 96
# task -> (lm-eval task name, prompt with {column} fields, answer choices by label id, lm-eval metric)
PROMPTS = {
    "sst2": ("zoo_sst2_sentiment", "Review: {sentence}\nSentiment:", ("negative", "positive"), "acc"),
    "cola": ("zoo_cola_grammar", "Sentence: {sentence}\nIs this sentence grammatical? Answer:", ("no", "yes"), "mcc"),
}
# (pre-training steps, {task: fine-tuning steps}, eval examples or None for all). 600 SST-2 steps at
# lr 1e-3 are what the fast model needs to learn the task (0.77 vs the base's 0.52 on 128 examples);
# 100 steps at 2e-3 left it at the base's score.
SCHEDULE = {
    "fast": (100, {"sst2": 600, "cola": 20}, 128),
    "full": (3000, {"sst2": 1500, "cola": 600}, None),
}
BATCH, LR_PRETRAIN, LR_FINETUNE = 32, 2e-3, 1e-3
#: bumped whenever the schedule or hyper-parameters change, so cached zoos of an older recipe are rebuilt
RECIPE_VERSION = 2


def train_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Prompt words are part of the tokenizer's corpus so they are whole tokens, as in a real LLM.
    prompts = [p.format(sentence="") + " " + " ".join(choices) for _, p, choices, _ in PROMPTS.values()]
    tok.train_from_iterator(sentences + prompts * 50, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def lm_loss(model, rows: list[list[int]], masks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Next-token loss on the positions where ``masks`` is 1 (answers only, or whole sentences)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    labels = ids.masked_fill(mask == 0, -100)
    return model(input_ids=ids, attention_mask=(torch.arange(width) < torch.tensor(
        [[len(r)] for r in rows])).long(), labels=labels).loss


def prompt_text(name: str, ex: dict) -> str:
    return PROMPTS[name][1].format(**dict(zip(GLUE_TASKS[name].text_columns, ex["texts"], strict=True)))


@torch.no_grad()
def predict(model, tokenizer, name: str, examples: list[dict]) -> list[int]:
    """Label id whose answer ``" <word>"`` has the highest summed log-likelihood after the prompt."""
    model.eval()
    choices = [tokenizer(" " + c)["input_ids"] for c in PROMPTS[name][2]]
    out = []
    for ex in examples:
        context = tokenizer(prompt_text(name, ex))["input_ids"][-(MAX_LEN - 8):]
        scores = []
        for cont in choices:
            ids = torch.tensor([context + cont])
            logp = F.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            targets = ids[0, 1:]
            scores.append(float(logp[len(context) - 1:].gather(1, targets[len(context) - 1:, None]).sum()))
        out.append(max(range(len(scores)), key=scores.__getitem__))
    return out


def write_lm_eval_task(task_dir: Path, final_task_dir: Path, name: str, examples: list[dict]) -> None:
    """lm-eval task YAML + JSONL; the YAML names the JSONL by its final absolute path, because
    lm-eval resolves ``data_files`` against the working directory, not the YAML."""
    lm_task, prompt, choices, metric = PROMPTS[name]
    columns = GLUE_TASKS[name].text_columns
    task_dir.mkdir(parents=True, exist_ok=True)
    with open(task_dir / f"{lm_task}.jsonl", "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({**dict(zip(columns, ex["texts"], strict=True)), "label": ex["label"]}) + "\n")
    jinja_prompt = prompt.replace("{", "{{").replace("}", "}}").replace("\n", "\\n")
    (task_dir / f"{lm_task}.yaml").write_text(
        f"task: {lm_task}\n"
        f"dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {json.dumps(str(final_task_dir / f'{lm_task}.jsonl'))}\n"
        f"validation_split: validation\n"
        f"output_type: multiple_choice\n"
        f"doc_to_text: \"{jinja_prompt}\"\n"
        f"doc_to_choice: {json.dumps(list(choices))}\n"
        f"doc_to_target: label\n"
        f"target_delimiter: \" \"\n"
        f"metric_list:\n  - metric: {metric}\n"
        f"metadata:\n  version: 1.0\n")


def build(out: Path, *, mode: str, seed: int, progress: bool, final: Path) -> ZooEntry:
    pre_steps, ft_steps, max_eval = SCHEDULE[mode]
    base_dir = out / "base"
    with quiet_transformers(), deterministic(seed):
        sentences = pretraining_sentences()
        tokenizer = train_tokenizer(sentences)
        eos = tokenizer.eos_token_id
        corpus = [ids + [eos] for ids in tokenizer(sentences, truncation=True, max_length=MAX_LEN - 1)["input_ids"]]
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, bos_token_id=eos, eos_token_id=eos, **MODEL))

        def pretrain_loss(step: int) -> torch.Tensor:
            rows = [corpus[i] for i in batch_indices(len(corpus), BATCH, step, seed)]
            return lm_loss(model, rows, [[1] * len(r) for r in rows], eos)

        train_loop(model, pretrain_loss, pre_steps, LR_PRETRAIN, "gpt: pre-train base", progress)
        tokenizer, base_state = save_base(model, tokenizer, base_dir)

        def loss_for(model, name: str, train: list, t_i: int):
            contexts = [ids[-(MAX_LEN - 8):] for ids in tokenizer([prompt_text(name, ex) for ex in train])["input_ids"]]
            answers = [tokenizer(" " + c)["input_ids"] for c in PROMPTS[name][2]]

            def loss(step: int) -> torch.Tensor:
                idx = batch_indices(len(train), BATCH, step, seed + t_i)
                rows = [contexts[i] + answers[train[i]["label"]] for i in idx]
                masks = [[0] * len(contexts[i]) + [1] * len(answers[train[i]["label"]]) for i in idx]
                return lm_loss(model, rows, masks, eos)

            return loss

        def data_spec(name: str, val: list) -> dict:
            lm_dir = out / "data" / "lm_eval"
            write_lm_eval_task(lm_dir, final / "data" / "lm_eval", name, val)
            return {"kind": "lm_eval", "task": PROMPTS[name][0], "include_path": lm_dir,
                    "lm_eval_metric": PROMPTS[name][3], "num_examples": len(val)}

        tasks = finetune_each_task(
            out, ft_steps, family="gpt", load_base=lambda: GPT2LMHeadModel.from_pretrained(base_dir),
            loss_for=loss_for, predict=lambda model, name, val: predict(model, tokenizer, name, val),
            data_spec=data_spec, tokenizer=tokenizer, base_state=base_state, lr=LR_FINETUNE, max_eval=max_eval,
            seed=seed, progress=progress)
    return ZooEntry("gpt", mode, seed, base_dir, tasks, out)
