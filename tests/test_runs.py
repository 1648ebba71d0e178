"""Run folders: a model argument may name the model folder or the run folder of the job that wrote it."""
import json

import pytest

from vpo_ray.runs import RunFolderError, model_dir


def _model(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    return str(path)


def test_a_model_folder_is_itself(tmp_path):
    assert model_dir(_model(tmp_path / "m")) == str(tmp_path / "m")
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")  # a diffusers pipeline
    assert model_dir(str(tmp_path / "pipe")) == str(tmp_path / "pipe")


def test_a_train_run_folder_is_its_export(tmp_path):
    export = _model(tmp_path / "train_sft" / "model")
    (tmp_path / "train_sft" / "config.json").write_text(json.dumps({"method": "sft", "model": None}))  # the job's
    assert model_dir(str(tmp_path / "train_sft")) == export


def test_a_loop_folder_is_its_last_optimizer(tmp_path):
    _model(tmp_path / "loop" / "round_0" / "sft" / "model")
    last = _model(tmp_path / "loop" / "round_1" / "dpo" / "model")
    (tmp_path / "loop" / "loop_summary.json").write_text(
        json.dumps({"optimizer": str(tmp_path / "loop" / "round_1" / "dpo")}))
    assert model_dir(str(tmp_path / "loop")) == last


def test_ids_uris_and_missing_paths_pass_through(tmp_path):
    for given in ("Qwen/Qwen2.5-7B-Instruct", "tiny", "s3://bucket/model", str(tmp_path / "not-yet")):
        assert model_dir(given) == given


def test_a_folder_that_is_neither_names_the_path_and_the_layouts(tmp_path):
    (tmp_path / "train_sft").mkdir()  # the job has not exported yet
    with pytest.raises(RunFolderError) as e:
        model_dir(str(tmp_path / "train_sft"))
    assert str(tmp_path / "train_sft") in str(e.value) and "model/config.json" in str(e.value)


def test_every_loader_resolves_run_folders(tmp_path, tiny_cache):
    """registry.model_path is the one door: train, generate, eval and serve all load through it."""
    import shutil

    from vpo_ray.models import registry

    optimizer = registry.model_path(registry.get_spec("tiny", "optimizer"))
    shutil.copytree(optimizer, tmp_path / "train_dpo" / "model")
    assert registry.model_path(str(tmp_path / "train_dpo")) == str(tmp_path / "train_dpo" / "model")
    assert registry.check_config(str(tmp_path / "train_dpo"))["kind"] == "transformers"
    model, tok = registry.load_causal_lm(str(tmp_path / "train_dpo"))
    assert tok.pad_token is not None
