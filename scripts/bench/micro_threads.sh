#!/bin/bash
# Micro-batches on threads (train.micro_batch_threads) on the stage-3 and DPO bench cards:
# trialign as the card runs, trialign with the batch in MICRO micro-batches run at once, and the
# Python PyTorch loop both ways (torch_bench.py, --micro-threads for the threaded one), all
# interleaved ROUNDS times in one session; prints median step times and ratios as a markdown table.
#   scripts/bench/micro_threads.sh
#   MICRO=2 ROUNDS=3 CASES=stage3 PRECISION=fp32 scripts/bench/micro_threads.sh
#   PY_ARGS=--pooled-top scripts/bench/micro_threads.sh   # the loop with trialign's last-layer pruning
# Needs a build (build/trialign) and Debian's python3-torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/trialign}
PY=${PY:-/usr/bin/python3}
THREADS=${THREADS:-2}
MICRO=${MICRO:-$THREADS}
PRECISION=${PRECISION:-fp32}
CASES=${CASES:-stage3 dpo}
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-6}
OUT=${OUT:-runs/bench/micro}
read -r -a PY_ARGS <<< "${PY_ARGS:-}"  # extra torch_bench.py arguments for both loops
mkdir -p "$OUT"
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; apt-get install python3-torch" >&2; exit 2; }
for r in $(seq "$ROUNDS"); do
  for c in $CASES; do
    echo "== round $r: $c" >&2
    common=(--set run.precision="$PRECISION" --set run.threads="$THREADS" --set bench.warmup=2 --set bench.steps="$STEPS")
    "$BIN" bench "configs/bench/$c.yaml" "${common[@]}" --set run.out_dir="$OUT/run-$c" \
      --json "$OUT/trialign-$c-1-$r.json" > /dev/null 2>&1
    "$BIN" bench "configs/bench/$c.yaml" "${common[@]}" --set run.out_dir="$OUT/run-$c" \
      --set train.grad_accum="$MICRO" --set train.micro_batch_threads="$MICRO" \
      --json "$OUT/trialign-$c-$MICRO-$r.json" > /dev/null 2>&1
    OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py "$c" --precision "$PRECISION" --threads "$THREADS" \
      --warmup 2 --steps "$STEPS" "${PY_ARGS[@]}" > "$OUT/torch-$c-1-$r.json"
    OMP_WAIT_POLICY=PASSIVE OPENBLAS_NUM_THREADS=1 "$PY" scripts/bench/torch_bench.py "$c" --precision "$PRECISION" \
      --threads "$THREADS" --warmup 2 --steps "$STEPS" --micro-threads "$MICRO" "${PY_ARGS[@]}" > "$OUT/torch-$c-$MICRO-$r.json"
  done
done
"$PY" - "$OUT" "$CASES" "$MICRO" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
out, cases, micro, rounds = sys.argv[1], sys.argv[2].split(), sys.argv[3], int(sys.argv[4])
med = lambda name: statistics.median(json.load(open(f"{out}/{name}-{r}.json"))["median_step_s"] for r in range(1, rounds + 1))
print(f"| case | trialign step | trialign, {micro} micro-batches at once | PyTorch step | PyTorch, {micro} micro-batches "
      "on threads | trialign threaded / trialign | trialign threaded / PyTorch | trialign threaded / PyTorch threaded |")
print("|---|" + "---:|" * 7)
for c in cases:
    t1, tm, p1, pm = (med(f"{w}-{c}-{k}") for w, k in (("trialign", 1), ("trialign", micro), ("torch", 1), ("torch", micro)))
    print(f"| {c} | {t1:.3f} s | {tm:.3f} s | {p1:.3f} s | {pm:.3f} s | {t1 / tm:.2f} | {p1 / tm:.2f} | {pm / tm:.2f} |")
PYEOF
