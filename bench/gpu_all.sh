#!/usr/bin/env bash
# The whole GPU measurement in one call (under 10 minutes on an H100): install, build the CUDA kernels, run
# the GPU tests, the kernel benchmark and every GPU benchmark scenario; tables land in $OUT (default
# bench-results/gpu). On the lent, offline GPU machine run `bash bench/fetch_wheels.sh` here first and carry
# `.whl` (see README "Benchmarks").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-results/gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_all.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
# --- install (offline: wheels carried in .whl/; online: from the index) ---
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null && cmake --build build -j8 >/dev/null || echo "kernel build failed"
python3 -m megactor_rt.cli doctor
export MEGACTOR_PROGRESS=0 PYTHONUNBUFFERED=1
# --- GPU tests (CUDA kernels vs references) ---
timeout 120 python3 -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -5
# --- kernel benchmark ---
timeout 120 python3 bench/bench_kernels.py --out "$OUT/kernels"
# --- end-to-end scenarios: reference vs optimized (same run), faster settings ---
timeout 420 python3 -m megactor_rt.cli bench --suite gpu-full --out "$OUT/e2e"
cat "$OUT"/kernels/*.md "$OUT"/e2e/results.md 2>/dev/null
