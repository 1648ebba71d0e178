"""Video judging: a VLM answers a yes/no checklist per video (VisionReward style).

Frames are sampled from the mp4 with decord inside the actor (only the URI travels).
Each checklist question (vpo_ray.data.checklist, the query filled in as the user typed
it, as the official VisionReward calls were) is answered by forced choice: the answer is
yes when P(Yes) >= P(No) of the next token, and P(Yes) is kept. The video's score is
`checklist.score`: the sum of the weights of the yes answers (official), or of weight x
P(yes) with `video_score=soft`. The answers feed dominance in the pair rules.

The model calls go through vpo_ray.pipeline.vlm_engine: every video of a batch is encoded
once and its prompt prefix prefilled once; all its questions are answered from that prefix.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from vpo_ray.data.checklist import as_items, score
from vpo_ray.models import random_weights
from vpo_ray.pipeline.guard import RowFailure, StageGuard


class VideoJudge:
    """Ray Data stage over video rows: fills `checklist_json` and `score`."""

    def __init__(self, model: str, checklist: list[dict], num_frames: int = 8, device: Optional[str] = None,
                 video_score: str = "binary", watchdog_s: float = 0.0, strikes_dir: Optional[str] = None):
        import torch

        from vpo_ray.models.registry import load_video_judge, yes_no_token_ids
        from vpo_ray.pipeline.vlm_engine import VideoQAEngine

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_video_judge(model, device=self.device)
        self.model.eval()
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.yes_ids, self.no_ids = yes_no_token_ids(tok)
        self.checklist = as_items(checklist)
        self.weights = {c.id: c.weight for c in self.checklist}
        self.video_score = video_score
        self.num_frames = num_frames
        # weights=random: answers come from the output model (the forward passes still run at full size)
        self.random_outputs = random_weights.outputs_of(self.model)
        self.engine = VideoQAEngine(self.model, self.yes_ids, self.no_ids, self.processor.video_token_id)
        # one batched pass; a failure (out of GPU memory above all) splits it down to the video at fault
        self.guard = StageGuard("video_judge", watchdog_s, strikes_dir)

    def questions(self, frames: np.ndarray, query: str):
        from vpo_ray.pipeline.vlm_engine import build_questions

        return build_questions(self.processor, list(frames), [c.ask(query) for c in self.checklist])

    def answer(self, frames: np.ndarray, query: str) -> list[dict]:
        return self.answer_many([self.questions(frames, query)])[0]

    def answer_many(self, videos: list) -> list[list[dict]]:
        """Checklist answers for several videos (engine.VideoQuestions each) in one batched pass."""
        out = []
        for p_yes in self.engine.p_yes(videos):
            out.append([{"id": c.id, "answer": bool(p >= 0.5), "p_yes": round(float(p), 6)}
                        for c, p in zip(self.checklist, p_yes)])
        return out

    def __call__(self, batch: dict) -> dict:
        from vpo_ray.video_io import read_frames

        n = len(batch["query_id"])
        checklists, scores = [], []
        # Per-video failures go to `video_error`: one bad video does not fail its query.
        video_errors = list(batch["video_error"]) if "video_error" in batch else [""] * n
        answers = self._answer_rows(batch, video_errors, read_frames)
        for i in range(n):
            ans = answers.get(i)
            if ans and self.random_outputs is not None:
                key = [batch[k][i] for k in ("query_id", "sample_idx", "seed") if k in batch]
                ans = random_weights.checklist_answers(self.random_outputs, key, ans)
            checklists.append(json.dumps(ans) if ans else "[]")
            scores.append(score({a["id"]: (a["answer"], a["p_yes"]) for a in ans}, self.weights, self.video_score)
                          if ans else 0.0)
        out = dict(batch)
        out["checklist_json"] = np.array(checklists, dtype=object)
        out["score"] = np.array(scores, dtype=np.float64)
        out["video_error"] = np.array(video_errors, dtype=object)
        return out

    def _answer_rows(self, batch: dict, video_errors: list, read_frames) -> dict:
        """{row: answers} for the rows with a readable video; a bad video gets its own error and
        does not sink the batch (the guard splits a failed batched pass down to the video at fault)."""
        ready = {}
        queries = batch["query"] if "query" in batch else batch["text"]  # as typed, flags included
        for i in range(len(batch["query_id"])):
            if batch["error"][i] or video_errors[i] or not batch["video_uri"][i]:
                continue
            try:
                ready[i] = self.questions(read_frames(str(batch["video_uri"][i]), self.num_frames), str(queries[i]))
            except Exception as e:  # noqa: BLE001
                video_errors[i] = f"video_judge: {type(e).__name__}: {e}"[:500]
        if not ready:
            return {}
        idx = list(ready)
        done = self.guard.run(self.answer_many, [ready[i] for i in idx], rows=[str(batch["query_id"][i]) for i in idx],
                              keys=[str(batch["video_uri"][i]) for i in idx])
        out = {}
        for i, res in zip(idx, done):
            if isinstance(res, RowFailure):
                video_errors[i] = f"video_judge: {res.reason}"[:500]
            else:
                out[i] = res
        return out
