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
    assert dpo.beta == 0.1 and dpo.loss_type == ["sigmoid"]  # DPO alone: dpo.yaml's pref_ftx is commented out
    ftx = training_args(cfg("method=dpo", "sft_weight=0.1"), str(tmp_path / "d"), None)
    assert ftx.loss_type == ["sigmoid", "sft"] and ftx.loss_weights == [1.0, 0.1]  # + 0.1 x NLL of the chosen
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
    # ZeRO-Offload steps HF's torch AdamW on the CPU partitions: no DeepSpeedCPUAdam op to JIT-compile
    assert "optimizer" not in z3 and z3["zero_force_ds_cpu_optimizer"] is False
    assert z3["bf16"]["enabled"] == "auto"  # filled by HF from precision=bf16/fp16/fp32
    own = tmp_path / "ds.json"
    own.write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    assert deepspeed_config(cfg("deepspeed_stage=2", f"deepspeed_config={own}")) == {"zero_optimization": {"stage": 1}}
    with pytest.raises(ConfigError, match="deepspeed_config: cannot use"):
        deepspeed_config(cfg("deepspeed_stage=2", f"deepspeed_config={tmp_path / 'missing.json'}"))


def test_gpu_runs_overlap_communication_and_take_bucket_sizes():
    assert deepspeed_config(cfg("deepspeed_stage=3"))["zero_optimization"]["overlap_comm"] is False  # gloo on CPU
    z3 = deepspeed_config(cfg("deepspeed_stage=3", "use_gpu=true", "bucket_size=200000000"))["zero_optimization"]
    assert z3["overlap_comm"] is True
    assert z3["reduce_bucket_size"] == z3["stage3_prefetch_bucket_size"] == 200_000_000
    assert z3["stage3_param_persistence_threshold"] == "auto"  # untouched: HF fills it from the model
    z2 = deepspeed_config(cfg("deepspeed_stage=2", "use_gpu=true", "overlap_comm=false", "bucket_size=5"))
    assert z2["zero_optimization"]["overlap_comm"] is False
    assert z2["zero_optimization"]["allgather_bucket_size"] == z2["zero_optimization"]["reduce_bucket_size"] == 5


def test_packing_precompute_and_checkpoint_switches_reach_trl(tmp_path):
    sft = training_args(cfg("method=sft", "packing=true", "gradient_checkpointing=true", "save_steps=0"),
                        str(tmp_path / "a"), None)
    assert sft.packing and sft.packing_strategy == "bfd"  # TRL's bfd packing is padding-free
    assert sft.save_strategy.value == "no"  # save_steps=0: no checkpoint at all
    assert sft.gradient_checkpointing_kwargs == {"use_reentrant": False}  # the variant ZeRO-3 supports
    dpo = training_args(cfg("method=dpo", "precompute_ref_log_probs=true"), str(tmp_path / "b"), None)
    assert dpo.precompute_ref_log_probs and dpo.save_strategy.value == "steps"


@pytest.mark.parametrize("overrides, key", [
    (["method=dpo", "packing=true"], "packing"),
    (["method=sft", "precompute_ref_log_probs=true"], "precompute_ref_log_probs"),
    (["weights=random", "lora=true"], "lora"),
    (["weights=some"], "weights"),
    (["save_steps=-1"], "save_steps"),
    (["bucket_size=0"], "bucket_size"),
])
def test_contradicting_settings_are_named(overrides, key):
    with pytest.raises(ConfigError, match=key):
        cfg(*overrides)


def test_random_weights_keep_the_registry_architecture_and_use_a_stand_in_tokenizer(tiny_cache):
    from vpo_ray.train.build import architecture_config, load_tokenizer, weights_dtype
    from vpo_ray.train.runner import resolve_model

    random8b = cfg("weights=random", "model=llama3-8b-instruct")
    assert resolve_model(random8b) == "llama3-8b-instruct"  # no hub id: nothing is downloaded
    arch = architecture_config("llama3-8b-instruct")
    assert (arch.model_type, arch.num_hidden_layers, arch.num_key_value_heads) == ("llama", 32, 8)
    tok = load_tokenizer(random8b, "llama3-8b-instruct")
    assert len(tok) == arch.vocab_size == 128256 and tok.chat_template  # the stand-in has the real vocabulary
    tiny = cfg("weights=random")  # the tiny preset's random architecture is its small stand-in
    assert architecture_config(resolve_model(tiny)).vocab_size == len(load_tokenizer(tiny, resolve_model(tiny)))
    assert weights_dtype(cfg("precision=bf16", "deepspeed_stage=3")) == "bfloat16"  # fp32 masters in DeepSpeed
    assert weights_dtype(cfg("precision=bf16", "deepspeed_stage=0")) == "float32"  # DDP autocasts fp32 weights
