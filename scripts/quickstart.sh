#!/usr/bin/env bash
# From a fresh machine to a trained stage-1 encoder pair on the embedded shapes-world data:
# installs what is missing, builds, generates the data and a tokenizer, trains, evaluates.
# Re-running resumes / skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
scripts/build.sh

BIN=build/trialign
DATA=data/shapes
RUN=runs/quickstart/stage1

if [ ! -f "$DATA/val.jsonl" ]; then
  "$BIN" data shapes --out "$DATA" --train 10000 --val 1000 --seed 0
fi
if [ ! -f "$DATA/tokenizer.model" ]; then
  "$BIN" tokenizer train --manifest "$DATA/train.jsonl" --out "$DATA/tokenizer" --vocab-size 64
fi

start=$(date +%s)
"$BIN" train configs/stage1_contrastive.yaml --resume auto
echo "stage 1 trained in $(( $(date +%s) - start ))s"

"$BIN" eval "$RUN" --data "$DATA/val.jsonl" --out "$RUN/eval_val.json" > /dev/null
python3 - "$RUN/eval_val.json" <<'PY' 2>/dev/null || cat "$RUN/eval_val.json"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"\nheld-out retrieval on {r['pairs']} pairs ({r['checkpoint']}):")
print(f"  image->text  R@1 {r['i2t/R@1']:.3f}  R@5 {r['i2t/R@5']:.3f}  R@10 {r['i2t/R@10']:.3f}")
print(f"  text->image  R@1 {r['t2i/R@1']:.3f}  R@5 {r['t2i/R@5']:.3f}  R@10 {r['t2i/R@10']:.3f}")
print(f"  cosine matched {r['cosine/matched']:.3f} vs mismatched {r['cosine/mismatched']:.3f}")
PY
