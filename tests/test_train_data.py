"""Bad training data fails on the driver, before any Ray worker starts, naming row and field."""
from __future__ import annotations

import json

import pytest

from train_helpers import dpo_rows, sft_rows, tiny_model_path, write_jsonl, write_parquet
from vpo_ray.config import ConfigError, TrainConfig, load_config
from vpo_ray.train.data import DataError, find_data_files, load_for_trl, validate_training_set


@pytest.fixture(scope="module")
def tokenizer(tiny_cache):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_path(tiny_cache))


def _bad(rows, idx, **changes):
    rows = [dict(r) for r in rows]
    for k, v in changes.items():
        if v is KeyError:
            rows[idx].pop(k)
        else:
            rows[idx][k] = v
    return rows


def test_good_sets_pass_and_report_rows(tmp_path, tokenizer):
    rep = validate_training_set(write_parquet(sft_rows(5), tmp_path / "sft.parquet"), "sft", tokenizer, 2048)
    assert rep.rows == 5 and rep.max_tokens > 20
    rep = validate_training_set(write_jsonl(dpo_rows(4), tmp_path / "dpo.jsonl"), "dpo", tokenizer, 2048)
    assert rep.rows == 4


def test_missing_messages_names_row(tmp_path):
    path = write_jsonl(_bad(sft_rows(4), 2, messages=KeyError), tmp_path / "sft.jsonl")
    with pytest.raises(DataError, match=r"row 2: missing field 'messages'"):
        validate_training_set(path, "sft")


def test_non_list_messages_names_row(tmp_path):
    path = write_jsonl(_bad(sft_rows(4), 1, messages="a cat, cinematic"), tmp_path / "sft.jsonl")
    with pytest.raises(DataError, match=r"row 1: field 'messages' must be a list of chat messages, got str"):
        validate_training_set(path, "sft")


def test_sft_without_assistant_answer(tmp_path):
    rows = sft_rows(3)
    rows[0]["messages"] = rows[0]["messages"][:-1]
    with pytest.raises(DataError, match=r"row 0: field 'messages' must end with an assistant message"):
        validate_training_set(write_jsonl(rows, tmp_path / "sft.jsonl"), "sft")


def test_empty_chosen_and_rejected_name_row_and_field(tmp_path):
    path = write_parquet(_bad(dpo_rows(5), 3, chosen=[]), tmp_path / "a" / "dpo.parquet")
    with pytest.raises(DataError, match=r"dpo.parquet row 3: field 'chosen' is empty"):
        validate_training_set(path, "dpo")
    path = write_jsonl(_bad(dpo_rows(5), 4, rejected=[{"role": "assistant", "content": "  "}]), tmp_path / "dpo.jsonl")
    with pytest.raises(DataError, match=r"row 4: field 'rejected' has an empty assistant message"):
        validate_training_set(path, "dpo")


def test_missing_rejected_and_identical_pair(tmp_path):
    with pytest.raises(DataError, match=r"row 0: missing field 'rejected'"):
        validate_training_set(write_jsonl(_bad(dpo_rows(2), 0, rejected=KeyError), tmp_path / "a.jsonl"), "dpo")
    rows = dpo_rows(3)
    rows[1]["rejected"] = rows[1]["chosen"]
    with pytest.raises(DataError, match=r"row 1: fields 'chosen' and 'rejected' are identical"):
        validate_training_set(write_jsonl(rows, tmp_path / "b.jsonl"), "dpo")


def test_over_long_row_names_row(tmp_path, tokenizer):
    rows = sft_rows(5)
    rows[3]["messages"][-1]["content"] = "a very long description of a cat " * 200
    path = write_parquet(rows, tmp_path / "sft.parquet")
    with pytest.raises(DataError, match=r"row 3: \d+ tokens exceed max_length=512"):
        validate_training_set(path, "sft", tokenizer, 512)


def test_invalid_json_line_names_row(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text(json.dumps(sft_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(DataError, match=r"row 1: not valid JSON"):
        validate_training_set(str(path), "sft")


def test_generate_output_dir_picks_the_set_and_trl_sees_only_its_columns(tmp_path):
    d = tmp_path / "gen"
    write_parquet(dpo_rows(6), d / "dpo.parquet")
    write_jsonl([{"query_id": "x", "stage": "rewrite", "reason": "r", "error": "e"}], d / "errors.jsonl")
    (d / "summary.json").write_text("{}")
    assert find_data_files(str(d), "dpo") == [str(d / "dpo.parquet")]
    ds = load_for_trl(str(d), "dpo", cache_dir=str(tmp_path / "cache"))
    assert sorted(ds.column_names) == ["chosen", "prompt", "rejected"]
    assert len(ds) == 6 and ds[0]["chosen"][0]["role"] == "assistant"
    with pytest.raises(DataError, match="no sft.parquet"):
        find_data_files(str(d), "sft")
    with pytest.raises(DataError, match="does not exist"):
        find_data_files(str(d / "missing"), "dpo")


def test_cli_fails_before_workers_start(tmp_path, tiny_cache, monkeypatch, capsys):
    from vpo_ray import cli, ray_utils

    def no_ray(*a, **k):
        raise AssertionError("Ray was started for a bad training set")

    monkeypatch.setattr(ray_utils, "init_ray", no_ray)
    data = write_jsonl(_bad(dpo_rows(4), 2, chosen=[]), tmp_path / "dpo.jsonl")
    out = tmp_path / "run"
    rc = cli.main(["train", "dpo", "--data", data, "--out", str(out), "--model", tiny_model_path(tiny_cache)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "'chosen'" in err
    assert not (out / "ray_results").exists()


def test_config_rejects_bad_train_settings():
    with pytest.raises(ConfigError, match="deepspeed_stage"):
        load_config(TrainConfig, None, ["deepspeed_stage=1"])
    with pytest.raises(ConfigError, match="method"):
        load_config(TrainConfig, None, ["method=ppo"])
    with pytest.raises(ConfigError, match="offload"):
        load_config(TrainConfig, None, ["deepspeed_stage=0", "offload=true"])


@pytest.mark.parametrize("completion_only_loss", [True, False])
def test_sft_loss_is_on_the_response_tokens_only_by_default(tmp_path, tiny_cache, tokenizer, completion_only_loss):
    """TRL's SFTTrainer on the set as `vpo train` loads it: which label positions are -100."""
    from trl import SFTConfig, SFTTrainer

    rows = sft_rows(2)
    ds = load_for_trl(write_jsonl(rows, tmp_path / "sft.jsonl"), "sft", cache_dir=str(tmp_path / "cache"),
                      completion_only_loss=completion_only_loss)
    assert ds.column_names == (["prompt", "completion"] if completion_only_loss else ["messages"])
    args = SFTConfig(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_length=2048,
                     dataset_num_proc=None, model_init_kwargs={"dtype": "float32"})
    trainer = SFTTrainer(model=tiny_model_path(tiny_cache), args=args, train_dataset=ds, processing_class=tokenizer)
    labels = trainer.data_collator([trainer.train_dataset[0]])["labels"][0].tolist()
    ids = trainer.train_dataset[0]["input_ids"]
    prompt = tokenizer.apply_chat_template(rows[0]["messages"][:-1], add_generation_prompt=True, tokenize=True)
    n_prompt = len(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    answer = tokenizer.decode(ids[n_prompt:], skip_special_tokens=True).strip()
    assert answer == rows[0]["messages"][-1]["content"]  # the tokens after the prompt are the response
    assert labels[n_prompt:] == ids[n_prompt:]  # every response token is learned
    if completion_only_loss:
        assert labels[:n_prompt] == [-100] * n_prompt  # no loss on the template or the query
    else:
        assert labels[:n_prompt] == ids[:n_prompt]  # ablation: loss on every token of the chat
