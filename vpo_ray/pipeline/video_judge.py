"""Video judging: a VLM answers a yes/no checklist per video (VisionReward style).

Frames are sampled from the mp4 with decord inside the actor (only the URI travels).
Each checklist question is answered by forced choice: P(Yes) vs P(No) of the next
token. The video's score is the weighted sum of P(Yes) over the checklist; the
boolean answers feed Pareto dominance in the pair rules.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from vpo_ray.config import ChecklistItem
from vpo_ray.models import random_weights


def weighted_score(p_yes: list[float], weights: list[float]) -> float:
    return float(sum(p * w for p, w in zip(p_yes, weights)))


class VideoJudge:
    """Ray Data stage over video rows: fills `checklist_json` and `score`."""

    def __init__(self, model: str, checklist: list[dict], num_frames: int = 8, device: Optional[str] = None):
        import torch
        from vpo_ray.models.registry import load_video_judge, yes_no_token_ids

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.processor = load_video_judge(model, device=self.device)
        self.model.eval()
        tok = getattr(self.processor, "tokenizer", self.processor)
        self.yes_ids, self.no_ids = yes_no_token_ids(tok)
        self.checklist = [ChecklistItem(**c) for c in checklist]
        self.num_frames = num_frames
        # weights=random: answers come from the output model (the forward passes still run at full size)
        self.random_outputs = random_weights.outputs_of(self.model)

    def answer(self, frames: np.ndarray, query: str) -> list[dict]:
        from vpo_ray.models.registry import video_judge_inputs

        torch = self.torch
        answers = []
        for item in self.checklist:
            inputs = video_judge_inputs(self.processor, list(frames), item.question.format(query=query))
            inputs = {k: v.to(self.device) if hasattr(v, "to") else v for k, v in inputs.items()}
            with torch.inference_mode():
                logits = self.model(**inputs).logits[:, -1, :].float()
            probs = logits.softmax(-1)[0]
            py, pn = float(probs[self.yes_ids].sum()), float(probs[self.no_ids].sum())
            p = py / max(py + pn, 1e-12)
            answers.append({"id": item.id, "answer": p >= 0.5, "p_yes": round(p, 6)})
        return answers

    def __call__(self, batch: dict) -> dict:
        from vpo_ray.video_io import read_frames

        n = len(batch["query_id"])
        checklists, scores = [], []
        # Per-video failures go to `video_error`: one bad video does not fail its query.
        video_errors = list(batch["video_error"]) if "video_error" in batch else [""] * n
        weights = [c.weight for c in self.checklist]
        for i in range(n):
            if batch["error"][i] or video_errors[i] or not batch["video_uri"][i]:
                checklists.append("[]")
                scores.append(0.0)
                continue
            try:
                frames = read_frames(str(batch["video_uri"][i]), self.num_frames)
                ans = self.answer(frames, str(batch["text"][i]))
                if self.random_outputs is not None:
                    key = [batch[k][i] for k in ("query_id", "sample_idx", "seed") if k in batch]
                    ans = random_weights.checklist_answers(self.random_outputs, key, ans)
                checklists.append(json.dumps(ans))
                scores.append(weighted_score([a["p_yes"] for a in ans], weights))
            except Exception as e:  # one bad video must not sink the batch
                checklists.append("[]")
                scores.append(0.0)
                video_errors[i] = f"video_judge: {type(e).__name__}: {e}"[:500]
        out = dict(batch)
        out["checklist_json"] = np.array(checklists, dtype=object)
        out["score"] = np.array(scores, dtype=np.float64)
        out["video_error"] = np.array(video_errors, dtype=object)
        return out
