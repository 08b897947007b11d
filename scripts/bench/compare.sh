#!/bin/bash
# The bench card through trialign and through the equivalent Python PyTorch loop
# (scripts/bench/torch_bench.py), interleaved in one session, then a markdown table of the ratios.
#   scripts/bench/compare.sh                      # fp32, 2 threads
#   PRECISIONS="fp32 bf16" CASES=stage3 scripts/bench/compare.sh
# Needs a build (build/trialign) and Debian's python3-torch (apt-get install python3-torch).
# The Python loop runs four times: as a user would start it (library defaults), with OpenBLAS
# limited to one thread, with OMP_WAIT_POLICY=PASSIVE (what trialign set for itself until
# 2026-12-07), and with GOMP_SPINCOUNT=10000 (what it sets now); the table gives the ratio to the
# default and to the fastest of the four.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-build/trialign}
PY=${PY:-/usr/bin/python3}
THREADS=${THREADS:-2}
PRECISIONS=${PRECISIONS:-fp32}
CASES=${CASES:-stage1 stage3 dpo}
OUT=${OUT:-runs/bench/compare}
mkdir -p "$OUT"
"$PY" -c "import torch" 2>/dev/null || { echo "error: $PY cannot import torch; apt-get install python3-torch" >&2; exit 2; }
for p in $PRECISIONS; do
  for c in $CASES; do
    echo "== $c $p" >&2
    "$BIN" bench "configs/bench/$c.yaml" --set run.precision="$p" --set run.threads="$THREADS" \
      --set run.out_dir="$OUT/run-$c-$p" --json "$OUT/trialign-$c-$p.json" >&2
    env -u OMP_WAIT_POLICY "$PY" scripts/bench/torch_bench.py "$c" --precision "$p" --threads "$THREADS" \
      > "$OUT/torchd-$c-$p.json"
    env -u OMP_WAIT_POLICY OPENBLAS_NUM_THREADS=1 "$PY" scripts/bench/torch_bench.py "$c" --precision "$p" \
      --threads "$THREADS" > "$OUT/torch1-$c-$p.json"
    OMP_WAIT_POLICY=PASSIVE "$PY" scripts/bench/torch_bench.py "$c" --precision "$p" --threads "$THREADS" \
      > "$OUT/torchp-$c-$p.json"
    env -u OMP_WAIT_POLICY GOMP_SPINCOUNT=10000 "$PY" scripts/bench/torch_bench.py "$c" --precision "$p" \
      --threads "$THREADS" > "$OUT/torchs-$c-$p.json"
  done
done
"$PY" - "$OUT" "$PRECISIONS" "$CASES" <<'PYEOF'
import json, sys
out, precisions, cases = sys.argv[1], sys.argv[2].split(), sys.argv[3].split()
print("| case | precision | trialign steps/s | PyTorch steps/s: default / OpenBLAS 1 thread / OMP_WAIT_POLICY=PASSIVE "
      "/ GOMP_SPINCOUNT=10000 "
      "| trialign / PyTorch default | trialign / best PyTorch | trialign data wait | trialign share of matmul peak |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for p in precisions:
    for c in cases:
        t = json.load(open(f"{out}/trialign-{c}-{p}.json"))
        py = [json.load(open(f"{out}/torch{v}-{c}-{p}.json"))["steps_per_s"] for v in "d1ps"]
        print(f"| {c} | {p} | {t['steps_per_s']:.3f} | {py[0]:.3f} / {py[1]:.3f} / {py[2]:.3f} / {py[3]:.3f} | "
              f"{t['steps_per_s'] / py[0]:.2f} | {t['steps_per_s'] / max(py):.2f} | {100 * t['data_wait_share']:.2f} % | "
              f"{100 * t['fraction_of_matmul_peak']:.0f} % |")
PYEOF
