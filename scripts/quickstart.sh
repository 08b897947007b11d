#!/usr/bin/env bash
# From a fresh machine to a vision-language model trained on the embedded shapes-world data:
# installs what is missing, builds, generates the data and a tokenizer, then runs the
# quickstart pipeline (configs/pipeline/quickstart.yaml): language-model pretraining, stage 1
# (contrastive encoders), stage 2 (projector, frozen LLM), stage 3 (projector + LLM), mDPO
# preference alignment against hallucinated captions, and prints what each stage reached on
# held-out data (all of it also in runs/quickstart/pipeline.json).
# Re-running skips what is done: finished stages are not trained again, an interrupted stage
# resumes from its newest checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh

BIN=build/trialign
DATA=data/shapes

# val_pope.jsonl is the last file the generator writes; format_version 2 added the yes/no
# preference pairs, 3 the shape-only existence questions, 4 the position questions, 5 moved the
# yes/no pairs to files of their own (train_pref_yesno.jsonl, val_pref_yesno.jsonl) (older data
# is regenerated: same seed, same bytes for every file that did not change). A tokenizer already
# there is kept, since checkpoints under runs/ were trained with its ids; it spells the words the
# newer data added ("where", "top", ...) in smaller pieces. Delete it, and runs/quickstart, to
# get what a fresh clone trains.
if [ ! -f "$DATA/val_pope.jsonl" ] || ! grep -q '"format_version": 5' "$DATA/shapes_world.json"; then
  "$BIN" data shapes --out "$DATA" --train 10000 --val 1000 --seed 0 --overwrite
fi
if [ ! -f "$DATA/tokenizer.model" ]; then
  # BPE over captions and conversations: every shapes-world word becomes one piece.
  "$BIN" tokenizer train --manifest "$DATA/train.jsonl" "$DATA/train_instruct.jsonl" \
    --field caption conversations --model-type bpe --vocab-size 192 --out "$DATA/tokenizer"
fi

start=$(date +%s)
"$BIN" run configs/pipeline/quickstart.yaml --nproc 2
echo "pipeline: $(( $(date +%s) - start ))s (stages already complete are skipped)"
echo "try it:   $BIN generate runs/quickstart/stage3 --image $DATA/images/val/000000.png --prompt 'What colour is the star?'"
