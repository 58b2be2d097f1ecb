#!/usr/bin/env bash
# The whole GPU measurement in one call (budget 560 s: give the call a 590 s limit): install, build the CUDA
# kernels, run the GPU tests, the kernel benchmark, every GPU benchmark scenario, a profile of one
# denoiser call, a per-step device-time profile and (if time is left) the portrait store's saving and
# compiled UNet calls of 3 windows. Tables land in $RES (default $OUT, default bench-results/gpu), results
# after every mode, so a run cut short keeps what it measured.
# On the lent, offline GPU machine run `bash bench/fetch_wheels.sh` here first and carry `.whl` (README
# "Benchmarks"). Each step has its own time limit; a failing step does not stop the later ones.
# Where the tree arrives without its .git (the device tool's copy), give the commit for the results' provenance:
#   MEGACTOR_COMMIT=<hash of HEAD, written out> RES=/tmp/gpu_results bash bench/gpu_all.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
# Result files go to $RES (default: $OUT). On the lent GPU machine, which returns at most 8 files from $OUT,
# run with RES=/tmp/gpu_results: every result file then also comes back packed in $OUT/results.tar.gz
# (refreshed before every step, so a run cut short keeps what it measured), beside $OUT/gpu_all.log.
RES=${RES:-$OUT}
BUDGET_S=${BUDGET_S:-560}  # the whole script; the end-to-end suite gets what the earlier steps leave
E2E_ARGS=${E2E_ARGS:-}  # e.g. --modes ...; a check of this script on a CPU machine (~8 min):
#   E2E_ARGS=--dry-run PROFILE_ARGS="--tiny --quick" STEP_PROFILE_ARGS=--tiny PORTRAIT_ARGS=--tiny \
#   STREAM_MEMORY_ARGS="--frames 40 80 --steps 3" bash bench/gpu_all.sh
# bench/profile_unet.py options (--quick: timings only); the eager optimized and upstream calls' kernel classes
# beside the compiled call's say where the optimized call's time per FLOP goes (250 against 269 TFLOP/s, 2026-11-29)
PROFILE_ARGS=${PROFILE_ARGS:---compile --profile compiled eager upstream}
STEP_PROFILE_ARGS=${STEP_PROFILE_ARGS:---mode optimized}  # bench/profile_steps.py options (--tiny: CPU check)
PORTRAIT_ARGS=${PORTRAIT_ARGS:-}  # bench/portrait_cache.py options (--tiny: CPU check)
STREAM_MEMORY_ARGS=${STREAM_MEMORY_ARGS:---frames 250 1000 4000}  # bench/stream_memory.py options
# 1: skip the CUDA and Triton kernels' GPU tests and the kernel benchmark (about 50 s; for a session whose kernels
# are unchanged since their last GPU pass: `git diff <that commit> -- kernels/`); the stream tests still run
SKIP_KERNEL_CHECKS=${SKIP_KERNEL_CHECKS:-0}
LOG=gpu_all.log
on_step() {  # packed under a temporary name first: a kill mid-way leaves the last complete pack
  if [ "$RES" != "$OUT" ] && [ -d "$RES" ]; then
    tar czf "$OUT/.pack.$BASHPID" -C "$RES" . && mv "$OUT/.pack.$BASHPID" "$OUT/results.tar.gz"
  fi
}
. bench/gpu_common.sh
# and every 20 s: a step killed by the machine's own time limit still leaves what it wrote (2026-11-27: a
# whole end-to-end suite was lost, as the pack was made only between steps)
if [ "$RES" != "$OUT" ]; then
  # its sleep is killed with it; a pack it is making finishes first, and its temporary file is removed below
  ( trap 'kill $(jobs -p) 2>/dev/null; exit 0' TERM; while true; do sleep 20 & wait $!; on_step; done ) &
  packer=$!
  trap 'kill $packer 2>/dev/null; wait $packer 2>/dev/null; rm -f "$OUT"/.pack.*' EXIT
fi
mkdir -p "$RES/kernels" "$RES/e2e" "$RES/memory"

step "build the CUDA kernels (sm_90)"
limit 150 cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null \
  && limit 150 cmake --build build -j16 >/dev/null || echo "kernel build failed"
python3 -m megactor_rt.cli doctor
echo "commit: $(git rev-parse HEAD 2>/dev/null || echo "${MEGACTOR_COMMIT:-unknown (no .git, MEGACTOR_COMMIT unset)}")"

if [ "$SKIP_KERNEL_CHECKS" != 1 ]; then
step "GPU tests: CUDA kernels vs references"
limit 100 python3 -m pytest -q -m gpu tests/test_kernels.py -p no:cacheprovider 2>&1 | tail -15
if [ "${PIPESTATUS[0]}" != 0 ] && [ -d build/kernels ]; then
  echo "kernel GPU tests failed: the end-to-end runs below use the PyTorch reference ops (build/kernels moved aside)"
  mv build/kernels build/kernels.failed
fi
# the Triton kernels; a failing one is switched off for the runs below (the compiled-UNet test is left to a
# plain `pytest -m gpu`: its compilation takes a minute; the profile step checks compiled against eager)
step "GPU tests: Triton kernels (short attention, GroupNorm+SiLU)"
for pair in short_attention:MEGACTOR_SHORT_ATTENTION group_norm:MEGACTOR_TRITON_GROUP_NORM; do
  name=${pair%%:*}; var=${pair##*:}
  limit 120 python3 -m pytest -q -m gpu "tests/test_$name.py" -k "not compiled" -p no:cacheprovider 2>&1 | tail -6
  if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "$name GPU tests failed: the runs below use PyTorch there ($var=0)"
    export "$var=0"
  fi
done

step "kernel benchmark"
limit 90 python3 bench/bench_kernels.py --out "$RES/kernels" || echo "kernel benchmark failed or timed out"
fi

step "GPU tests: streams, decode pipeline (also streamed during denoising), compiled submodels"
limit 120 python3 -m pytest -q -m gpu tests/test_pipeline.py -p no:cacheprovider 2>&1 | tail -15

# in priority order (benchmark.in_run_order): the eager reference and optimized modes of every scenario (the
# headline ratio and the faster settings), then the compiled modes, then the other variants
step "end-to-end: reference vs optimized (same run), faster settings, compiled, variants ($(left) s left)"
e2e_s=$(( $(left) - 140 ))  # the profiles below get the rest; `timeout 0` would mean no limit at all
if [ "$e2e_s" -gt 30 ]; then
  limit "$e2e_s" python3 -m megactor_rt.cli bench --suite gpu-full --out "$RES/e2e" $E2E_ARGS \
    || echo "end-to-end suite: rc $? (2: a mode failed, named in results.json; 124/137: stopped by its time limit): results.json holds what finished"
else
  echo "skipped: the steps before it left too little time ($(left) s)"
fi
on_step
nvidia-smi --query-gpu=memory.used,clocks.sm,temperature.gpu --format=csv || true

step "one denoiser window call: event timing, FLOPs, kernel classes ($(left) s left)"
if [ "$(left)" -gt 60 ]; then
  limit $(( $(left) - 65 > 60 ? $(left) - 65 : $(left) - 20 )) python3 bench/profile_unet.py --out "$RES/e2e" $PROFILE_ARGS \
    || echo "profile failed or timed out"
else
  echo "skipped: too little time left"
fi

step "device-busy vs wall time per denoising step (the slow first step) ($(left) s left)"
if [ "$(left)" -gt 55 ]; then
  limit $(( $(left) - 20 )) python3 bench/profile_steps.py --out "$RES/e2e" $STEP_PROFILE_ARGS || echo "step profile failed or timed out"
else
  echo "skipped: too little time left"
fi

step "portrait store: per-portrait work computed vs read back ($(left) s left)"
if [ "$(left)" -gt 45 ]; then
  limit $(( $(left) - 20 )) python3 bench/portrait_cache.py --out "$RES/e2e" $PORTRAIT_ARGS || echo "portrait cache bench failed or timed out"
else
  echo "skipped: too little time left"
fi

step "the denoising loop's memory vs the driver's length, wrapping vs open windows ($(left) s left)"
if [ "$(left)" -gt 60 ]; then
  limit $(( $(left) - 20 < 90 ? $(left) - 20 : 90 )) python3 bench/stream_memory.py --out "$RES/memory" $STREAM_MEMORY_ARGS \
    || echo "loop memory bench failed or timed out"
else
  echo "skipped: too little time left"
fi

step "if time is left: compiled UNet calls of 3 windows vs 1 (scenario 1) ($(left) s left)"
if [ "$(left)" -gt 240 ]; then  # two cold compilations take about 4 minutes
  limit $(( $(left) - 20 )) python3 -m megactor_rt.cli bench --suite gpu-full --scenarios 1 \
    --modes optimized+compile optimized+compile+batch3 --out "$RES/e2e-batch" $E2E_ARGS \
    || echo "window-batch runs stopped early: results.json holds what finished"
else
  echo "skipped: too little time left"
fi

step "tables"
cat "$RES"/kernels/*.md "$RES"/e2e/*.md "$RES"/memory/*.md "$RES"/e2e-batch/*.md 2>/dev/null
on_step
echo "done in ${SECONDS}s"
