"""`vpo generate` end to end on the tiny preset: accounting, outputs, resume, killed actors."""
import json
import os
import signal
import threading
import time

import pytest

from vpo_ray.config import GenerateConfig, load_config_with_defaults
from vpo_ray.models.registry import preset_job_defaults
from vpo_ray.pipeline.generate import run_generate

QUERIES = [
    "a cat playing piano in a jazz bar -ar 16:9",
    "A cat playing piano in a jazz bar  -ar 16:9",  # exact duplicate after normalisation
    "drone shot of waves crashing on black sand beach -camera pan left -motion 3",
    "prompt: a samurai walking through neon Tokyo rain -neg blur, text -seed 42",
    "",  # empty -> ingest error
    "an astronaut riding a horse on mars, cinematic",
    "timelapse of a flower blooming, macro lens --ar 9:16",
    "一只熊猫在竹林里吃竹子",
    "a man stabbing another man with a knife, lots of blood",
    "children building a sandcastle at sunset",
]

FAST = ["sampling.max_new_tokens=12", "judge_sampling.max_new_tokens=8", "rewrite_stage.batch_size=4",
        "judge_stage.batch_size=4", "video.num_frames=9", "video.height=32", "video.width=32",
        "video.num_inference_steps=2", "video.judge_frames=2", "video_judge_stage.batch_size=2"]


@pytest.fixture(scope="module")
def queries_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("q") / "queries.json"
    p.write_text(json.dumps(QUERIES, ensure_ascii=False))
    return str(p)


def cfg_for(kind, queries, out, *extra):
    """As `vpo generate --preset tiny` builds it: the tiny preset's job defaults under the overrides."""
    return load_config_with_defaults(GenerateConfig, None, [f"kind={kind}", f"queries={queries}", f"out={out}",
                                                            "preset=tiny", "num_samples=2", *FAST, *extra],
                                     preset_job_defaults("tiny"))


def ids_everywhere(out, kind):
    import pyarrow.parquet as pq

    outputs = pq.read_table(os.path.join(out, f"{kind}.parquet")).column("query_id").to_pylist()
    errors = [json.loads(l)["query_id"] for l in open(os.path.join(out, "errors.jsonl"))]
    dups = [json.loads(l)["query_id"] for l in open(os.path.join(out, "duplicates.jsonl"))]
    return outputs, errors, dups


def check_accounting(summary, out, kind):
    outputs, errors, dups = ids_everywhere(out, kind)
    assert summary["input_queries"] == len(QUERIES)
    assert summary["duplicates"] == len(dups) >= 1
    assert summary["errors"] == len(errors) >= 1
    assert summary["output_queries"] + summary["duplicates"] + summary["errors"] == summary["input_queries"]
    assert summary["accounted"] is True
    assert len(set(outputs)) == len(outputs), "one output row per query by default"
    assert not set(outputs) & set(errors), "a query is either output or error"
    for v in (summary["input_queries"], summary["output_rows"], summary["duplicates"], summary["errors"]):
        assert isinstance(v, int)


@pytest.fixture(scope="module")
def sft_run(ray_session, queries_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft"))
    return out, run_generate(cfg_for("sft", queries_file, out))


def test_sft_set_is_built_and_every_id_accounted(sft_run):
    out, summary = sft_run
    check_accounting(summary, out, "sft")
    assert summary["output_rows"] > 0
    st = summary["stages"]
    assert st["rewrite"]["candidates_out"] == 2 * st["ingest"]["rows_out"]
    assert st["critique"]["judged"] > 0 and 0 <= st["critique"]["passed"] <= st["critique"]["judged"]
    errs = [json.loads(l) for l in open(os.path.join(out, "errors.jsonl"))]
    assert any(e["stage"] == "ingest" and "empty" in e["reason"] for e in errs)
    assert all({"query_id", "stage", "reason"} <= set(e) for e in errs)


def test_sft_set_loads_with_datasets_in_chat_format(sft_run):
    from datasets import load_dataset

    out, summary = sft_run
    ds = load_dataset("parquet", data_files=os.path.join(out, "sft.parquet"), split="train")
    assert len(ds) == summary["output_rows"]
    roles = [m["role"] for m in ds[0]["messages"]]
    assert roles == ["user", "assistant"] and ds[0]["messages"][1]["content"]  # official: no system turn
    # the optimizer saw each query as typed, flags included
    cat = next(r for r in ds if "cat playing piano" in r["messages"][0]["content"])
    assert cat["messages"][0]["content"].endswith("User Query:a cat playing piano in a jazz bar -ar 16:9\n\nVideo Prompt:")
    # the tiny preset keeps generations cut at its short limit, and says so
    assert summary["truncated"]["policy"] == "keep" and all(ds["truncated"])


def test_output_folder_loads_with_datasets_by_its_card(sft_run):
    """`load_dataset(out)` on the folder itself: the card's configs pick the set among the JSON files."""
    from datasets import load_dataset

    out, summary = sft_run
    ds = load_dataset(out, split="train")
    assert len(ds) == summary["output_rows"] and set(ds.column_names) == {"query_id", "messages"}
    assert ds[0]["messages"][1]["role"] == "user"


def test_output_files_are_readable_by_group_and_others(sft_run):
    out, _ = sft_run
    paths = [os.path.join(root, name) for root, dirs, files in os.walk(out) for name in files + dirs]
    assert any(p.endswith("sft.parquet") for p in paths) and any(p.endswith("README.md") for p in paths)
    unreadable = [p for p in paths if os.stat(p).st_mode & 0o044 != 0o044]
    assert not unreadable, f"not group/world-readable: {unreadable[:5]}"


def test_rerun_does_no_new_work(sft_run, queries_file):
    out, first = sft_run
    again = run_generate(cfg_for("sft", queries_file, out))
    assert again["processed_this_run"] == 0
    assert again["resumed_from_earlier_runs"] == first["output_queries"] + first["errors"] - first["stages"]["ingest"]["errors"]
    for k in ("output_rows", "errors", "duplicates"):
        assert again[k] == first[k]


def test_dpo_set_with_videos(ray_session, queries_file, tmp_path):
    from datasets import load_dataset

    from vpo_ray.data.checklist import load_checklist
    from vpo_ray.video_io import video_info

    out = str(tmp_path)
    # Two seeds per sample and a margin of 0 so video pairs can form on random models.
    summary = run_generate(cfg_for("dpo", queries_file, out, "video.seeds_per_prompt=2", "pair_margin=0.0"))
    check_accounting(summary, out, "dpo")
    videos = [json.loads(l) for l in open(os.path.join(out, "videos.jsonl"))]
    ok = [v for v in videos if v["video_uri"] and not v["error"]]
    assert ok and summary["stages"]["render"]["videos"] == len(ok)
    weights = load_checklist("vpo_ray").weights()
    for v in ok[:3]:
        assert video_info(v["video_uri"])["frames"] == 9
        assert len(v["checklist"]) == 8  # binary: the score is the weight sum of the yes answers
        assert v["score"] == pytest.approx(sum(weights[a["id"]] for a in v["checklist"] if a["answer"]))
    # render=all: every sample with a prompt is rendered, judged or not passing
    cands = [c for r in map(json.loads, open(os.path.join(out, "candidates.jsonl"))) for c in r["candidates"]]
    assert len(ok) == 2 * sum(1 for c in cands if c["prompt"] and not c["error"])
    ds = load_dataset("parquet", data_files=os.path.join(out, "dpo.parquet"), split="train")
    assert len(ds) == summary["output_rows"]
    for row in ds:
        assert row["chosen"][0]["content"] != row["rejected"][0]["content"]
        assert row["source"] in ("text", "video")
    sources = list(ds["source"])
    assert sources == sorted(sources, key=lambda s: s != "text"), "text pairs come first"


def test_killed_judge_actor_loses_no_rows(ray_session, find_actor_pids, queries_file, tmp_path):
    """kill -9 the critique actor mid-run: Ray restarts it, the stage retries, and the
    output equals an undisturbed run (sampling is seeded per row)."""
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    reference = run_generate(cfg_for("sft", queries_file, ref_out, "judge_stage.batch_size=1"))
    killed = []

    def killer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for pid in find_actor_pids("MapBatches(Critic)"):
                time.sleep(0.5)  # let it take a batch first
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.2)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    summary = run_generate(cfg_for("sft", queries_file, out, "judge_stage.batch_size=1"))
    t.join()
    assert killed, "the critique actor was never seen alive"
    check_accounting(summary, out, "sft")
    import pyarrow.parquet as pq

    def rows(d):
        t = pq.read_table(os.path.join(d, "sft.parquet")).to_pylist()
        return sorted((r["query_id"], r["messages"][-1]["content"]) for r in t)

    assert rows(out) == rows(ref_out)
    assert summary["errors"] == reference["errors"]
