"""T5 family (encoder-decoder role): a tiny ``T5ForConditionalGeneration`` pre-trained here with span
corruption on SST-2 and CoLA sentences, then fully fine-tuned text-to-text on SST-2, CoLA and RTE.

The tokenizer is a BPE model (with a SentencePiece-style metaspace) trained here on the same
sentences, with T5's special tokens (``<pad>``, ``</s>``, ``<unk>``, ``<extra_id_N>`` sentinels), saved
as a fast tokenizer dir that ``AutoTokenizer.from_pretrained`` loads. Scores come from greedy
generation mapped to label words; a generation that is no label word counts as wrong.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from experiments.zoo.common import ZooEntry, batch_indices, deterministic, finetune_each_task, save_base, train_loop
from experiments.zoo.glue import GLUE_TASKS, pretraining_sentences, write_eval_data
from experiments.zoo.hf import quiet_transformers

VOCAB = 4096  # multiple of 64; 32 of it are sentinels
SENTINELS = [f"<extra_id_{i}>" for i in range(32)]
MODEL = dict(d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=3, num_heads=4,
             feed_forward_proj="relu", dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
MAX_INPUT, MAX_TARGET = 96, 8
TEMPLATES = {
    "sst2": "sst2 sentence: {sentence}",
    "cola": "cola sentence: {sentence}",
    "rte": "rte sentence1: {sentence1} sentence2: {sentence2}",
}
# (pre-training steps, {task: fine-tuning steps}, eval examples or None for all). The tiny T5 learns
# SST-2 slowly (its N(0, 1) embeddings move little at lr 1e-3): with 1000 steps it beats the majority
# class of its 128 examples (0.52) clearly; 80 to 600 steps stayed at 0.52-0.61, lr 3e-3 learned less.
SCHEDULE = {
    "fast": (100, {"sst2": 1000, "cola": 20, "rte": 20}, 128),
    "full": (3000, {"sst2": 2000, "cola": 800, "rte": 400}, None),
}
BATCH, LR_PRETRAIN, LR_FINETUNE = 32, 2e-3, 1e-3
#: bumped whenever the schedule or hyper-parameters change, so cached zoos of an older recipe are rebuilt
RECIPE_VERSION = 3


def train_tokenizer(sentences: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    # BPE, not SentencePiece's Unigram: the Unigram trainer is not deterministic (its scores differ
    # between processes in the last digits and rare pieces swap ids), so rebuilt zoos differed.
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - len(SENTINELS), special_tokens=["<pad>", "</s>", "<unk>"],
                                  show_progress=False)
    # Prompt and label words are part of the corpus so they are known pieces (no <unk> for "_").
    prompts = [t.format(sentence="", sentence1="", sentence2="") for t in TEMPLATES.values()]
    # only the zoo's own tasks: a task added to GLUE_TASKS for another family must not change this
    # tokenizer (and with it every T5 zoo of this recipe)
    words = [w for name in TEMPLATES for w in GLUE_TASKS[name].label_words]
    tok.train_from_iterator(sentences + (prompts + words) * 50, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": SENTINELS})
    return fast


def span_corrupt(ids: list[int], rng: np.random.Generator, sentinels: list[int], eos: int,
                 density: float = 0.15, mean_span: float = 3.0) -> tuple[list[int], list[int]]:
    """T5 span corruption: replace random spans by sentinels; the target lists the dropped spans."""
    n = len(ids)
    n_noise = min(max(1, round(n * density)), n - 1)
    n_spans = max(1, min(round(n_noise / mean_span), n_noise, n - n_noise, len(sentinels)))

    def lengths(total: int, parts: int) -> np.ndarray:  # random composition of total into parts >= 1
        cuts = np.sort(rng.choice(np.arange(1, total), parts - 1, replace=False)) if parts > 1 else []
        return np.diff([0, *cuts, total])

    noise, keep = lengths(n_noise, n_spans), lengths(n - n_noise, n_spans)
    inputs, targets, pos = [], [], 0
    for i in range(n_spans):
        inputs += ids[pos:pos + keep[i]] + [sentinels[i]]
        pos += keep[i]
        targets += [sentinels[i]] + ids[pos:pos + noise[i]]
        pos += noise[i]
    return inputs + ids[pos:] + [eos], targets + [eos]


def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def seq2seq_loss(model, inputs: list[list[int]], targets: list[list[int]]) -> torch.Tensor:
    input_ids = pad(inputs, 0)
    labels = pad(targets, -100)
    return model(input_ids=input_ids, attention_mask=(input_ids != 0).long(), labels=labels).loss


def render(name: str, ex: dict) -> str:
    return TEMPLATES[name].format(**dict(zip(GLUE_TASKS[name].text_columns, ex["texts"], strict=True)))


@torch.no_grad()
def predict(model, tokenizer, name: str, examples: list[dict]) -> list[int]:
    """Greedy generation mapped to label ids; -1 for anything that is not a label word."""
    model.eval()
    words = GLUE_TASKS[name].label_words
    out: list[int] = []
    for i in range(0, len(examples), 64):
        enc = tokenizer([render(name, ex) for ex in examples[i:i + 64]], truncation=True, max_length=MAX_INPUT,
                        padding="longest", return_tensors="pt")
        gen = model.generate(**enc, max_new_tokens=MAX_TARGET, do_sample=False, num_beams=1)
        for text in tokenizer.batch_decode(gen, skip_special_tokens=True):
            text = text.strip()
            out.append(words.index(text) if text in words else -1)
    return out


def build(out: Path, *, mode: str, seed: int, progress: bool, final: Path) -> ZooEntry:
    pre_steps, ft_steps, max_eval = SCHEDULE[mode]
    base_dir = out / "base"
    with quiet_transformers(), deterministic(seed):
        sentences = pretraining_sentences()
        tokenizer = train_tokenizer(sentences)
        corpus = [ids for ids in tokenizer(sentences, add_special_tokens=False, truncation=True,
                                           max_length=MAX_INPUT - 8)["input_ids"] if len(ids) >= 2]
        sentinels = tokenizer.convert_tokens_to_ids(SENTINELS)
        model = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, **MODEL))

        def pretrain_loss(step: int) -> torch.Tensor:
            rng = np.random.default_rng((seed, step))
            pairs = [span_corrupt(corpus[i], rng, sentinels, tokenizer.eos_token_id)
                     for i in batch_indices(len(corpus), BATCH, step, seed)]
            return seq2seq_loss(model, [p[0] for p in pairs], [p[1] for p in pairs])

        train_loop(model, pretrain_loss, pre_steps, LR_PRETRAIN, "t5: pre-train base", progress)
        tokenizer, base_state = save_base(model, tokenizer, base_dir)

        def loss_for(model, name: str, train: list, t_i: int):
            sources = tokenizer([render(name, ex) for ex in train], truncation=True, max_length=MAX_INPUT)["input_ids"]
            answers = tokenizer(list(GLUE_TASKS[name].label_words))["input_ids"]

            def loss(step: int) -> torch.Tensor:
                idx = batch_indices(len(train), BATCH, step, seed + t_i)
                return seq2seq_loss(model, [sources[i] for i in idx], [answers[train[i]["label"]] for i in idx])

            return loss

        def data_spec(name: str, val: list) -> dict:
            return {"kind": "glue_text2text", "task": name, "data_dir": write_eval_data(out, name, val),
                    "split": "validation", "input_template": TEMPLATES[name],
                    "label_words": list(GLUE_TASKS[name].label_words), "max_input_length": MAX_INPUT,
                    "max_new_tokens": MAX_TARGET, "num_examples": len(val)}

        tasks = finetune_each_task(
            out, ft_steps, family="t5", load_base=lambda: T5ForConditionalGeneration.from_pretrained(base_dir),
            loss_for=loss_for, predict=lambda model, name, val: predict(model, tokenizer, name, val),
            data_spec=data_spec, tokenizer=tokenizer, base_state=base_state, lr=LR_FINETUNE, max_eval=max_eval,
            seed=seed, progress=progress)
    return ZooEntry("t5", mode, seed, base_dir, tasks, out)
