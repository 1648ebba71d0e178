#!/usr/bin/env bash
# benchmarks/train_wheels.sh -- the training part of the GPU bundle: what `vpo train` and
# `vpo bench train-step` need beyond the GPU image (torch, transformers, accelerate, peft are there).
#
#   bash benchmarks/train_wheels.sh OUT_DIR [PYTHON_VERSION]      # default 3.12 (the GPU image's)
#
# Writes into OUT_DIR:
#   deepspeed-0.19.8-py3-none-any.whl   built here from the sdist with DS_BUILD_OPS=0: pure Python, no
#                                       compiled op. Training needs none: HF's torch AdamW runs on the GPU
#                                       (and, with ZeRO-Offload, its fused CPU kernel on the host), so no
#                                       op is JIT-compiled on the GPU node either.
#   trl, datasets and the datasets dependencies the image lacks (dill, multiprocess; xxhash, pyarrow,
#   pandas, fsspec, huggingface-hub come from the image), hjson for deepspeed.
# Building deepspeed imports torch: $GPU_BUNDLE_BUILD_PYTHON (default the repo's .venv python) must
# have it; its torch version does not matter (no op is compiled).
set -euo pipefail
OUT="$1"
PYVER="${2:-3.12}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_PY="${GPU_BUNDLE_BUILD_PYTHON:-$ROOT/.venv/bin/python}"
DS_PIN="deepspeed==0.19.8"
# Pins match pyproject's ranges and what the CPU tests run; datasets 5.2 needs pyarrow>=24 and
# fsspec<=2026.9.0 from the image (install.sh warns if the image's are outside).
TRAIN_PINS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 hjson==3.1.0)
PYTAG="${PYVER//./}"

log() { printf '[train_wheels] %s\n' "$*" >&2; }
mkdir -p "$OUT"

have() { compgen -G "$OUT/$1" >/dev/null; }

if ! have "deepspeed-${DS_PIN#*==}-py3-none-any.whl"; then
  log "building ${DS_PIN} from its sdist (DS_BUILD_OPS=0, no CUDA)"
  tmp="$(mktemp -d)"
  "$BUILD_PY" -m pip download --no-deps --no-binary :all: --progress-bar off -d "$tmp" "$DS_PIN" >&2
  # --no-build-isolation: setup.py imports torch, which the build python already has (an isolated
  # build env would download another torch)
  DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$BUILD_PY" -m pip wheel --no-deps --no-build-isolation --progress-bar off \
      -w "$OUT" "$tmp"/deepspeed-*.tar.gz >&2
  rm -rf "$tmp"
fi

missing=()
for pin in "${TRAIN_PINS[@]}"; do
  name="${pin%%==*}"; ver="${pin#*==}"
  have "${name//-/_}-${ver}-*.whl" || missing+=("$pin")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "downloading ${missing[*]} for Python $PYVER"
  "$BUILD_PY" -m pip download --no-deps --only-binary=:all: --progress-bar off --python-version "$PYVER" \
      --implementation cp --abi "cp$PYTAG" --abi none --abi abi3 --platform manylinux_2_28_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d "$OUT" "${missing[@]}" >&2
fi
ls -1 "$OUT"/*.whl
