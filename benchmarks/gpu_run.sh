#!/usr/bin/env bash
# Run one benchmark on a GPU machine that has no network (carry `.gpu_bundle`, built by
# benchmarks/gpu_bundle.sh; where ray does not import yet, this installs the bundle first, which
# takes ~30-60 s outside SECONDS). From the repository root:
#
#   bash benchmarks/gpu_run.sh SECONDS video-sampling --preset cogvideox-2b --videos 3 [key=value ...]
#
# With the tiny preset and no GPU it runs here too (nvidia-smi absent): that checks a command
# before it goes to a GPU machine.
#
# The benchmark gets at most SECONDS (SIGINT, then KILL 20 s later); it saves its JSON after
# every variant, so a cut-off run still returns what it measured. JSON, PNG and the log are
# copied to $OUT (or ./bench-out) on exit; rendered videos stay in /tmp.
set -u
budget=$1; shift
name=$1; shift
out_dir=${OUT:-$PWD/bench-out}
work=/tmp/vpo-bench
mkdir -p "$out_dir" "$work/out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VPO_PROGRESS=0 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_DEDUP_LOGS=0
export VPO_CACHE=$work/cache

collect() {
  cp "$work"/out/*.json "$work"/out/*.png "$work"/out/*.txt "$out_dir"/ 2>/dev/null
  ls -la "$out_dir"
}
trap collect EXIT

if [ -f .gpu_bundle/install.sh ] && ! python3 -c 'import ray' 2>/dev/null; then
  eval "$(bash .gpu_bundle/install.sh)" || exit 3   # exports PYTHONPATH=/tmp/site:$PWD
fi

if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
else
  echo "no nvidia-smi: a CPU run (the tiny preset checks the command here)"
fi
python3 -c 'import torch, diffusers, transformers, ray; print("torch", torch.__version__, "cuda", torch.version.cuda,
"diffusers", diffusers.__version__, "transformers", transformers.__version__, "ray", ray.__version__,
"gpus", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none (CPU)")' || exit 3
if ! python3 -c 'import imageio_ffmpeg; imageio_ffmpeg.get_ffmpeg_exe()' 2>/dev/null; then
  export IMAGEIO_FFMPEG_EXE=$PWD/benchmarks/ffmpeg_shim.py  # no ffmpeg here: OpenCV mp4v stands in
  echo "no ffmpeg on this machine: mp4s are written by benchmarks/ffmpeg_shim.py (OpenCV, mp4v)"
fi
timeout -s INT -k 20 "$budget" python3 -m vpo_ray.cli bench "$name" --out "$work/out" "$@" 2>&1 \
  | grep --line-buffered -v -E "Loading (weights|pipeline)|it/s\]$" | tee "$work/out/log-$name.txt"
