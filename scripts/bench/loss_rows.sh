#!/bin/bash
# Bench cards through trialign, the Python PyTorch loop as a user writes it, and the loop with the
# last layer on the rows the loss reads only (torch_bench.py --pooled-top, what trialign does: each
# tower's pooled row for stage1, the LLM's reply rows for stage3 and dpo), interleaved ROUNDS times
# in one session; prints median step times and ratios per card.
#   ROUNDS=3 CASES="stage1 stage3 dpo" scripts/bench/loss_rows.sh
# Needs a build (build/trialign) and Debian's python3-torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/trialign}
PY=${PY:-/usr/bin/python3}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-fp32}
ROUNDS=${ROUNDS:-3}
CASES=${CASES:-stage1 stage3 dpo}
OUT=${OUT:-runs/bench/loss_rows}
mkdir -p "$OUT"
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; apt-get install python3-torch" >&2; exit 2; }
for r in $(seq "$ROUNDS"); do
  for c in $CASES; do
    echo "== round $r, $c" >&2
    "$BIN" bench "configs/bench/$c.yaml" --set run.precision="$PRECISION" --set run.threads="$THREADS" \
      --set run.out_dir="$OUT/run-$c" --json "$OUT/$c-trialign-$r.json" > /dev/null 2>&1
    OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py "$c" --precision "$PRECISION" --threads "$THREADS" \
      > "$OUT/$c-torch-$r.json"
    OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py "$c" --precision "$PRECISION" --threads "$THREADS" \
      --pooled-top > "$OUT/$c-torchrows-$r.json"
  done
done
"$PY" - "$OUT" "$ROUNDS" $CASES <<'PYEOF'
import json, statistics, sys
out, rounds, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
step = lambda c, name, r: json.load(open(f"{out}/{c}-{name}-{r}.json"))["median_step_s"]
print("| card | round | trialign | PyTorch loop | PyTorch loop, --pooled-top | trialign / loop | trialign / loop --pooled-top |")
print("|---|---|---:|---:|---:|---:|---:|")
for c in cases:
    rows = []
    for r in range(1, rounds + 1):
        t, p, q = step(c, "trialign", r), step(c, "torch", r), step(c, "torchrows", r)
        rows.append((t, p, q))
        print(f"| {c} | {r} | {t:.3f} s | {p:.3f} s | {q:.3f} s | {p / t:.2f} | {q / t:.2f} |")
    t, p, q = (statistics.median(x) for x in zip(*rows))
    print(f"| {c} | median | {t:.3f} s | {p:.3f} s | {q:.3f} s | **{p / t:.2f}** | **{q / t:.2f}** |")
PYEOF
