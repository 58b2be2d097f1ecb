#!/usr/bin/env bash
# One short GPU call that compares torch.compile configurations of the denoiser window call and the SDPA
# backends on the denoiser's attention shapes (input for choosing the `--compile` defaults). Budget
# BUDGET_S (default 270 s; give the call a 300 s limit). Carry `.whl` (see bench/gpu_all.sh). Tables land
# in $OUT (default bench-results/variants); each variant runs in its own process with its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/variants}
BUDGET_S=${BUDGET_S:-270}
LOG=variants.log
. bench/gpu_common.sh
variant() {  # NAME LIMIT_S ARGS...: one profile_unet.py process (eager baseline + one compiled variant)
  local name=$1 limit=$2; shift 2
  [ "$(left)" -lt 40 ] && { echo "skipped $name: too little time left"; return; }
  [ "$limit" -gt "$(( $(left) - 5 ))" ] && limit=$(( $(left) - 5 ))
  step "variant $name (limit ${limit}s)"
  limit "$limit" python3 bench/profile_unet.py --out "$OUT" --quick --compile --name "$name" "$@" \
    | grep -v '^|' || echo "variant $name failed or timed out"
}
variant default 150 --profile compiled
step "SDPA backends on the denoiser's attention shapes"
limit 60 python3 bench/attn_backends.py --out "$OUT" | tail -8 || echo "attention benchmark failed"
variant freezing 90 --inductor freezing=1
variant graphs 60 --compile-mode reduce-overhead
variant autotune 200 --compile-mode max-autotune-no-cudagraphs --inductor freezing=1
step "tables"
cat "$OUT"/*.md
echo "done in ${SECONDS}s"
