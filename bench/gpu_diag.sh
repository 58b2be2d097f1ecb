#!/usr/bin/env bash
# Diagnose a stalled end-to-end run on the GPU machine: install as gpu_all.sh does, then run the benchmark with
# every thread's Python stack dumped every DUMP_S seconds (faulthandler), stopped by SIGABRT (one last dump)
# after LIMIT_S seconds. Usage: LIMIT_S=150 bash bench/gpu_diag.sh [bench options]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu-diag}; BUDGET_S=${BUDGET_S:-300}; LOG=gpu_diag.log
LIMIT_S=${LIMIT_S:-150}; DUMP_S=${DUMP_S:-40}
. bench/gpu_common.sh
step "build the CUDA kernels (sm_90)"
timeout 60 cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null \
  && timeout 60 cmake --build build -j16 >/dev/null || echo "kernel build failed"
step "bench with stack dumps every ${DUMP_S} s, SIGABRT at ${LIMIT_S} s"
timeout -s ABRT -k 10 "$LIMIT_S" python3 -X faulthandler -c "
import faulthandler, runpy, sys
faulthandler.dump_traceback_later($DUMP_S, repeat=True)
sys.argv = ['megactor-rt', '-v', 'bench', '--out', '$OUT/e2e'] + sys.argv[1:]
runpy.run_module('megactor_rt.cli', run_name='__main__')
" "$@" 2>&1 | grep -v -e 'site-packages/torch/nn/modules/module.py' -e '^  File \"/usr/lib/python3' | tail -c 200000
echo "rc ${PIPESTATUS[0]}; done in ${SECONDS}s"
