#!/usr/bin/env bash
# Download, here, the Python wheels that the GPU machine lacks, into .gpu_wheels/ (git-ignored), for the `run`
# tool's carry. The GPU machine (see /work/.library/device/KINDS.md) has python3 3.12 with torch 2.11+cu130,
# torchvision, numpy, scipy, accelerate, huggingface-hub, jaxtyping, rich and ninja, but no network.
#
#   scripts/gpu_wheels.sh [DEST]          # default DEST: .gpu_wheels
#   GPU_PYTHON_VERSION=3.12 (default; the device's python3 is 3.12.3 as KINDS.md records it)
#
# Versions are the ones the test venv runs. gsplat is source-only on PyPI: `pip wheel` packs it into a pure
# py3-none-any wheel WITHOUT compiling (its CUDA sources go along and are JIT-compiled at first use on the GPU).
# einops and safetensors are on the device already; the same versions travel anyway (small) in case its image
# changes. Everything is installed there with scripts/gpu_check.sh (pip --no-index --no-deps --target).
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
PYVER=${GPU_PYTHON_VERSION:-3.12}
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
BINARY=(diffusers==0.42.1 lpips==0.1.4 plyfile==1.1.5 roma==1.8.0 kornia==0.9.0 kornia_rs==0.2.0
        einops==0.8.2 safetensors==0.8.0 importlib_metadata==10.2.0)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
BUILD_NO_CUDA=1 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" gsplat==1.5.3 \
    || BUILD_NO_CUDA=1 "$PY" -m pip wheel -q --no-deps -w "$DEST" gsplat==1.5.3

# gsplat must be a pure wheel (sources only): a compiled extension here would not match the device's torch.
GS=$(ls "$DEST"/gsplat-1.5.3-*.whl)
case "$GS" in *py3-none-any.whl) ;; *) echo "error: $GS is not a pure wheel" >&2; exit 1 ;; esac
"$PY" - "$GS" <<'PYCHECK'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
if any(n.endswith((".so", ".pyd")) for n in names):
    sys.exit(f"error: {sys.argv[1]} holds a compiled library")
if "gsplat/cuda/csrc/RasterizeToPixels3DGSFwd.cu" not in names:
    sys.exit(f"error: {sys.argv[1]} lacks gsplat's CUDA sources")
PYCHECK

ls -l "$DEST"
TOTAL=$(du -sb "$DEST" | cut -f1)
echo "total: $((TOTAL / 1024 / 1024)) MiB in $DEST (the run tool carries at most 64 MiB with the working tree)"
if [ "$TOTAL" -gt $((48 * 1024 * 1024)) ]; then echo "error: over 48 MiB, leave room for the tree" >&2; exit 1; fi
