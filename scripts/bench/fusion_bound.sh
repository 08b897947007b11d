#!/bin/bash
# How much could fused element-wise kernels gain? The bench card through trialign, through the
# Python PyTorch loop, and through the same loop with element-wise ops made free
# (torch_bench.py --free), interleaved ROUNDS times in one session; prints the median step times
# and ratios as a markdown table.
#   PRECISION=bf16 scripts/bench/fusion_bound.sh
#   FREES="all act norm rope softmax" CASES=stage3 scripts/bench/fusion_bound.sh   # op by op
# Needs a build (build/trialign) and Debian's python3-torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/trialign}
PY=${PY:-/usr/bin/python3}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-bf16}
CASES=${CASES:-stage1 stage3 dpo}
FREES=${FREES:-all}
ROUNDS=${ROUNDS:-4}
OUT=${OUT:-runs/bench/fusion}
mkdir -p "$OUT"
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; apt-get install python3-torch" >&2; exit 2; }
for r in $(seq "$ROUNDS"); do
  for c in $CASES; do
    echo "== round $r: $c" >&2
    "$BIN" bench "configs/bench/$c.yaml" --set run.precision="$PRECISION" --set run.threads="$THREADS" \
      --set run.out_dir="$OUT/run-$c" --json "$OUT/trialign-$c-$r.json" > /dev/null 2>&1
    for f in none $FREES; do
      free=$f; [ "$f" = none ] && free=""; [ "$f" = all ] && free="norm,rope,softmax,act"
      OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py "$c" --precision "$PRECISION" \
        --threads "$THREADS" --free "$free" > "$OUT/torch-$c-$f-$r.json"
    done
  done
done
"$PY" - "$OUT" "$CASES" "$FREES" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
out, cases, frees, rounds = sys.argv[1], sys.argv[2].split(), sys.argv[3].split(), int(sys.argv[4])
med = lambda name: statistics.median(json.load(open(f"{out}/{name}-{r}.json"))["median_step_s"] for r in range(1, rounds + 1))
print("| case | trialign step | PyTorch step | " + " | ".join(f"PyTorch, {f} free" for f in frees)
      + " | trialign / PyTorch | " + " | ".join(f"PyTorch {f} free / PyTorch" for f in frees) + " |")
print("|---|" + "---:|" * (3 + 2 * len(frees)))
for c in cases:
    t, p = med(f"trialign-{c}"), med(f"torch-{c}-none")
    fr = [med(f"torch-{c}-{f}") for f in frees]
    print(f"| {c} | {t:.3f} s | {p:.3f} s | " + " | ".join(f"{x:.3f} s" for x in fr)
          + f" | {p / t:.2f} | " + " | ".join(f"{p / x:.2f}" for x in fr) + " |")
PYEOF
