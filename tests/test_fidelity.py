"""The VPO recipe by default, each departure one key away (docs/FIDELITY.md: each test pins a row).

Model stages run on the tiny preset's real classes (random weights, no Ray): the tests
check what goes into the models and what comes out of a cut generation, not quality.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from chat_server import Script, chat_server

from vpo_ray import prompts
from vpo_ray.config import (ConfigError, EvalConfig, GenerateConfig, PromptsConfig, SamplingConfig, ServeConfig,
                            TrainConfig, load_config, replace)
from vpo_ray.pipeline.finalise import Finaliser, sft_target
from vpo_ray.pipeline.llm import Critic, LocalJudge, Rewriter

REPO = Path(__file__).resolve().parent.parent
RAW = "a city at night -ar 16:9 -camera zoom in"


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    from vpo_ray.models.registry import get_spec, model_path

    return {role: model_path(get_spec("tiny", role)) for role in ("optimizer", "judge")}


def query_batch(raw: str = RAW, text: str = "a city at night") -> dict:
    return {k: np.array(v, dtype=object) for k, v in {
        "query_id": ["q1"], "query": [raw], "text": [text], "error": [""], "error_stage": [""]}.items()}


def record_calls(engine) -> list[dict]:
    """Wraps engine.generate; each call's messages and prefills are appended to the returned list."""
    calls, real = [], engine.generate

    def generate(messages_list, seeds, sampling, prefills=None, stop=(), **kwargs):
        calls.append({"messages": list(messages_list), "prefills": prefills, "stop": stop})
        return real(messages_list, seeds, sampling, prefills=prefills, stop=stop, **kwargs)

    engine.generate = generate
    return calls


# ---------------------------------------------------------------------------- defaults = the official values

def test_generate_defaults_are_the_official_recipe():
    g = GenerateConfig()
    assert (g.sampling.max_new_tokens, g.sampling.temperature, g.sampling.top_p) == (2048, 0.9, 0.9)  # llama3_infer.py
    assert (g.samples, replace(g, kind="dpo").samples) == (1, 4)
    assert (g.judge_sampling.temperature, g.judge_sampling.top_p) == (0.7, 1.0)  # gpt4o_infer.py
    assert g.judge_endpoint.max_tokens is None and g.teacher_endpoint.max_tokens is None
    assert (g.truncation, g.refine_keep_multiline, g.refine_reflection) == ("error", False, True)
    assert (g.render, g.pair_select, g.video_score, g.pair_margin, g.max_pairs_per_query) == \
        ("all", "first", "binary", 0.5, 1)
    assert g.sft_select == "first"
    assert g.prompts == PromptsConfig() and (g.prompts.template_set, g.prompts.optimizer_input) == ("official", "query")
    assert ServeConfig().prompts.optimizer_input == "query"
    assert EvalConfig().prompts.optimizer_input == "query" and EvalConfig().video_score == "binary"


def test_training_defaults_and_job_yamls_use_the_official_batch_and_cutoff():
    t = TrainConfig()
    assert (t.per_device_batch_size, t.gradient_accumulation_steps, t.max_length) == (2, 1, 2048)
    assert t.completion_only_loss is True
    for name in ("train_sft", "train_dpo"):
        cfg = load_config(TrainConfig, REPO / "jobs" / f"{name}.yaml")
        assert (cfg.per_device_batch_size, cfg.num_workers, cfg.gradient_accumulation_steps) == (2, 8, 1), name
        assert cfg.max_length == 2048 and cfg.completion_only_loss
    from vpo_ray.train.loop import split_overrides

    values, _ = split_overrides([], str(REPO / "jobs" / "full_loop.yaml"))
    merged = {**values["train"], **values["sft"]}
    assert (merged["per_device_batch_size"], merged["num_workers"], merged["gradient_accumulation_steps"]) == (2, 8, 1)
    assert "num_samples" not in values["generate"]  # the recipe's K per kind


def test_paper_job_yamls_keep_the_defaults_and_the_teacher_file_is_the_paper_setup():
    sft = load_config(GenerateConfig, REPO / "jobs" / "build_sft.yaml")
    dpo = load_config(GenerateConfig, REPO / "jobs" / "build_dpo.yaml")
    assert (sft.samples, dpo.samples) == (1, 4)
    for cfg in (sft, dpo):
        assert (cfg.render, cfg.pair_select, cfg.video_score, cfg.truncation, cfg.sft_select) == \
            ("all", "first", "binary", "error", "first")
        assert cfg.prompts == PromptsConfig()
    teacher = load_config(GenerateConfig, REPO / "jobs" / "paper_teacher.yaml")
    for ep in (teacher.teacher_endpoint, teacher.judge_endpoint):
        assert ep.base_url == "https://api.openai.com/v1" and ep.model == "gpt-4o" and ep.max_tokens is None
    assert teacher.teacher_endpoint.api_key_env == "VPO_TEACHER_API_KEY" and teacher.samples == 1
    assert teacher.judge_sampling.temperature == 0.7


def test_tiny_preset_departs_only_where_random_weights_need_it_and_the_demo_says_where_it_does():
    from vpo_ray.demo import TINY_OVERRIDES
    from vpo_ray.models.registry import preset_job_defaults

    tiny = preset_job_defaults("tiny")
    assert tiny["truncation"] == "keep" and tiny["refine_reflection"] is False
    ablations = ("pair_select", "video_score", "render", "sft_select", "prompts.", "refine_keep_multiline",
                 "completion_only_loss", "pair_margin")
    assert not [k for k in tiny if any(a in k for a in ablations)]
    assert preset_job_defaults("paper") == {}
    # The demo departs for its scripted judge and 139k-parameter optimizer, and says so where the table is.
    demo = [k.split("=")[0] for k in TINY_OVERRIDES if any(a in k for a in ablations)]
    assert demo == ["gen.prompts.optimizer_template", "gen.render"]
    doc = (REPO / "docs" / "FIDELITY.md").read_text()
    assert "the bare query as the optimizer's turn" in doc and "`render=passing`" in doc


@pytest.mark.parametrize("key, value", [("truncation", "drop"), ("sft_select", "best"), ("render", "some"),
                                        ("pair_select", "last"), ("video_score", "fuzzy")])
def test_switches_refuse_unknown_values_naming_the_key(tmp_path, key, value):
    from vpo_ray.pipeline.generate import check_config

    with pytest.raises(ConfigError, match=key):
        check_config(load_config(GenerateConfig, None, [f"{key}={value}"]))


# ---------------------------------------------------------------------------- 1. optimizer input

def test_optimizer_chat_has_no_system_turn_and_keeps_the_flags(tiny):
    stage = Rewriter(model=tiny["optimizer"], num_samples=2, sampling={"max_new_tokens": 6}, truncation="keep")
    calls = record_calls(stage.backend.engine)
    stage(query_batch())
    (call,) = calls
    assert len(call["messages"]) == 2 and all([m["role"] for m in msgs] == ["user"] for msgs in call["messages"])
    assert call["messages"][0][0]["content"].endswith(f"User Query:{RAW}\n\nVideo Prompt:")


def test_flag_stripping_is_one_key_away(tiny):
    stage = Rewriter(model=tiny["optimizer"], num_samples=1, sampling={"max_new_tokens": 4}, truncation="keep",
                     optimizer_input="text", templates=prompts.load_templates(PromptsConfig(template_set="vpo_ray")))
    calls = record_calls(stage.backend.engine)
    stage(query_batch())
    (msgs,) = calls[0]["messages"]
    assert [m["role"] for m in msgs] == ["system", "user"] and "User Query: a city at night\n" in msgs[1]["content"]


def test_served_optimizer_sees_the_training_format(tiny_cache):
    from vpo_ray.serve.engine import OptimizerEngine

    engine = OptimizerEngine(load_config(ServeConfig, None, ["max_new_tokens=4"]))
    text = engine.prompt_text(RAW)
    assert f"User Query:{RAW}\n\nVideo Prompt:" in text and "system" not in text.split("User Query")[0].lower()


# ---------------------------------------------------------------------------- 3. lengths: cut = error row

def test_capped_rewrite_is_an_error_row_truncated(tiny):
    from vpo_ray.pipeline.generate import _record_from_rows

    out = Rewriter(model=tiny["optimizer"], num_samples=2, sampling={"max_new_tokens": 4})(query_batch())
    cands = json.loads(out["candidates_json"][0])
    assert [(c["prompt"], c["error"]) for c in cands] == [("", "rewrite: truncated")] * 2
    assert (out["error"][0], out["error_stage"][0]) == ("rewrite: truncated", "rewrite")
    row = {k: v[0] for k, v in out.items()}
    rec = _record_from_rows([row], {"query_id": "q1", "query": RAW, "text": "a city at night"},
                            GenerateConfig(), fin=None)
    assert (rec["error"]["stage"], rec["error"]["reason"]) == ("rewrite", "truncated")


def test_keep_policy_marks_cut_rewrites(tiny):
    out = Rewriter(model=tiny["optimizer"], num_samples=2, sampling={"max_new_tokens": 4},
                   truncation="keep")(query_batch())
    cands = json.loads(out["candidates_json"][0])
    assert all(c["prompt"] and c["truncated"] is True and not c["error"] for c in cands) and not out["error"][0]


def test_cut_critique_gives_no_verdict_unless_kept(tiny):
    items = [("q1", RAW, "A neon city at night.", 0), ("q1", RAW, "A city.", 1)]
    sampling = SamplingConfig(max_new_tokens=3, temperature=0.7)
    assert LocalJudge(tiny["judge"], sampling, seed=0).judge(items) == ["truncated", "truncated"]
    kept = LocalJudge(tiny["judge"], sampling, seed=0, truncation="keep").judge(items)
    assert all(j.truncated and isinstance(j.verdict, bool) for j in kept)


def test_critic_stage_turns_cut_critiques_into_a_truncated_error(tiny):
    batch = query_batch()
    batch["candidates_json"] = np.array([json.dumps([{"sample_idx": 0, "prompt": "A neon city.", "judge": None,
                                                      "refined": None, "error": ""}])], dtype=object)
    out = Critic(tiny["judge"], {"max_new_tokens": 3}, {}, seed=0)(batch)
    (cand,) = json.loads(out["candidates_json"][0])
    assert cand["error"] == "critique: truncated" and out["error"][0] == "critique: truncated"


# ---------------------------------------------------------------------------- 2. refine after a reflection

def test_refine_turn_lets_the_judge_reflect_first(tiny):
    judge = LocalJudge(tiny["judge"], SamplingConfig(max_new_tokens=4), seed=0)
    calls = record_calls(judge.engine)
    (out,) = judge.refine([("q1", RAW, "A city.", 0, "it drops the zoom")])
    (call,) = calls
    assert call["prefills"] is None  # nothing written for the model: it starts with its reflection
    msgs = call["messages"][0]
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[2]["content"] == "Step-by-step verification: it drops the zoom\nFinal Judgement (Yes or No): No"
    assert msgs[3]["content"] == prompts.default_templates().refine
    assert out == "truncated"  # random weights never reach a [[start]] ... [[end]] block in 4 tokens

    fast = LocalJudge(tiny["judge"], SamplingConfig(max_new_tokens=4), seed=0, truncation="keep", reflection=False)
    calls = record_calls(fast.engine)
    (kept,) = fast.refine([("q1", RAW, "A city.", 0, "it drops the zoom")])
    assert calls[0]["prefills"] == ["Final Refined Prompt: [[start]] "]
    assert isinstance(kept, tuple) and kept[0] and kept[1] is True  # cut inside the block, kept and marked


# ---------------------------------------------------------------------------- 4. the teacher endpoint

def test_teacher_endpoint_rewrites_with_the_judges_retries_and_accounting(monkeypatch):
    monkeypatch.setenv("VPO_TEACHER_API_KEY", "sk-teacher")
    script = Script(default=("ok", "A neon-lit city at night, the camera zooming in on a busy avenue."))
    script.plan = {"flaky": [("status", 503), ("ok", "A flaky prompt, answered on the second try.")],
                   "down": [("status", 500)], "long": [("cut", "A prompt that went on and")]}
    with chat_server(script) as url:
        endpoint = {"base_url": url, "api_key_env": "VPO_TEACHER_API_KEY", "max_retries": 2, "backoff_s": 0.0,
                    "max_concurrency": 2}
        stage = Rewriter(model="unused", num_samples=2, sampling={"temperature": 0.9, "top_p": 0.9},
                         endpoint=endpoint)
        batch = {k: np.array(v, dtype=object) for k, v in {
            "query_id": ["q1", "q2", "q3", "q4"], "query": [RAW, "flaky", "down", "long"],
            "text": ["x"] * 4, "error": [""] * 4, "error_stage": [""] * 4}.items()}
        out = stage(batch)
    cands = [json.loads(c) for c in out["candidates_json"]]
    assert [c["prompt"] for c in cands[0]] == ["A neon-lit city at night, the camera zooming in on a busy avenue."] * 2
    assert cands[1][0]["prompt"].startswith("A flaky prompt") and stage.backend.endpoint.stats["retries"] >= 1
    assert cands[2][0]["error"] == "rewrite: teacher endpoint failed after 3 attempts: HTTP 500"
    assert out["error_stage"][2] == "rewrite" and "HTTP 500" in out["error"][2]
    assert out["error"][3] == "rewrite: truncated"
    first = [b for b in script.bodies if b["messages"][0]["content"].endswith(f"User Query:{RAW}\n\nVideo Prompt:")]
    assert len(first) == 2 and all([m["role"] for m in b["messages"]] == ["user"] for b in first)
    assert all(b["temperature"] == 0.9 and b["top_p"] == 0.9 and "max_tokens" not in b for b in first)
    assert first[0]["seed"] != first[1]["seed"]  # one seed per sample: a rerun asks the same way
    assert set(script.auth) == {"Bearer sk-teacher"} and script.max_active <= 2


def test_run_switches_reach_the_llm_stages_the_flow_builds(tiny_cache):
    """`vpo generate prompts.template_set=vpo_ray truncation=keep ...`: the Rewriter and Critic built
    from flow.llm_stage_kwargs (the one place both stages' arguments come from) run with every switch
    (each set away from the stage constructors' defaults) and the engine settings."""
    from vpo_ray.pipeline import flow
    from vpo_ray.pipeline.llm import EndpointGenerator

    cfg = load_config(GenerateConfig, None, [
        "preset=tiny", "kind=sft", "prompts.template_set=vpo_ray", "prompts.optimizer_input=text",
        "truncation=keep", "refine_reflection=false", "refine_keep_multiline=true", "llm_engine.backend=hf"])
    tiny = flow.resolve_models(cfg)["judge"]
    rewrite, judge = flow.llm_stage_kwargs(cfg, {"optimizer": tiny, "judge": tiny})
    stage = flow.RewriteAndJudge(rewrite=rewrite, judge=judge)
    rewriter, local = stage.rewriter, stage.critic.backend
    assert rewriter.templates == local.templates == prompts.load_templates(PromptsConfig(template_set="vpo_ray"))
    assert rewriter.input == "text" and rewriter.keep_cut and local.keep_cut
    assert not local.reflection and local.keep_multiline
    assert rewriter.backend.engine is local.engine and local.engine.backend == "hf"
    teacher = replace(cfg, teacher_endpoint=replace(cfg.teacher_endpoint, base_url="http://127.0.0.1:9/v1"))
    rewrite, _ = flow.llm_stage_kwargs(teacher, {"optimizer": tiny, "judge": tiny})
    backend = Rewriter(**rewrite).backend
    assert isinstance(backend, EndpointGenerator) and backend.endpoint.url == "http://127.0.0.1:9/v1/chat/completions"


# ---------------------------------------------------------------------------- SFT target and rendering

def _cand(idx, verdict=None, conf=0.9, refined=None, prompt="p"):
    judge = None if verdict is None else {"verdict": verdict, "confidence": conf, "reasons": "r"}
    return {"sample_idx": idx, "prompt": f"{prompt}{idx}", "judge": judge, "refined": refined, "error": ""}


@pytest.mark.parametrize("cands, select, expected", [
    ([_cand(0, True, 0.6), _cand(1, True, 0.9)], "first", ("p0", "passing")),
    ([_cand(0, True, 0.6), _cand(1, True, 0.9)], "best-of-k", ("p1", "passing")),
    ([_cand(0, False, refined="r0"), _cand(1, True, 0.9)], "first", ("r0", "refined")),  # sample 0 decides
    ([_cand(0, False, refined="r0"), _cand(1, True, 0.9)], "best-of-k", ("p1", "passing")),
    ([_cand(0, False), _cand(1, False, refined="r1")], "first", ("r1", "refined")),
    ([_cand(0, False), _cand(1, False)], "first", None),
])
def test_sft_target_table(cands, select, expected):
    got = sft_target(cands, select)
    assert (got[:2] if got else None) == expected


def test_sft_row_uses_the_optimizer_input_and_failure_names_truncation():
    fin = Finaliser(GenerateConfig(), prompts.default_templates())
    q = {"query_id": "q1", "query": RAW, "text": "a city at night"}
    rec = fin.sft(q, [_cand(0, True)])
    (row,) = rec["rows"]
    assert [m["role"] for m in row["messages"]] == ["user", "assistant"] and row["truncated"] is False
    assert row["messages"][0]["content"].endswith(f"User Query:{RAW}\n\nVideo Prompt:")
    cut = dict(_cand(0, False), refine_error="refine: truncated")
    assert fin.sft(q, [cut])["error"]["reason"] == "truncated"


def test_every_sample_is_rendered_unless_switched():
    from vpo_ray.pipeline.generate import explode_for_render

    row = {"query_id": "q1", "query": RAW, "text": "t", "flags_json": json.dumps({"aspect_ratio": "16:9"}),
           "error": "", "error_stage": "",
           "candidates_json": json.dumps([_cand(0, True), _cand(1, False), _cand(2), dict(_cand(3), prompt="")])}
    every = explode_for_render(row, seeds_per_prompt=1, seed=0, model="m")
    assert [r["sample_idx"] for r in every] == [0, 1, 2] and every[0]["aspect_ratio"] == "16:9"
    assert [r["sample_idx"] for r in explode_for_render(row, 1, 0, "m", render="passing")] == [0]


# ---------------------------------------------------------------------------- 5. checklist files

def test_shipped_checklist_and_visionreward_layout(tmp_path):
    from vpo_ray.data.checklist import load_checklist, score

    ours = load_checklist("vpo_ray")
    assert len(ours.items) == 8 and ours.items[0].ask("a fox") == "Does the video show the main subject described in: a fox?"
    (tmp_path / "qa.txt").write_text('Does the video meet all the requirements stated in the text "[[prompt]]"?\n'
                                     "Is the composition aesthetically pleasing?\n\n")
    (tmp_path / "weight.json").write_text("[0.95, 0.25]")
    (tmp_path / "vr.yaml").write_text("name: visionreward-video\nquestions_file: qa.txt\nweights_file: weight.json\n")
    vr = load_checklist(str(tmp_path / "vr.yaml"))
    assert [(i.id, i.weight) for i in vr.items] == [("q1", 0.95), ("q2", 0.25)]
    assert vr.items[0].ask("a fox -ar 16:9") == 'Does the video meet all the requirements stated in the text "a fox -ar 16:9"?'
    answers = {"q1": (True, 0.8), "q2": (False, 0.4)}
    assert score(answers, vr.weights()) == pytest.approx(0.95)  # the weight sum of the yes answers
    assert score(answers, vr.weights(), "soft") == pytest.approx(0.95 * 0.8 + 0.25 * 0.4)


@pytest.mark.parametrize("text, message", [
    ("questions_file: qa.txt\nweights: [1.0]\n", "1 weights for 2 questions"),
    ("questions_file: missing.txt\nweights: [1.0]\n", "missing.txt: cannot read"),
    ("questions:\n  - {id: a, question: q, weight: -1}\n", "question 0 \\(a\\): weight must be a number >= 0"),
    ("questions:\n  - {id: a, question: q}\n  - {id: a, question: r}\n", "question id 'a' appears twice"),
    ("questions: []\n", "'questions' must be a non-empty list"),
])
def test_bad_checklists_name_the_file_and_question(tmp_path, text, message):
    from vpo_ray.data.checklist import load_checklist

    (tmp_path / "qa.txt").write_text("Q one [[prompt]]?\nQ two?\n")
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_checklist(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="neither a file nor a shipped checklist \\(vpo_ray\\)"):
        load_checklist("visionreward")


def test_video_preference_set_scores_with_the_runs_checklist_and_pair_choice(tmp_path):
    from vpo_ray.pipeline import video_dpo_set
    from vpo_ray.pipeline.t2v import latents_uri

    (tmp_path / "c.yaml").write_text("questions:\n  - {id: a, question: 'Is it {query}?', weight: 2}\n"
                                     "  - {id: b, question: 'Is it sharp?', weight: 1}\n")
    videos = []
    for seed, (a, b) in enumerate([(False, False), (False, True), (True, True)]):  # scores 0, 1, 3
        uri = str(tmp_path / "videos" / f"q1_s{seed}.mp4")
        Path(latents_uri(uri)).parent.mkdir(exist_ok=True)
        Path(latents_uri(uri)).write_bytes(b"x")
        videos.append({"query_id": "q1", "sample_idx": 0, "seed": seed, "prompt": "A fox.", "video_uri": uri,
                       "error": "", "checklist": [{"id": "a", "answer": a}, {"id": "b", "answer": b}]})
    cfg = load_config(GenerateConfig, None, ["kind=dpo", f"out={tmp_path}", "video_dpo_set=true",
                                             "video.seeds_per_prompt=3", f"checklist={tmp_path / 'c.yaml'}"])
    (first,), _ = video_dpo_set.pair_rows(cfg, videos)
    assert (first["chosen_seed"], first["rejected_seed"], first["chosen_score"]) == (1, 0, 1.0)  # official: first
    (widest,), _ = video_dpo_set.pair_rows(replace(cfg, pair_select="largest-gap"), videos)
    assert (widest["chosen_seed"], widest["chosen_score"]) == (2, 3.0)
    with pytest.raises(ValueError, match="do not match"):  # the shipped checklist asks other questions
        video_dpo_set.pair_rows(replace(cfg, checklist="vpo_ray"), videos)


# ---------------------------------------------------------------------------- 6. separate query sets

def test_loop_builds_each_set_from_its_own_queries(tmp_path):
    from vpo_ray.train.loop import run_loop

    seen = []
    run_loop(1, "sft_queries.json", str(tmp_path / "loop"), dpo_queries="dpo_queries.json",
             generate_fn=lambda c: seen.append((c.kind, c.queries, c.samples)) or {"output": c.out},
             train_fn=lambda c: {"model": str(tmp_path / "model")})
    assert seen == [("sft", "sft_queries.json", 1), ("dpo", "dpo_queries.json", 4)]


def test_loop_cli_takes_both_files_or_one(tmp_path):
    import argparse

    from vpo_ray.train import loop

    p = argparse.ArgumentParser()
    loop.add_arguments(p)
    args = p.parse_args(["--sft-queries", "a.json", "--dpo-queries", "b.json", "--queries", "c.json"])
    with pytest.raises(ConfigError, match="not both"):
        loop.run(args)


# ---------------------------------------------------------------------------- 8. evaluation scorers

FAKE_VBENCH = '''
import json, os
CALLS = []

class VBench:
    def __init__(self, device, full_info_dir, output_path):
        self.out = output_path
        CALLS.append({"device": device, "full_info": full_info_dir})

    def evaluate(self, videos_path, name, prompt_list=[], dimension_list=None, local=False, read_frame=False,
                 mode="vbench_standard", **kwargs):
        files = sorted(os.listdir(videos_path))
        CALLS.append({"name": name, "files": files, "prompt_list": prompt_list, "dims": dimension_list,
                      "local": local, "mode": mode, "cache": os.environ.get("VBENCH_CACHE_DIR")})
        res = {d: [0.0, [{"video_path": os.path.join(videos_path, f), "video_results": k + (i + 1) / 10}
                         for i, f in enumerate(files)]] for k, d in enumerate(dimension_list)}
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, name + "_eval_results.json"), "w") as fh:
            json.dump(res, fh)  # VBench writes its results, it returns nothing
'''


@pytest.fixture
def fake_vbench(tmp_path, monkeypatch):
    pkg = tmp_path / "fakevb" / "vbench"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(FAKE_VBENCH)
    monkeypatch.syspath_prepend(str(tmp_path / "fakevb"))
    monkeypatch.delitem(__import__("sys").modules, "vbench", raising=False)
    monkeypatch.delenv("VBENCH_CACHE_DIR", raising=False)
    import vbench

    yield vbench
    __import__("sys").modules.pop("vbench", None)


def _eval_videos(tmp_path):
    vids = []
    for source in ("original", "dpo"):
        for qid in ("q1", "q2"):
            for seed in (0, 1):
                f = tmp_path / "render" / f"{source}-{qid}-{seed}.mp4"
                f.parent.mkdir(exist_ok=True)
                f.write_bytes(b"not really an mp4")
                vids.append({"source": source, "query_id": qid, "seed": seed, "video_uri": str(f), "error": ""})
    vids.append({"source": "dpo", "query_id": "q3", "seed": 0, "video_uri": "", "error": "render: boom"})
    return vids


def test_vbench_adapter_scores_each_video_against_its_query(tmp_path, fake_vbench):
    from vpo_ray.config import VBenchConfig
    from vpo_ray.eval import metrics as M
    from vpo_ray.eval.vbench_scorer import score_videos

    cfg = VBenchConfig(dimensions=("motion_smoothness", "dynamic_degree"), cache_dir=str(tmp_path / "weights"))
    videos = _eval_videos(tmp_path)
    scores = score_videos(videos, {"q1": "a fox -ar 16:9", "q2": "a cat"}, cfg, str(tmp_path / "vb"), device="cpu")
    evals = [c for c in fake_vbench.CALLS if "mode" in c]
    assert [c["name"] for c in evals] == ["original", "dpo"]  # one folder per source; the failed video is skipped
    first = evals[0]
    assert first["local"] is True and first["mode"] == "custom_input" and first["cache"] == str(tmp_path / "weights")
    assert first["dims"] == ["motion_smoothness", "dynamic_degree"]
    assert sorted(first["prompt_list"].values()) == ["a cat", "a cat", "a fox -ar 16:9", "a fox -ar 16:9"]
    assert len(scores) == 8 and ("dpo", "q3", 0) not in scores
    # the fake gives file k (sorted) the score dim_index + (k+1)/10: files are staged in video order
    assert scores[("original", "q1", 0)] == pytest.approx({"motion_smoothness": 0.1, "dynamic_degree": 1.1})
    assert scores[("dpo", "q2", 1)] == pytest.approx({"motion_smoothness": 0.4, "dynamic_degree": 1.4})
    for v in videos:
        v["vbench"] = scores.get((v["source"], v["query_id"], v["seed"]), {})
    m = M.vbench_metrics([v for v in videos if v["source"] == "original"], cfg.dimensions, n_boot=0)
    assert m["motion_smoothness"]["value"] == pytest.approx(100 * ((0.1 + 0.2) / 2 + (0.3 + 0.4) / 2) / 2)


def test_vbench_standard_mode_names_files_after_the_suite_prompt(tmp_path, fake_vbench):
    from vpo_ray.config import VBenchConfig
    from vpo_ray.eval.vbench_scorer import score_videos

    videos = [v for v in _eval_videos(tmp_path) if v["source"] == "original"]
    score_videos(videos, {"q1": "a fox", "q2": "a cat"}, VBenchConfig(mode="vbench_standard"), str(tmp_path / "vb"),
                 device="cpu")
    (call,) = [c for c in fake_vbench.CALLS if "mode" in c]
    assert call["files"] == ["a cat-0.mp4", "a cat-1.mp4", "a fox-0.mp4", "a fox-1.mp4"] and call["prompt_list"] == []


def test_vbench_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from vpo_ray.config import VBenchConfig
    from vpo_ray.eval.vbench_scorer import score_videos

    monkeypatch.setitem(sys.modules, "vbench", None)  # not installed
    with pytest.raises(ConfigError, match=r"pip install 'vpo_ray\[vbench\]'"):
        score_videos(_eval_videos(tmp_path), {}, VBenchConfig(), str(tmp_path), device="cpu")


def test_eval_table_gets_vbench_columns_and_scorers_are_checked():
    from vpo_ray.eval import report

    stat = {"value": 90.0, "ci": None, "n": 2}
    entry = {"text": {m: stat for m in ("aligned", "unsafe", "imprecise", "refusal")} | {"prompts": 2},
             "vbench": {"motion_smoothness": stat, "dynamic_degree": stat}}
    result = {"metrics": {"original": entry}, "checklist": [], "seeds_per_prompt": 1, "n_queries": 2,
              "queries": "vbench", "preset": "paper", "ci": 0.95, "bootstrap": 0}
    header = next(line for line in report.markdown_table(result).splitlines() if line.startswith("| Source"))
    assert "VBench motion smoothness" in header and "VBench dynamic degree" in header and "Score" not in header
    with pytest.raises(ConfigError, match="video_scorers"):
        load_config(EvalConfig, None, ["video_scorers=[checklist,fvd]"])


# ---------------------------------------------------------------------------- the table of docs/FIDELITY.md

CONFIGS = (GenerateConfig, TrainConfig, EvalConfig, ServeConfig)  # the recipe's classes first
PLACEHOLDERS = ("PATH", "N", "K", "…")  # values the table leaves to the reader


def fidelity_rows() -> list[dict]:
    """docs/FIDELITY.md's main table as {column: cell}."""
    text = (REPO / "docs" / "FIDELITY.md").read_text(encoding="utf-8")
    table = text.split("## The table", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split(" | ")]
    rows = [dict(zip(head, (c.strip() for c in ln.strip().strip("|").split(" | ")))) for ln in lines[2:]]
    assert rows and all(len(r) == len(head) for r in rows), "a row of the table has the wrong number of cells"
    return rows


def settings(cell: str) -> list[str]:
    """The `key=value` / `key` settings in a cell's code spans (CLI flags and file names left out)."""
    import re

    out = []
    for span in re.findall(r"`([^`]+)`", cell):
        for word in span.split():
            key = word.split("=", 1)[0].removesuffix(".*")
            if not word.startswith("-") and re.fullmatch(r"[a-z_]+(\.[a-z_]+)*", key) and ("=" in word or "_" in key):
                out.append(word)
    return out


def default_of(key: str) -> list:
    """The default of a dotted key in every config class that has it ([] if none)."""
    found = []
    for cls in CONFIGS:
        obj = cls()
        try:
            for part in key.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        found.append(obj)
    return found


def test_fidelity_table_names_real_tests():
    import re

    for row in fidelity_rows():
        refs, current = re.findall(r"`((?:test_\w+|…)::test_\w+)`", row["pinned by"]), None
        assert refs, f"{row['element']}: no test pins this row"
        for ref in refs:
            file, name = ref.split("::")
            current = current if file == "…" else file
            source = (REPO / "tests" / f"{current}.py").read_text(encoding="utf-8")
            assert f"def {name}(" in source, f"{row['element']}: {current}::{name} does not exist"


def test_fidelity_table_defaults_are_the_code_defaults():
    import yaml

    checked = 0
    for row in fidelity_rows():
        for word in settings(row["vpo_ray default"]):
            key, _, value = word.partition("=")
            defaults = default_of(key)
            assert defaults, f"{row['element']}: {key} is no config key"
            if value and value not in PLACEHOLDERS:
                expected = yaml.safe_load(value)
                # the first class holding the key with this kind of value: the recipe's (generate,
                # train) before eval's and serve's own (eval decodes greedily, ServeConfig.render is a bool)
                same = [list(d) if isinstance(d, tuple) else d for d in defaults
                        if isinstance(d, (list, tuple)) == isinstance(expected, list)
                        and isinstance(d, bool) == isinstance(expected, bool)]
                assert same and same[0] == expected, f"{row['element']}: {key} defaults to {same[0]!r}"
                checked += 1
    assert checked >= 10


def test_fidelity_table_switches_are_accepted_keys():
    from vpo_ray.pipeline.generate import check_config

    for row in fidelity_rows():
        for word in settings(row["alternative (one key)"]):
            key, _, value = word.partition("=")
            assert default_of(key.removesuffix(".*")), f"{row['element']}: {key} is no config key"
            if not value or value in PLACEHOLDERS:
                continue
            loaded = []
            for cls in (c for c in CONFIGS if key.split(".")[0] in c.__dataclass_fields__):
                try:  # the switch loads and passes the class's own checks (generate's too)
                    cfg = load_config(cls, None, [word])
                    loaded.append(check_config(cfg) if cls is GenerateConfig else cfg)
                except ConfigError:
                    continue  # a key of the same name elsewhere (ServeConfig.render: a bool)
            assert loaded, f"{row['element']}: no config accepts {word}"
