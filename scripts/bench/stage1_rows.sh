#!/bin/bash
# The stage-1 card through trialign, the Python PyTorch loop as a user writes it, and the loop with
# each tower's last layer on its pooled row only (torch_bench.py --pooled-top, what trialign
# does), interleaved ROUNDS times in one session; prints median step times and ratios.
#   ROUNDS=3 scripts/bench/stage1_rows.sh
# Needs a build (build/trialign) and Debian's python3-torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/trialign}
PY=${PY:-/usr/bin/python3}
THREADS=${THREADS:-2}
PRECISION=${PRECISION:-fp32}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-runs/bench/stage1_rows}
mkdir -p "$OUT"
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; apt-get install python3-torch" >&2; exit 2; }
for r in $(seq "$ROUNDS"); do
  echo "== round $r" >&2
  "$BIN" bench configs/bench/stage1.yaml --set run.precision="$PRECISION" --set run.threads="$THREADS" \
    --set run.out_dir="$OUT/run" --json "$OUT/trialign-$r.json" > /dev/null 2>&1
  OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py stage1 --precision "$PRECISION" --threads "$THREADS" \
    > "$OUT/torch-$r.json"
  OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py stage1 --precision "$PRECISION" --threads "$THREADS" \
    --pooled-top > "$OUT/torchrows-$r.json"
done
"$PY" - "$OUT" "$ROUNDS" <<'PYEOF'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
step = lambda name, r: json.load(open(f"{out}/{name}-{r}.json"))["median_step_s"]
print("| round | trialign | PyTorch loop | PyTorch loop, --pooled-top | trialign / loop | trialign / loop --pooled-top |")
print("|---|---:|---:|---:|---:|---:|")
rows = []
for r in range(1, rounds + 1):
    t, p, q = step("trialign", r), step("torch", r), step("torchrows", r)
    rows.append((t, p, q))
    print(f"| {r} | {t:.3f} s | {p:.3f} s | {q:.3f} s | {p / t:.2f} | {q / t:.2f} |")
t, p, q = (statistics.median(c) for c in zip(*rows))
print(f"| median | {t:.3f} s | {p:.3f} s | {q:.3f} s | **{p / t:.2f}** | **{q / t:.2f}** |")
PYEOF
