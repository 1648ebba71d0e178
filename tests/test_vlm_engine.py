"""The video judge's engine: each video encoded once and its prompt prefix reused across its
checklist questions gives the P(yes) that asking each question alone (the plain HF forward) gives."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vpo_ray.models import registry
from vpo_ray.pipeline.vlm_engine import VideoQAEngine, build_questions, mrope_positions, split_prefix

QUESTIONS = ["Does the video show a cat?", "Is the motion smooth?",
             "Does the video show the main subject described in: a red fox running through snow?"]


@pytest.fixture(scope="module")
def judge(tiny_cache):
    model, processor = registry.load_video_judge("tiny-video-judge")
    return model, processor, registry.yes_no_token_ids(processor.tokenizer)


def _videos():
    rng = np.random.default_rng(0)
    shapes = [(4, 64, 80), (4, 96, 96), (4, 64, 80)]  # two patch grids: two prefill groups
    return [rng.integers(0, 255, (*s, 3), dtype=np.uint8) for s in shapes]


def test_prefix_reuse_gives_each_question_alone_p_yes(judge):
    """Tolerance 1e-6 (fp32). On this model a one-position shift of the questions moves P(yes)
    by ~6e-5 and flat 1-D positions by ~9e-5, so wrong M-RoPE positions or a wrong prefix would show."""
    model, processor, (yes, no) = judge
    videos = _videos()

    def asked_alone(frames, question):  # the plain path: the whole prompt and the video, one question
        with torch.inference_mode():
            logits = model(**registry.video_judge_inputs(processor, list(frames), question)).logits
        p_yes, p_no = registry.yes_no_probs(logits, yes, no)
        return float(p_yes / (p_yes + p_no))

    alone = [[asked_alone(f, q) for q in QUESTIONS] for f in videos]
    engine = VideoQAEngine(model, yes, no, processor.video_token_id)
    items = [build_questions(processor, list(f), QUESTIONS) for f in videos]
    assert all(len(s) < len(it.prefix) for it in items for s in it.suffixes)  # most of each prompt is shared
    reused = engine.p_yes(items)
    assert np.abs(np.array(reused) - np.array(alone)).max() < 1e-6
    assert engine.stats["prefix_tokens"] == sum(len(it.prefix) for it in items)  # one prefill per video
    assert np.abs(np.array(engine.p_yes(items, reuse=False)) - np.array(alone)).max() < 1e-6


def test_video_judge_answers_the_checklist_with_one_entry_per_question(judge, tiny_cache):
    from vpo_ray.data.checklist import load_checklist
    from vpo_ray.pipeline.video_judge import VideoJudge

    checklist = load_checklist("vpo_ray")
    vj = VideoJudge("tiny-video-judge", checklist.as_dicts()[:4])
    videos = _videos()
    one = vj.answer(videos[0], "a red fox")
    many = vj.answer_many([vj.questions(f, "a red fox") for f in videos])
    assert [a["id"] for a in one] == [c.id for c in checklist.items[:4]]
    assert all(0 <= a["p_yes"] <= 1 and a["answer"] == (a["p_yes"] >= 0.5) for a in one)
    assert many[0] == one


def test_split_prefix_keeps_the_video_in_the_prefix_and_a_token_per_suffix():
    vid = 9
    prefix, suffixes = split_prefix([[1, vid, vid, 2, 5, 6], [1, vid, vid, 2, 5, 7, 8]], vid)
    assert prefix == (1, vid, vid, 2, 5) and suffixes == ((6,), (7, 8))
    prefix, suffixes = split_prefix([[1, vid, 2, 3]], vid)  # one question: its last token is the suffix
    assert prefix == (1, vid, 2) and suffixes == ((3,),)
    with pytest.raises(ValueError, match="before the end of the video block"):
        split_prefix([[1, vid, vid, 2], [3, vid, vid, 2]], vid)


def test_mrope_positions_follow_the_grid_then_continue_after_it():
    pos, nxt = mrope_positions([7, 7, 9, 9, 8, 8], 9, (1, 2, 4), merge=2)  # a 1 x 1 x 2 merged grid
    assert pos[:, :2].tolist() == [[0, 1]] * 3
    assert pos[:, 2:4].tolist() == [[2, 2], [2, 2], [2, 3]]  # (t, h, w) offsets after the text before
    assert pos[:, 4:6].tolist() == [[4, 5]] * 3 and nxt == 6  # text resumes at start + max(h, w)
