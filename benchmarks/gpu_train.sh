#!/usr/bin/env bash
# Training and serving at real size on one 4-GPU node (issue #19), one scenario per device call.
# Carry the repo with .gpu_bundle (bash benchmarks/gpu_bundle.sh), then from the repo root:
#
#   bash benchmarks/gpu_train.sh sft      # ~8.5 min  Llama-3-8B SFT, ZeRO-3: 4 workers b2, 2 and 4 workers offloaded, bigger batch
#   bash benchmarks/gpu_train.sh dpo      # ~8.5 min  Llama-3-8B DPO, ZeRO-3: reference in the step, precomputed, 2 vs 4 workers
#   bash benchmarks/gpu_train.sh resume   # ~7 min    Llama-3-8B SFT, one checkpoint at step 3, a worker killed at step 6, resumed
#   bash benchmarks/gpu_train.sh serve    # ~8.5 min  export an 8B model from `vpo train`, serve it with 1, 2, 4 replicas
#   bash benchmarks/gpu_train.sh zero2    # ~8 min    Llama-3-8B with ZeRO-2 where it fits; Qwen2.5-1.5B 2 -> 4 workers
#
# Each scenario stops itself at BUDGET_S (default 520 s) after the bundle install, and every
# benchmark rewrites its JSON (and PNG) after each run, so a cut-off scenario still returns the
# runs it finished; runs are ordered most important first. Results land in $OUT (or ./bench-out).
# Figures: tokens/s per GPU, MFU (6NT; DPO + 2NT when the reference runs in the step) against the
# datasheet and a matmul rate measured on the same GPU, peak memory per GPU, seconds per step.
#
# Memory plan for 8B full fine-tuning (bf16 weights, fp32 master + Adam = 16-20 B/param): ZeRO-3
# on 4 x 80 GB holds ~32 GB of states per GPU, leaving room for batch 2 x 2,048 packed tokens
# without gradient checkpointing; 2 x 80 GB cannot hold the ~80 GB per GPU of states, so the
# 2-worker runs offload the optimizer to the CPU (torch's fused CPU AdamW; no DeepSpeed op to
# compile). DPO (chosen + rejected = twice the tokens) at batch 2 needs gradient checkpointing on
# 80 GB cards; on 141 GB cards (H200) it runs without, and SFT's bigger batch needs no checkpointing.
set -u
scenario=${1:?usage: gpu_train.sh sft|dpo|resume|serve|zero2}
budget=${BUDGET_S:-520}
out_dir=${OUT:-$PWD/bench-out}
work=/tmp/vpo-train-gpu
mkdir -p "$out_dir" "$work"
t0=$SECONDS

eval "$(bash .gpu_bundle/install.sh)" || exit 3
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VPO_PROGRESS=0 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_DEDUP_LOGS=0
export VPO_CACHE=$work/cache
left() { echo $(( budget - (SECONDS - t0) )); }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out_dir/gpus-$scenario.txt"
python3 - <<'PY' 2>&1 | tee -a "$out_dir/gpus-$scenario.txt" || exit 3
import importlib, torch
for m in ("transformers", "trl", "deepspeed", "datasets", "ray", "accelerate", "pyarrow", "fsspec"):
    print(m, importlib.import_module(m).__version__)
print("torch", torch.__version__, "gpus", torch.cuda.device_count())
PY
gpus=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
big=$([ "${mem_mib:-0}" -gt 120000 ] && echo 1 || echo 0)   # H200: no gradient checkpointing needed
gc=$([ "$big" = 1 ] && echo "" || echo ":gc")
cpus=$(( $(nproc) / gpus - 1 ))
echo "scenario $scenario on $gpus GPU(s) of $mem_mib MiB; budget $(left) s left after install"

bench() {  # bench BUDGET MODEL RUNS...: one `vpo bench train-step` call with engine=trl
  local seconds=$1 model=$2; shift 2
  local runs; runs=$(IFS=,; echo "$*")
  bash benchmarks/gpu_run.sh "$seconds" train-step --preset real train.engine=trl train.model="$model" \
    train.label="$scenario" \
    train.seq_len=2048 train.row_tokens=512 train.steps=4 train.warmup_steps=2 "train.runs=[$runs]"
}

train() {  # train SECONDS METHOD OUT [key=value...]: one `vpo train` call on a synthetic set, weights=random
  local seconds=$1 method=$2 out=$3; shift 3
  python3 -c "from vpo_ray.bench.train_stack import write_synthetic_set as w; w('$method', 256, '$work/$method.jsonl')"
  timeout -s INT -k 20 "$seconds" python3 -m vpo_ray.cli train "$method" --data "$work/$method.jsonl" --out "$out" \
    --model llama3-8b-instruct weights=random use_gpu=true num_workers="$gpus" cpus_per_worker="$cpus" \
    deepspeed_stage=3 precision=bf16 per_device_batch_size=2 max_length=2048 logging_steps=1 warmup_ratio=0.0 "$@" \
    2>&1 | grep --line-buffered -v -E "it/s\]$" | tee "$out_dir/log-$scenario-$method.txt"
  cp "$out"/summary.json "$out_dir/train_${scenario}_summary.json" 2>/dev/null
  cp "$out"/metrics.jsonl "$out"/metrics_replaced.jsonl "$out"/checkpoints.jsonl "$out"/attempts.jsonl \
     "$out_dir/" 2>/dev/null
  cp "$out"/loss.png "$out_dir/train_${scenario}_loss.png" 2>/dev/null
}

case "$scenario" in
  sft)
    bench "$(left)" llama3-8b-instruct sft:4:3:2 sft:2:3:2:offload sft:4:3:2:offload "sft:4:3:4$gc" ;;
  dpo)
    bench "$(left)" llama3-8b-instruct "dpo:4:3:2$gc" "dpo:4:3:2:precompute$gc" "dpo:2:3:2:offload$gc" \
      "dpo:4:3:2:offload$gc" ;;
  resume)
    # One checkpoint (~130 GB with the 16-bit export copy) at step 3; the last worker exits at step 6
    # before that step is logged; the restarted group reads checkpoint 3 and trains steps 4-6 again.
    rm -rf "$work/resume"
    export VPO_FAULTS="train_step:exit,step=6,rank=last,times=1" VPO_FAULTS_DIR="$work/resume-faults"  # vpo_ray/faults.py
    rm -rf "$VPO_FAULTS_DIR"
    train "$(left)" sft "$work/resume" packing=true max_steps=6 save_steps=3 keep_checkpoints=1 save_at_end=false \
      max_failures=1 export=false learning_rate=1e-5
    unset VPO_FAULTS VPO_FAULTS_DIR ;;
  serve)
    rm -rf "$work/serve"
    train 260 sft "$work/serve" packing=true max_steps=2 save_steps=0 learning_rate=1e-5
    timeout -s INT -k 20 "$(left)" python3 benchmarks/serve_load.py --out "$out_dir" --model "$work/serve/model" \
      --replicas 1,2,4 --replica-gpus 1 --replica-cpus 4 --batch-sizes 8,1 --concurrency 32 --duration-s 15 \
      --warmup 4 --max-new-tokens 64 --timeout-s 300 2>&1 | tail -40 ;;
  zero2)
    bench $(( $(left) - 170 )) llama3-8b-instruct sft:4:2:1 "sft:4:2:2$gc" "dpo:4:2:1$gc"
    bench "$(left)" qwen2.5-1.5b-instruct sft:2:2:4 sft:4:2:4 ;;
  *) echo "unknown scenario $scenario (sft|dpo|resume|serve|zero2)"; exit 2 ;;
esac
ls -la "$out_dir"
