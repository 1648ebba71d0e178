"""Typed configs: YAML + key=value overrides; every mistake names its key."""
import dataclasses

import pytest

from vpo_ray.bench.config import BenchConfig
from vpo_ray.config import (ConfigError, EvalConfig, GenerateConfig, SamplingConfig, ServeConfig,
                            TrainConfig, VideoConfig, load_config, parse_override, replace)


def test_defaults_follow_the_paper():
    t = load_config(TrainConfig)
    assert t.per_device_batch_size == 2 and t.beta == 0.1 and t.warmup_ratio == 0.1
    assert load_config(ServeConfig).host == "127.0.0.1"


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "g.yaml"
    f.write_text("num_samples: 3\nvideo:\n  num_frames: 9\n  fps: 4\nsampling: {temperature: 0.5}\n")
    cfg = load_config(GenerateConfig, f, ["video.fps=12", "sampling.top_p=0.8", "queries=q.json"])
    assert cfg.num_samples == 3 and cfg.video.num_frames == 9 and cfg.video.fps == 12
    assert cfg.sampling.temperature == 0.5 and cfg.sampling.top_p == 0.8 and cfg.queries == "q.json"
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_samples = 4  # frozen


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(GenerateConfig, None, ["pair_margin=1"]).pair_margin == 1.0
    with pytest.raises(ConfigError, match="num_samples"):
        load_config(GenerateConfig, None, ["num_samples=2.5"])


@pytest.mark.parametrize("override, key", [
    ("num_sample=3", "num_sample"),
    ("video.frames=3", "video.frames"),
    ("video.num_frames=many", "video.num_frames"),
    ("refine=maybe", "refine"),
    ("sampling=3", "sampling"),
    ("checklist=5", "checklist"),
    ("ray.address=[1, 2]", "ray.address"),
])
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(GenerateConfig, None, [override])
    assert key in str(e.value)


@pytest.mark.parametrize("cls, override, message", [
    (GenerateConfig, "video.num_frames=0", "video.num_frames: must be >= 1, got 0"),
    (GenerateConfig, "judge_sampling.top_p=1.5", "judge_sampling.top_p: expected 0 < top_p <= 1, got 1.5"),
    (GenerateConfig, "rewrite_stage.batch_size=0", "rewrite_stage.batch_size: must be >= 1, got 0"),
    (GenerateConfig, "t2v_stage.max_actors=0", "t2v_stage.max_actors: must be >= min_actors (1), got 0"),
    (GenerateConfig, "ray.num_cpus=0", "ray.num_cpus: must be >= 1 (or null), got 0"),
    (EvalConfig, "sampling.temperature=-1", "sampling.temperature: must be >= 0 (0 = greedy), got -1.0"),
    (ServeConfig, "autoscaling.initial_replicas=5", "autoscaling.initial_replicas: must lie in [1, 2] (or null), got 5"),
    (ServeConfig, "autoscaling.max_replicas=0", "autoscaling.min_replicas: need 0 <= min_replicas <= max_replicas (0)"),
    (ServeConfig, "video.fps=0", "video.fps: must be >= 1, got 0"),
    (BenchConfig, "video.height=0", "video.height: must be >= 1 (or null), got 0"),
    (BenchConfig, "train.engine=jax", "train.engine: expected trl"),  # the section's message already has its path
    (TrainConfig, "throughput_warmup_steps=-1", "throughput_warmup_steps: must be >= 0, got -1"),
])
def test_bad_values_name_the_section_and_field(cls, override, message):
    """Each config section checks itself when built; loaded, the error names the field's whole path."""
    with pytest.raises(ConfigError) as e:
        load_config(cls, None, [override])
    assert str(e.value).startswith(message)


def test_sections_check_themselves_when_built_in_code():
    with pytest.raises(ConfigError, match="^num_inference_steps: must be >= 1, got 0"):
        VideoConfig(num_inference_steps=0)
    with pytest.raises(ConfigError, match="^max_new_tokens: must be >= 1, got 0"):
        SamplingConfig(max_new_tokens=0)


def test_unknown_key_in_yaml_names_it(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("method: dpo\nlearning_rat: 1e-6\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        load_config(TrainConfig, f)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(TrainConfig, tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, tmp_path / "bad.yaml")


def test_override_syntax():
    assert parse_override("a.b=1") == ("a.b", 1)
    assert parse_override("x=") == ("x", "")
    assert parse_override("s=hello world") == ("s", "hello world")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("novalue")


def test_checklist_is_a_file_named_in_yaml(tmp_path):
    from vpo_ray.data.checklist import load_checklist

    c = tmp_path / "mine.yaml"
    c.write_text("questions:\n  - {id: a, question: 'Q {query}?', weight: 2}\n")
    f = tmp_path / "g.yaml"
    f.write_text(f"checklist: {c}\n")
    cfg = load_config(GenerateConfig, f)
    items = load_checklist(cfg.checklist).items
    assert len(items) == 1 and items[0].weight == 2.0 and items[0].ask("a cat") == "Q a cat?"
    c.write_text("questions:\n  - {id: a, question: q, wieght: 2}\n")
    with pytest.raises(ConfigError, match=r"mine.yaml question 0: unknown key 'wieght'"):
        load_checklist(cfg.checklist)


def test_replace_dotted():
    cfg = replace(load_config(GenerateConfig), **{"video.fps": 3, "num_samples": 5})
    assert cfg.video.fps == 3 and cfg.num_samples == 5


def test_exponent_without_dot_is_a_float():
    assert load_config(TrainConfig, None, ["learning_rate=1e-4"]).learning_rate == 1e-4
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(TrainConfig, None, ["learning_rate=fast"])


@pytest.mark.parametrize("content, why", [
    ("a: [1, 2\n", "not valid YAML"),
    ("- just\n- a list\n", "must hold a mapping"),
    (b"\xff\xfe\x00bad", "cannot be read"),
])
def test_every_yaml_reader_names_the_file(tmp_path, content, why):
    """Job configs, the loop's sectioned YAML, the preset-default merge and the jobs/ entry
    points read YAML through one reader, so each failure says which file and why."""
    from jobs._entry import positional_from_config
    from vpo_ray.config import load_config_with_defaults
    from vpo_ray.train.loop import split_overrides

    path = tmp_path / "job.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    readers = [lambda: load_config(GenerateConfig, path), lambda: split_overrides([], str(path)),
               lambda: load_config_with_defaults(GenerateConfig, path, [], {"num_samples": 2}),
               lambda: positional_from_config("name", path, [], "default")]
    for read in readers:
        with pytest.raises(ConfigError, match=why) as e:
            read()
        assert str(path) in str(e.value)
