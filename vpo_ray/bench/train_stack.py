"""`vpo bench train-step train.engine=trl`: the `vpo train` stack itself, timed.

Each run is one `vpo train` call (Ray Train workers, TRL SFTTrainer/DPOTrainer, DeepSpeed ZeRO,
weights=random: the real architecture built in place on the workers) on a synthetic set of
the benchmark's shape, for `train.warmup_steps + train.steps` optimizer steps with no
checkpoint. Its figures come from the run's own per-step rows (vpo_ray.train.throughput):
seconds per optimizer step, tokens/s per GPU, MFU against the datasheet and a matmul ceiling
measured on the same GPU, peak memory per rank.

Shapes (`seq_len` is the cutoff, the paper's 2,048 on GPUs):
  sft  rows of `row_tokens` (prompt + response, like the generated sets), packed padding-free
       into sequences of seq_len (`pack` flag, on by default); batch = packed sequences per GPU
  dpo  pairs whose prompt and each completion take seq_len / 2 tokens (prompt + completion =
       seq_len, the longest a pair may be); batch = pairs per GPU

A run is "METHOD:WORKERS:STAGE:BATCH[:flag...]", e.g. "sft:4:3:2" or "dpo:2:3:2:offload:precompute";
flags: offload (ZeRO-Offload of the optimizer to CPU), gc (gradient checkpointing), precompute
(DPO reference log-probs before training), nopack (SFT rows padded, not packed).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

from vpo_ray import storage

FLAGS = ("offload", "gc", "precompute", "nopack")


@dataclass(frozen=True)
class RunSpec:
    method: str  # sft | dpo
    workers: int  # Ray Train workers, one GPU each
    stage: int  # ZeRO stage 2 | 3
    batch: int  # per-GPU batch: packed sequences (SFT) or pairs (DPO)
    flags: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return ":".join([self.method, str(self.workers), str(self.stage), str(self.batch), *self.flags])


def parse_run(text: str) -> RunSpec:
    """'sft:4:3:2:offload' -> RunSpec; a bad spec raises ValueError naming the part at fault."""
    parts = str(text).split(":")
    if len(parts) < 4 or parts[0] not in ("sft", "dpo"):
        raise ValueError(f"train.runs: {text!r} is not METHOD:WORKERS:STAGE:BATCH[:flag...] (method sft|dpo)")
    try:
        workers, stage, batch = (int(p) for p in parts[1:4])
    except ValueError:
        raise ValueError(f"train.runs: {text!r}: workers, stage and batch must be integers") from None
    bad = [f for f in parts[4:] if f not in FLAGS]
    if bad or stage not in (2, 3) or workers < 1 or batch < 1:
        raise ValueError(f"train.runs: {text!r}: " + (f"unknown flag {bad[0]!r} (flags: {', '.join(FLAGS)})" if bad
                                                        else "stage must be 2 or 3, workers and batch >= 1"))
    return RunSpec(parts[0], workers, stage, batch, tuple(parts[4:]))


def _text(tokenizer, n_tokens: int, rng: random.Random) -> str:
    """Text that the tokenizer reads as about `n_tokens` tokens (random ids, decoded, re-cut)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in (rng.randrange(len(tokenizer)) for _ in range(2 * n_tokens)) if i not in special]
    text = tokenizer.decode(ids[:n_tokens], skip_special_tokens=True)
    text = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]).strip()
    return text or "video"  # an all-whitespace draw would be an empty message


def _chat(user: str) -> list[dict]:
    """The prompt turns of a benchmark row: an empty system turn and the user's text."""
    return [{"role": "system", "content": ""}, {"role": "user", "content": user}]


def synthetic_set(method: str, rows: int, tokenizer, seq_len: int, row_tokens: int, seed: int = 0) -> list[dict]:
    """Training rows of the benchmark's shape (see the module doc), in the schema `vpo train` reads."""
    from vpo_ray import schema

    rng = random.Random(seed)
    scaffold = 16  # chat-template tokens around each message
    out = []
    for i in range(rows):
        qid = schema.query_id(f"bench {method} {i}")
        if method == "sft":
            half = max(1, row_tokens // 2 - scaffold)
            out.append(schema.sft_row(qid, _chat(_text(tokenizer, half, rng)), _text(tokenizer, half, rng)))
        else:
            half = max(1, seq_len // 2 - 2 * scaffold)
            out.append(schema.dpo_row(qid, _chat(_text(tokenizer, half, rng)), _text(tokenizer, half, rng),
                                      _text(tokenizer, half, rng), "text", {"chosen": 1.0, "rejected": 0.0}))
    return out


def _rows_needed(spec: RunSpec, steps: int, seq_len: int, row_tokens: int) -> int:
    per_step = spec.workers * spec.batch
    if spec.method == "sft" and "nopack" not in spec.flags:
        per_step *= max(1, seq_len // row_tokens)  # rows packed into one sequence
    return int(per_step * steps * 1.25) + spec.workers  # spare: packing leaves gaps


def write_synthetic_set(method: str, rows: int, path: str, model: str = "llama3-8b-instruct", seq_len: int = 2048,
                        row_tokens: int = 512) -> str:
    """A synthetic set for `vpo train ... weights=random` (the stand-in tokenizer's ids), written to `path`."""
    from vpo_ray.config import TrainConfig
    from vpo_ray.train.build import load_tokenizer
    from vpo_ray.train.runner import resolve_model

    probe = TrainConfig(method=method, model=model, weights="random")
    tokenizer = load_tokenizer(probe, resolve_model(probe))
    storage.write_jsonl(path, synthetic_set(method, rows, tokenizer, seq_len, row_tokens))
    return path


def run_one(spec: RunSpec, cfg, model: str, device: str) -> dict:
    """One `vpo train` call; its throughput block plus set-up facts."""
    from vpo_ray.config import TrainConfig, load_config
    from vpo_ray.train.runner import train

    from vpo_ray.ray_utils import init_ray

    tc = cfg.train
    cuda = device.startswith("cuda")
    out = storage.join(cfg.out, "train_runs", spec.name.replace(":", "_"))
    cpus = tc.cpus_per_worker or max(1.0, (init_ray(cfg.ray).cluster_resources().get("CPU", 1) - 1) // spec.workers)
    fields = dict(method=spec.method, out=out, model=model, weights="random", num_workers=spec.workers,
                  use_gpu=cuda, deepspeed_stage=spec.stage, precision="bf16" if cuda else "fp32",
                  max_steps=tc.warmup_steps + tc.steps, throughput_warmup_steps=tc.warmup_steps,
                  per_device_batch_size=spec.batch, max_length=tc.seq_len,
                  save_steps=0, export=False, logging_steps=1, warmup_ratio=0.0, learning_rate=1e-6, max_failures=0,
                  packing=spec.method == "sft" and "nopack" not in spec.flags,
                  precompute_ref_log_probs="precompute" in spec.flags, offload="offload" in spec.flags,
                  gradient_checkpointing="gc" in spec.flags, attn_implementation=tc.attn_implementation,
                  cpus_per_worker=float(cpus), ray=cfg.ray)
    data = write_synthetic_set(spec.method, _rows_needed(spec, tc.warmup_steps + tc.steps, tc.seq_len, tc.row_tokens),
                               storage.join(out, f"data/{spec.method}.jsonl"), model, tc.seq_len, tc.row_tokens)
    t0 = time.perf_counter()
    summary = train(load_config(TrainConfig, None, [], **{**fields, "data": data}))
    return {"run": spec.name, "method": spec.method, "workers": spec.workers, "zero_stage": spec.stage,
            "batch_per_gpu": spec.batch, "flags": list(spec.flags), **summary.get("throughput", {}),
            "losses": [round(r["loss"], 4) for r in _rows(out)], "wall_s": round(time.perf_counter() - t0, 1),
            "rank0_seconds": summary.get("rank0_seconds", {}), "ray_start_seconds": summary.get("ray_start_seconds")}


def _rows(out: str) -> list[dict]:
    from vpo_ray.train.metrics import read_steps

    return read_steps(storage.join(out, "metrics.jsonl"))


def scaling(runs: dict) -> list[dict]:
    """tokens/s(n) / (n/m x tokens/s(m)) for runs that differ only in worker count (m = the fewest)."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in runs.values():
        if r.get("tokens_per_s"):
            key = (r["method"], r["zero_stage"], r["batch_per_gpu"], tuple(r["flags"]))
            groups.setdefault(key, {})[r["workers"]] = r["tokens_per_s"]
    out = []
    for (method, stage, batch, flags), by_n in groups.items():
        if len(by_n) < 2:
            continue
        base = min(by_n)
        out.append({"method": method, "zero_stage": stage, "batch_per_gpu": batch, "flags": list(flags),
                    "tokens_per_s": {str(n): v for n, v in sorted(by_n.items())},
                    "efficiency_vs_linear": {str(n): round(v / (by_n[base] * n / base), 3)
                                             for n, v in sorted(by_n.items())}})
    return out
