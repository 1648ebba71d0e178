"""TrainConfig -> TRL arguments and DeepSpeed JSON: the paper's defaults, stages, offload."""
from __future__ import annotations

import json

import pytest

from vpo_ray.config import ConfigError, TrainConfig, load_config
from vpo_ray.train.worker import deepspeed_config, training_args


def cfg(*overrides: str) -> TrainConfig:
    return load_config(TrainConfig, None, list(overrides))


def test_paper_defaults_reach_trl(tmp_path):
    sft = training_args(cfg("method=sft"), str(tmp_path / "a"), None)
    assert (sft.learning_rate, sft.num_train_epochs, sft.lr_scheduler_type.value) == (2e-6, 5.0, "constant_with_warmup")
    assert sft.warmup_steps == pytest.approx(0.1) and sft.per_device_train_batch_size == 2
    assert sft.gradient_checkpointing is False and sft.use_cpu and not sft.bf16
    assert sft.save_only_model is False  # optimizer + scheduler are kept for resume
    dpo = training_args(cfg("method=dpo"), str(tmp_path / "b"), None)
    assert (dpo.learning_rate, dpo.num_train_epochs, dpo.lr_scheduler_type.value) == (5e-7, 1.0, "linear")
    assert dpo.beta == 0.1
    tuned = training_args(cfg("method=dpo", "learning_rate=0.001", "max_steps=7", "beta=0.3"), str(tmp_path / "c"), None)
    assert (tuned.learning_rate, tuned.max_steps, tuned.beta) == (1e-3, 7, 0.3)


def test_deepspeed_configs_follow_stage_offload_precision(tmp_path):
    assert deepspeed_config(cfg("deepspeed_stage=0")) is None  # plain DDP
    z2 = deepspeed_config(cfg("deepspeed_stage=2"))
    assert z2["zero_optimization"]["stage"] == 2 and z2["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert "optimizer" not in z2  # HF Trainer's AdamW, handed to DeepSpeed
    z3 = deepspeed_config(cfg("deepspeed_stage=3", "offload=true"))
    zo = z3["zero_optimization"]
    assert zo["stage"] == 3 and zo["stage3_gather_16bit_weights_on_model_save"] is True  # export gathers shards
    assert zo["offload_optimizer"]["device"] == "cpu" and zo["offload_param"]["device"] == "cpu"
    assert zo["offload_param"]["pin_memory"] is False  # no pinned memory without a GPU
    assert z3["optimizer"]["type"] == "AdamW"  # ZeRO-Offload steps DeepSpeedCPUAdam
    assert z3["bf16"]["enabled"] == "auto"  # filled by HF from precision=bf16/fp16/fp32
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(cfg("deepspeed_stage=2", f"deepspeed_config={own}")) == {"zero_optimization": {"stage": 1}}
    with pytest.raises(ConfigError, match="deepspeed_config: cannot use"):
        deepspeed_config(cfg("deepspeed_stage=2", f"deepspeed_config={tmp_path / 'missing.json'}"))
