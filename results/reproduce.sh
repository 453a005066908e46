#!/usr/bin/env bash
# Re-run every committed study on the offline zoo, then rebuild its tables (results/README.md).
#   results/reproduce.sh              # every stage: vit rd minilm t5 gpt tables (the full zoos build first:
#                                     # ~1.5 h on 2 busy cores; then about an hour of runs)
#   results/reproduce.sh vit tables   # some stages (also plus: the Delta-DCT+ study); `tables` only rebuilds Markdown/CSV/PNG from the records
# Runs already in a store are skipped by the runner, so a killed run resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
PY=${PYTHON:-python}

# study store -> "zoo pair, zoo mode, eval bounds"
VIT="model=zoo_vit zoo.mode=full store.path=results/zoo_vit/records.jsonl"
MINILM="model=zoo_minilm zoo.mode=full store.path=results/zoo_minilm/records.jsonl eval.glue.max_samples=512"
T5="model=zoo_t5 zoo.mode=full store.path=results/zoo_t5/records.jsonl eval.glue.max_samples=512"
GPT="model=zoo_gpt zoo.mode=${GPT_MODE:-full} store.path=results/zoo_gpt/records.jsonl eval.lm_eval.limit=512"

sweep() { $PY -m experiments.run -m keep_deltas=false "$@"; }
single() { $PY -m experiments.run hydra.mode=RUN keep_deltas=false "$@"; }

# A paper table with every method, each at its setting nearest 1 bit/param: the preset's methods, then
# DARE (3 seeds) and magnitude sparsification (fp16 values + positions), 1-bit round-to-nearest and
# deltadct_auto at a 1-bit budget; every run carries the table's title. The vision and GLUE presets list
# the calibrated methods too (delta_come, deltazip, bitdelta_distilled, on calibration=task samples of
# each task's training split); delta_come_rtn is Delta-CoMe's data-free variant (records named
# delta_come from before it existed).  paper_table PRESET TITLE ARGS...
paper_table() {
  local preset=$1 title=$2; shift 2
  set -- experiment=$preset "$@" "table.title='$title'"
  sweep "$@"
  sweep "$@" method=dare method.p=0.975 method.seed=0,1,2
  sweep "$@" method=magnitude method.bits=1.0
  sweep "$@" method=rtn method.bits=1
  sweep "$@" method=deltadct_auto
}

# A text zoo's studies: its paper table, Delta-DCT's two sweeps (patch size, 2-bit share), the DCT
# ablation and the rescale ablation (with the base model as its floor), on every task.
text_studies() {
  paper_table "$@"
  shift 2
  for ablation in ablation_patch_size ablation_ratio ablation_rescale; do sweep experiment=$ablation "$@"; done
  single experiment=ablation_rescale method=zero "$@"
  sweep experiment=ablation_dct tasks=null "$@"
}

vit() {
  # paper table: every method at ~1 bit/param (ViT-L/14 and BEiT-3 presets map to this same zoo pair)
  paper_table vision_vit_b32 "Vision table on the ViT zoo (stand-in for CLIP ViT-B/32): every method at ~1 bit/param" $VIT
  # ablations on all ViT zoo tasks, plus the base model as the floor of the rescale ablation
  for preset in ablation_patch_size ablation_ratio ablation_importance ablation_rescale; do
    sweep experiment=$preset $VIT
  done
  single experiment=ablation_rescale method=zero $VIT
  sweep experiment=ablation_dct $VIT tasks=null "table.title='Delta-DCT with and without the DCT (ViT zoo, all tasks)'"
  # data-free automatic allocation at 0.5-2 bits/param, and its error against the best fixed ratios
  sweep experiment=auto_vs_fixed $VIT
  $PY benchmarks/auto_vs_fixed.py --zoo vit:full > results/auto_vs_fixed/vit_full.md
}

rd() {
  # rate-distortion study: every method from 0.5 to 4 bits/param (DARE with 3 seeds) on the ViT zoo
  $PY -m experiments.rate_distortion --model zoo_vit --zoo-mode full --out results/rate_distortion
}

minilm() {
  text_studies glue_roberta_base "GLUE table on the MiniLM zoo (stand-in for RoBERTa-base): every method at ~1 bit/param" $MINILM
}

t5() {  # the paper's DCT ablation is on T5 CoLA; text_studies runs it on every T5 task
  text_studies glue_t5_base "GLUE table on the T5 zoo (stand-in for T5-base): every method at ~1 bit/param" $T5
}

gpt() {  # llm_code and llm_chat map to this same zoo pair as llm_math
  text_studies llm_math "LLM table on the GPT zoo (stand-in for WizardMath/Llama-2): every method at ~1 bit/param" $GPT
}

seeds() {  # three fine-tunes (zoo seeds) per task on the fast ViT zoo, full validation: mean ± 95% CI, paired tests
  sweep experiment=seeds_vit zoo.mode=fast store.path=results/zoo_vit_fast_seeds/records.jsonl
  $PY -m experiments.tables --store results/zoo_vit_fast_seeds/records.jsonl --experiment seeds_vit \
    --metric fidelity/score --no-plots > /dev/null
}

minilm8() {
  # needs a GPU (not in the default stages): the eight-task MiniLM zoo trained there (deterministic), three
  # fine-tunes, every method at 1.0 measured bit, whole validation sets; configs already in the store are
  # skipped, so this re-runs only what is missing. On a CPU drop the two device overrides (~7 h, one sweep)
  local store=results/zoo_minilm_cuda_det/records.jsonl
  sweep experiment=glue_minilm_matched budget.bits=1.0 device=cuda zoo.device=cuda store.path=$store
  $PY -m experiments.tables --store $store --experiment glue_minilm_matched > /dev/null
  $PY -m experiments.tables --store $store --experiment glue_minilm_matched --metric fidelity/score --no-plots > /dev/null
}

plus() {
  # Delta-DCT beyond the paper: every codec option at matched measured bits (0.5/1/2) on the fast ViT,
  # T5 and GPT zoos (where deltadct_plus was chosen), the preset confirmed on the fast MiniLM zoo,
  # the side-information table, and the speed of each option against the paper's codec
  $PY -m experiments.deltadct_plus_study --zoo vit t5 gpt --configs choose --out results/deltadct_plus
  $PY -m experiments.deltadct_plus_study --zoo minilm --configs confirm --out results/deltadct_plus
  $PY -m experiments.deltadct_plus_study --zoo vit --side-info --out results/deltadct_plus
  $PY benchmarks/bench_deltadct_plus.py --layers 2 --threads 2
}

tables() {
  for store in results/*/records.jsonl; do
    study=$(dirname "$store")
    [ "$study" = results/rate_distortion ] && continue
    for experiment in $($PY -c "import sys; from experiments.store import ResultStore
print(' '.join(sorted({r['experiment'] for r in ResultStore(sys.argv[1]).records()})))" "$store"); do
      $PY -m experiments.tables --store "$store" --experiment "$experiment" > /dev/null
      $PY -m experiments.tables --store "$store" --experiment "$experiment" --metric reconstruction/score \
        --no-plots > /dev/null
    done
  done
  $PY -m experiments.rate_distortion --plot-only --out results/rate_distortion
}

if [ $# -eq 0 ]; then set -- vit rd minilm t5 gpt seeds plus tables; fi
for stage in "$@"; do
  case "$stage" in
    vit|rd|minilm|minilm8|t5|gpt|seeds|plus|tables) "$stage" ;;
    *) echo "usage: results/reproduce.sh [vit|rd|minilm|minilm8|t5|gpt|seeds|plus|tables]..." >&2; exit 2 ;;
  esac
done
