# Sourced by the bench/gpu_*.sh scripts: install this package on the offline GPU machine (wheels carried in
# .whl/, made by bench/fetch_wheels.sh) and print the versions.
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || { echo "install failed"; exit 1; }
export MEGACTOR_PROGRESS=0 PYTHONUNBUFFERED=1
python3 -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")'
