"""SFT and DPO on Ray Train (2 CPU workers, TRL + DeepSpeed ZeRO-2/3): exports, metrics,
checkpoints, a killed worker, explicit resume, and `vpo loop` chaining the two.

Ray Train runs cost ~30-60 s each on a 2-core box (worker start and imports dominate),
so each run is made once per module and several tests read it."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from train_helpers import FakeGenerate, dpo_rows, sft_rows, tiny_model_path, write_jsonl, write_parquet
from vpo_ray.config import TrainConfig, load_config
from vpo_ray.prompts import optimizer_messages

pytestmark = pytest.mark.slow

SFT_LR = 1e-3  # the paper's 2e-6 would not move a random tiny model in a few steps
DPO_LR = 2e-4


@pytest.fixture(scope="module")
def base_model(tiny_cache):
    return tiny_model_path(tiny_cache)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_sets")
    gen = root / "dpo_set"  # laid out like `vpo generate dpo` output
    write_parquet(dpo_rows(48), gen / "dpo.parquet")
    write_jsonl([{"query_id": "q", "stage": "rewrite", "reason": "r", "error": "e"}], gen / "errors.jsonl")
    return {"sft": write_parquet(sft_rows(16), root / "sft.parquet"), "dpo": str(gen)}


def run_train(method: str, data: str, out: Path, model: str, **fields):
    from vpo_ray.train.runner import train

    fields = {"num_workers": 2, "per_device_batch_size": 2, "max_length": 384, **fields}
    cfg = load_config(TrainConfig, None, [], method=method, data=data, out=str(out), model=model, **fields)
    return train(cfg)


def steps(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def mean(xs):
    return sum(xs) / len(xs)


def assert_exported_model_generates(model_dir: str, base_model: str) -> None:
    """The export loads with plain from_pretrained, has the base's full shapes, moved, and generates."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    files = {p.name for p in Path(model_dir).iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "training_args.bin" not in files
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert tok.chat_template, "the export must carry the chat template"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(base_model)
    trained, orig = model.state_dict(), base.state_dict()
    assert trained.keys() == orig.keys()
    assert all(trained[k].shape == orig[k].shape for k in orig)  # ZeRO-3 shards were gathered
    assert any(not torch.equal(trained[k], orig[k]) for k in orig), "training did not change the weights"
    enc = tok.apply_chat_template(optimizer_messages("a cat playing piano"), add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0, enc["input_ids"].shape[1]:]), str)


@pytest.fixture(scope="module")
def zero2(ray_session, base_model, tmp_path_factory):
    """`vpo loop --rounds 1` with ZeRO-2: SFT (round 0), then DPO from the SFT export (round 1)."""
    from vpo_ray.train.loop import run_loop
    from vpo_ray.train.runner import train

    root = tmp_path_factory.mktemp("zero2")
    queries = root / "queries.jsonl"
    queries.write_text(json.dumps({"query": "a cat"}) + "\n")
    gen, trained = FakeGenerate(n_sft=16, n_dpo=48), []

    def counting_train(cfg):
        trained.append((cfg.method, cfg.model))
        return train(cfg)

    overrides = ["train.deepspeed_stage=2", "train.num_workers=2", "train.max_length=384",
                 "sft.max_steps=4", "sft.save_steps=2", f"sft.learning_rate={SFT_LR}",
                 "dpo.max_steps=24", "dpo.save_steps=12", f"dpo.learning_rate={DPO_LR}"]
    sigint = signal.getsignal(signal.SIGINT)
    loop = run_loop(1, str(queries), str(root / "loop"), "tiny", overrides, generate_fn=gen, train_fn=counting_train)
    sigint_after = signal.getsignal(signal.SIGINT)
    rerun = run_loop(1, str(queries), str(root / "loop"), "tiny", overrides, generate_fn=gen, train_fn=counting_train)
    sft = json.loads((root / "loop" / "round_0" / "sft" / "summary.json").read_text())
    dpo = json.loads((root / "loop" / "round_1" / "dpo" / "summary.json").read_text())
    return {"root": root / "loop", "sft": sft, "dpo": dpo, "loop": loop, "rerun": rerun, "gen": gen,
            "trained": trained, "sigint_kept": sigint_after is sigint}


@pytest.fixture(scope="module")
def zero3(ray_session, base_model, data, tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    sft = run_train("sft", data["sft"], root / "sft", base_model, deepspeed_stage=3, max_steps=6, save_steps=2,
                    learning_rate=SFT_LR)
    dpo = run_train("dpo", data["dpo"], root / "dpo", sft["model"], deepspeed_stage=3, max_steps=3, save_steps=3,
                    learning_rate=DPO_LR, lora=True)  # LoRA under ZeRO-3; the export is merged
    return root, sft, dpo


def test_loop_runs_sft_then_dpo_with_zero2(zero2, base_model):
    root, sft, dpo, gen = zero2["root"], zero2["sft"], zero2["dpo"], zero2["gen"]
    sft_model, dpo_model = str(root / "round_0" / "sft" / "model"), str(root / "round_1" / "dpo" / "model")
    # the loop chains: the DPO set is sampled with the SFT export, and DPO starts from it
    assert [(c["kind"], c["optimizer"]) for c in gen.calls] == [("sft", None), ("dpo", sft_model)]
    assert zero2["trained"] == [("sft", None), ("dpo", sft_model)]
    assert zero2["loop"]["optimizer"] == dpo_model and zero2["rerun"]["optimizer"] == dpo_model  # re-run: no work
    assert zero2["sigint_kept"], "Ctrl-C must still stop the stage after a training run"
    assert sft["global_step"] == 4 and dpo["global_step"] == 24 and dpo["base_model"] == sft_model
    assert_exported_model_generates(sft_model, base_model)
    assert_exported_model_generates(dpo_model, sft_model)
    rows = steps(root / "round_0" / "sft")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["loss"] > 0 and "learning_rate" in r and r["tokens_per_second"] > 0
    # SFT follows the paper's schedule shape: warmup, then constant
    assert rows[0]["learning_rate"] < SFT_LR and rows[-1]["learning_rate"] == pytest.approx(SFT_LR)
    for out in (root / "round_0" / "sft", root / "round_1" / "dpo"):
        assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ray_run = root / "round_0" / "sft" / "ray_results" / "sft"
    assert sorted(p.name for p in ray_run.glob("checkpoint_0*")) == ["checkpoint_00000002", "checkpoint_00000004"]
    assert (ray_run / "checkpoint_00000004" / "checkpoint" / "trainer_state.json").exists()
    # Ray Train's result carries the last step's metrics
    assert sft["final"]["step"] == 4 and sft["final"]["loss"] == pytest.approx(rows[-1]["loss"])


def test_dpo_loss_decreases_on_a_learnable_preference(zero2):
    rows = steps(zero2["root"] / "round_1" / "dpo")
    assert [r["step"] for r in rows] == list(range(1, 25))
    for r in rows:
        assert "rewards/accuracies" in r and "rewards/margins" in r and r["tokens_per_second"] > 0
    first, last = mean([r["loss"] for r in rows[:5]]), mean([r["loss"] for r in rows[-5:]])
    print(f"DPO loss: first-5 mean {first:.4f}, last-5 mean {last:.4f}")
    assert first == pytest.approx(0.693, abs=0.05)  # log 2: policy == reference at the start
    assert last < first - 0.1
    assert mean([r["rewards/margins"] for r in rows[-5:]]) > 0
    assert mean([r["rewards/accuracies"] for r in rows[-5:]]) > 0.7
    assert zero2["dpo"]["metrics"]["loss_last"] < zero2["dpo"]["metrics"]["loss_first"]


def test_zero3_sft_then_dpo(zero3, base_model):
    root, sft, dpo = zero3
    assert sft["global_step"] == 6 and dpo["global_step"] == 3
    assert_exported_model_generates(sft["model"], base_model)
    assert_exported_model_generates(dpo["model"], sft["model"])
    assert all("rewards/margins" in r for r in steps(root / "dpo"))


def test_killed_worker_resumes_from_checkpoint(zero3, base_model, data, tmp_path, monkeypatch):
    """The last worker dies at step 3 (VPO_FAULTS drill); the group restarts from checkpoint 2 and ends where an
    undisturbed run ends."""
    from vpo_ray import faults

    root, undisturbed, _ = zero3
    out = tmp_path / "faulty"
    monkeypatch.setenv("VPO_FAULTS", "train_step:exit,step=3,rank=last,times=1")
    monkeypatch.setenv("VPO_FAULTS_DIR", str(tmp_path / "faults"))
    got = run_train("sft", data["sft"], out, base_model, deepspeed_stage=3, max_steps=6, save_steps=2,
                    learning_rate=SFT_LR, max_failures=1)
    (exited,) = faults.fired(str(tmp_path / "faults"))
    assert (exited["action"], exited["step"], exited["rank"]) == ("exit", 3, 1)
    assert got["global_step"] == undisturbed["global_step"] == 6
    faulty, clean = steps(out), steps(root / "sft")
    assert [r["step"] for r in faulty] == [1, 2, 3, 4, 5, 6]  # step 3 logged once: the re-run replaced it
    # weights, optimizer, scheduler, RNG and data position came back: the same losses as without the crash
    for a, b in zip(faulty, clean):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
        assert a["learning_rate"] == pytest.approx(b["learning_rate"])
    assert_exported_model_generates(got["model"], base_model)


def test_explicit_resume_from_a_checkpoint(zero2, base_model, tmp_path):
    """resume_from= a Ray checkpoint of another run: steps 3-4 are trained again and match that run."""
    first = zero2["root"] / "round_0" / "sft"
    ckpt = first / "ray_results" / "sft" / "checkpoint_00000002"
    out = tmp_path / "resumed"
    got = run_train("sft", str(first.parent / "sft_data"), out, base_model, deepspeed_stage=2, max_steps=4,
                    save_steps=2, learning_rate=SFT_LR, resume_from=str(ckpt))
    assert got["global_step"] == 4
    assert got["metrics"]["steps_logged"] == 4  # steps 1-2 come back with the checkpoint's history
    resumed, original = steps(out), steps(first)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(resumed, original):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), a["step"]
    state = json.loads((out / "train_state.json").read_text())
    assert state["summary"]["train_runtime"] > 0


def test_damaged_newest_checkpoint_is_skipped_for_the_one_before(zero2, tmp_path):
    """A truncated file in the newest checkpoint: resume picks the previous one and says why."""
    import shutil

    import ray.train

    from vpo_ray.train.worker import checkpoint_problem, pick_checkpoint

    run = tmp_path / "run"
    shutil.copytree(zero2["root"] / "round_0" / "sft" / "ray_results" / "sft", run)
    newest, previous = run / "checkpoint_00000004", run / "checkpoint_00000002"
    assert checkpoint_problem(str(newest)) is None and checkpoint_problem(str(previous)) is None
    optim = next((newest / "checkpoint").rglob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])  # a half-written ZeRO shard
    assert "truncated" in checkpoint_problem(str(newest))
    choice = pick_checkpoint(ray.train.Checkpoint(str(newest)), rank=0, fallback=True)
    assert choice["path"] == str(previous)
    assert [s["checkpoint"] for s in choice["skipped"]] == ["checkpoint_00000004"]
    (previous / "checkpoint" / "trainer_state.json").write_text("{ truncated")
    choice = pick_checkpoint(ray.train.Checkpoint(str(newest)), rank=0, fallback=True)
    assert choice["path"] is None and len(choice["skipped"]) == 2
    # an explicit resume_from never wanders to other checkpoints
    assert pick_checkpoint(ray.train.Checkpoint(str(newest)), rank=0, fallback=False)["path"] is None


# ---------------------------------------------------------------------------- weights=random, real architecture

def shrunk_llama(root: Path) -> str:
    """Llama-3-8B's architecture (llama3-8b-instruct's shipped config) shrunk to CPU size: a config.json only,
    no weights and no tokenizer, as `weights=random` takes it. The vocabulary stays larger than the stand-in
    tokenizer's, as the real one is."""
    from vpo_ray.train.build import architecture_config

    cfg = architecture_config("llama3-8b-instruct")
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == ("llama", 4096, 32, 128256)
    cfg.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "vocab_size": 4096, "pad_token_id": None, "bos_token_id": None,
                "eos_token_id": None})
    cfg.save_pretrained(root)
    return str(root)


def llama_params(model_dir: str) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters())


@pytest.fixture(scope="module")
def random_sft(ray_session, data, tmp_path_factory):
    """SFT of a random-weight Llama: ZeRO-3 init on 2 workers, packed rows, one checkpoint kept, a worker
    killed at step 5 after the checkpoint of step 3, no checkpoint after the last step."""
    root = tmp_path_factory.mktemp("random_sft")
    arch = shrunk_llama(root / "arch")
    with pytest.MonkeyPatch.context() as env:  # the last worker exits at step 6 (vpo_ray/faults.py)
        env.setenv("VPO_FAULTS", "train_step:exit,step=6,rank=last,times=1")
        env.setenv("VPO_FAULTS_DIR", str(root / "faults"))
        summary = run_train("sft", data["sft"], root / "out", arch, weights="random", deepspeed_stage=3, packing=True,
                            max_length=1024, per_device_batch_size=1, max_steps=6, save_steps=3, keep_checkpoints=1,
                            save_at_end=False, max_failures=1, learning_rate=SFT_LR)
    return root, arch, summary


def test_random_weight_architecture_trains_packed_and_resumes(random_sft):
    from transformers import AutoConfig

    root, arch, summary = random_sft
    out = root / "out"
    assert summary["global_step"] == 6 and summary["weights"] == "random"
    exported = AutoConfig.from_pretrained(summary["model"])
    assert exported.model_type == "llama" and exported.num_hidden_layers == 2 and exported.hidden_size == 64
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    tp = summary["throughput"]
    assert tp["params"] == llama_params(arch)  # counted from ZeRO-3 shards, the whole model
    assert tp["ranks"] == 2 and tp["step_s_median"] > 0 and tp["tokens_per_s_per_gpu"] > 0
    assert 2 * 640 < tp["tokens_per_step"] <= 2 * 1024  # packed: 2+ rows of ~380 tokens per GPU, no padding
    assert tp["mfu"] is None and tp["flops"] == "6·N·T"  # no datasheet peak for a CPU
    # the kill: steps 4 and 5 were logged before it, trained again after the resume from step 3
    # the comparison needs the crashed attempt's rows for steps 4-5; a kill that lands before rank 0 wrote them
    # leaves nothing to compare (seen once in CI): the resume itself is asserted below either way
    check = summary["resume_check"]
    assert check is None or (set(check["steps_redone"]) <= {4, 5} and check["max_rel_loss_diff"] < 1e-4), check
    attempts = summary["attempts"]
    assert [a["start_step"] for a in attempts] == [0, 3] and attempts[1]["resumed_from"].endswith("checkpoint_00000003")
    # one checkpoint, moved (not copied) into the run dir; none after the last step
    run = out / "ray_results" / "sft"
    assert sorted(p.name for p in run.glob("checkpoint_0*")) == ["checkpoint_00000003"]
    assert not list((run / "_hf_output").glob("checkpoint-*"))
    saves = summary["checkpoint_saves"]  # step 3 only: the resumed attempt saved nothing (save_at_end=false)
    assert [s["step"] for s in saves] == [3] and saves[0]["write_s"] >= 0 and saves[0]["bytes"] > 0
    assert summary["checkpoint_read_s"] is not None


@pytest.fixture(scope="module")
def random_dpo(ray_session, data, random_sft, tmp_path_factory):
    """DPO of the same random-weight architecture, ZeRO-2 with the optimizer offloaded (HF's torch AdamW
    steps the CPU partitions): the reference is built from the same seed."""
    root = tmp_path_factory.mktemp("random_dpo")
    _, arch, _ = random_sft
    return run_train("dpo", data["dpo"], root / "out", arch, weights="random", deepspeed_stage=2, offload=True,
                     max_length=512, max_steps=3, save_steps=0, export=False, learning_rate=DPO_LR), root / "out"


def test_random_weight_dpo_starts_with_reference_equal_to_policy(random_dpo):
    summary, out = random_dpo
    rows = steps(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: policy == reference
    assert summary["model"] is None and not (out / "model").exists()  # export=false
    assert not list((out / "ray_results").rglob("checkpoint_0*"))  # save_steps=0: no checkpoint
    assert summary["throughput"]["flops"].startswith("6·N·T + 2·N·T")  # the reference forward runs in each step
