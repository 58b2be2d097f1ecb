#!/usr/bin/env bash
# Download (here, where PyPI is reachable) the wheels the offline GPU machine lacks, into .whl/ (git-ignored).
# The GPU machine's image has torch, transformers, opencv, onnx, onnxruntime, safetensors, tqdm, pillow;
# megactor-rt additionally needs diffusers, av and dlib-bin (Python 3.12, x86-64).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
for spec in diffusers==0.42.1 av==18.1.0 dlib-bin==20.0.1.post1; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 -d .whl "$spec"
done
du -sh .whl
