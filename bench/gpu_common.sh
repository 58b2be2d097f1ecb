# Sourced by the bench/gpu_*.sh scripts after they set OUT, BUDGET_S and LOG (a file name under $OUT):
# logs to the terminal and $OUT/$LOG, defines `left` (seconds of BUDGET_S left) and `step` (a timed
# heading), prints the machine and installs this package on the offline GPU machine (wheels carried in
# .whl/, made by bench/fetch_wheels.sh).
mkdir -p "$OUT"
exec > >(tee "$OUT/$LOG") 2>&1
left() { echo $((BUDGET_S - SECONDS)); }
# `timeout` with a kill 15 s after its SIGTERM: a benchmark stopped while a worker thread compiles waits up to
# 2 minutes for it and then may not exit at all (2026-11-27: that hung the rest of a GPU session's script)
limit() { timeout -k 15 "$@"; }
# a script may define `on_step` (run before each heading, e.g. to pack the results so far)
step() { if declare -F on_step >/dev/null; then on_step; fi; echo; echo "=== [$(date -u +%H:%M:%S), ${SECONDS}s] $*"; }

step "machine + install (offline: wheels carried in .whl/)"
date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
export MEGACTOR_PROGRESS=0 PYTHONUNBUFFERED=1
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
