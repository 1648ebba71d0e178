"""Checklist answering for a Qwen2-VL video judge: each video encoded once, its prefix reused.

A checklist asks N yes/no questions about one video. Asked one at a time (the plain path),
each question re-encodes the frames with the vision tower and re-runs the whole prompt
(~800 video tokens) through the language model: N times the work of one. Here:

1. the vision tower runs once per video (a batch of videos in one call);
2. the shared prompt prefix (system turn, the video's tokens, the template text before the
   question) is prefilled once per video, keeping its keys and values;
3. the N question suffixes of every video in the batch run as one batch against their
   video's cached prefix (prefix keys visible to every suffix token, causal within the
   suffix), and P(Yes)/(P(Yes)+P(No)) is read at each suffix's last token.

The language model runs through vpo_ray.pipeline.decoder's layer functions on the HF
model's own weights, with M-RoPE positions computed here (text tokens: one position on all
three axes; video tokens: (t, h, w) grid positions after the text before them; text after a
video continues from the video's start + max(h, w) / merge size), as the HF model does.
Videos go in batches of equal prefix length and patch grid, so nothing is padded.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np


@dataclass(frozen=True)
class VideoQuestions:
    """One video and the questions asked about it, as token ids split at their shared prefix."""
    patches: Any  # (n_patches, C * temporal_patch * patch^2) pixel patches (registry.video_patches)
    grid: tuple  # (t, h, w) patch grid of the video
    prefix: tuple  # token ids shared by every question: chat start, the video's tokens, common template text
    suffixes: tuple  # per question, the rest of its token ids (at least one each)


def split_prefix(full: Sequence[Sequence[int]], video_token_id: int) -> tuple[tuple, tuple]:
    """(shared prefix, per-row suffixes) of token sequences that all contain the same video block."""
    first = list(full[0])
    n = min(len(s) for s in full) - 1  # every suffix keeps at least its last token
    for s in full[1:]:
        n = next((i for i in range(n) if s[i] != first[i]), n)
    last_video = max(i for i, t in enumerate(first) if t == video_token_id)
    if n <= last_video:
        raise ValueError("video_judge: the questions' token ids differ before the end of the video block")
    return tuple(first[:n]), tuple(tuple(s[n:]) for s in full)


def build_questions(processor, frames, questions: Sequence[str], template="default") -> VideoQuestions:
    """VideoQuestions for sampled frames (T x HxWx3 uint8) and question texts, via the registry's chat layout."""
    from vpo_ray.models.registry import video_judge_chat_ids, video_patches

    patches, grid = video_patches(processor, frames)
    full = [video_judge_chat_ids(processor, q, grid, template) for q in questions]
    prefix, suffixes = split_prefix(full, processor.video_token_id)
    return VideoQuestions(patches=patches, grid=tuple(grid), prefix=prefix, suffixes=suffixes)


def mrope_positions(ids: Sequence[int], video_token_id: int, grid: Sequence[int], merge: int):
    """(3, L) M-RoPE positions of one sequence holding at most one video block, and the next text position."""
    import torch

    t, h, w = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
    is_video = [tok == video_token_id for tok in ids]
    n_video = sum(is_video)
    if n_video not in (0, t * h * w):
        raise ValueError(f"video_judge: {n_video} video tokens for a {t}x{h}x{w} grid")
    out = torch.zeros(3, len(ids), dtype=torch.int64)
    cur, i = 0, 0
    while i < len(ids):
        if not is_video[i]:
            out[:, i] = cur
            cur, i = cur + 1, i + 1
            continue
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        out[:, i:i + n_video] = torch.stack([tt, hh, ww]).reshape(3, -1) + cur
        cur, i = cur + max(h, w), i + n_video
    return out, cur


class VideoQAEngine:
    """P(yes) per checklist question for batches of videos, on a Qwen2-VL model's own weights."""

    def __init__(self, model, yes_ids: Sequence[int], no_ids: Sequence[int], video_token_id: int,
                 prefill_tokens: int = 16384):
        from vpo_ray.pipeline.decoder import DecoderWeights

        lm = model.model.language_model
        text_cfg = getattr(model.config, "text_config", model.config)
        self.w = DecoderWeights(model, inner=lm, config=text_cfg)
        self.visual = model.model.visual
        self.merge = int(model.config.vision_config.spatial_merge_size)
        rope = getattr(text_cfg, "rope_parameters", None) or getattr(text_cfg, "rope_scaling", None) or {}
        self.section = list(getattr(lm.rotary_emb, "mrope_section", None) or rope.get("mrope_section") or (16, 24, 24))
        self.inv_freq = lm.rotary_emb.inv_freq.float()
        self.rope_scale = float(getattr(lm.rotary_emb, "attention_scaling", 1.0))
        self.yes_ids, self.no_ids = list(yes_ids), list(no_ids)
        self.video_token_id = int(video_token_id)
        self.prefill_tokens = prefill_tokens
        self.stats: dict = {}

    def p_yes(self, items: Sequence[VideoQuestions], reuse: bool = True) -> list[np.ndarray]:
        """P(yes) per question per video. reuse=False answers every question from scratch
        (vision tower and whole prompt per question: the plain path, for comparison)."""
        import torch

        if not reuse:
            flat = [VideoQuestions(it.patches, it.grid, it.prefix + s[:-1], (s[-1:],)) for it in items for s in it.suffixes]
            answers = iter(self.p_yes(flat, reuse=True))
            return [np.concatenate([next(answers) for _ in it.suffixes]) for it in items]
        out: list = [None] * len(items)
        groups: dict = {}
        for i, it in enumerate(items):
            groups.setdefault((len(it.prefix), tuple(it.grid)), []).append(i)
        with torch.inference_mode():
            for (plen, _), idx in groups.items():
                per_batch = max(1, self.prefill_tokens // max(1, plen))
                for start in range(0, len(idx), per_batch):
                    chunk = idx[start:start + per_batch]
                    for i, p in zip(chunk, self._answer([items[i] for i in chunk])):
                        out[i] = p
        return out

    # ------------------------------------------------------------------ internals

    def _cos_sin(self, pos):
        """M-RoPE cos/sin (B, L, D) from positions (3, B, L): each frequency band takes one axis."""
        import torch

        freqs = pos[..., None].float() * self.inv_freq.to(pos.device)  # (3, B, L, D/2)
        bands = freqs.split(self.section, dim=-1)
        freqs = torch.cat([band[i % 3] for i, band in enumerate(bands)], dim=-1)
        emb = torch.cat([freqs, freqs], dim=-1)
        return ((emb.cos() * self.rope_scale).to(self.w.dtype), (emb.sin() * self.rope_scale).to(self.w.dtype))

    def _vision(self, items: Sequence[VideoQuestions]):
        import torch

        dev = self.w.device
        patches = torch.cat([torch.as_tensor(it.patches) for it in items]).to(dev, self.visual_dtype)
        grid = torch.tensor([list(it.grid) for it in items], dtype=torch.int64, device=dev)
        out = self.visual(patches, grid_thw=grid)
        return getattr(out, "pooler_output", out)  # transformers 5.2x returns an output object

    @property
    def visual_dtype(self):
        return next(self.visual.parameters()).dtype

    def _answer(self, items: Sequence[VideoQuestions]) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        from vpo_ray.pipeline.decoder import attn_in, attn_out_mlp, causal_attention

        w, dev = self.w, self.w.device
        n = len(items)
        ids = torch.tensor([list(it.prefix) for it in items], dtype=torch.int64, device=dev)
        x = F.embedding(ids, w.embed)
        x = x.masked_scatter((ids == self.video_token_id)[..., None], self._vision(items).to(x.dtype))
        pos, next_pos = mrope_positions(items[0].prefix, self.video_token_id, items[0].grid, self.merge)
        cos, sin = self._cos_sin(pos[:, None].to(dev))
        cos, sin = cos.expand(n, -1, -1), sin.expand(n, -1, -1)
        prefix_kv = []
        for lw in w.layers:  # prefix: one causal prefill per video, keys/values kept
            q, k, v = attn_in(x, lw.ln1, lw.eps, lw.wqkv, lw.bqkv, cos, sin, w.n_heads, w.n_kv, w.head_dim)
            prefix_kv.append((k, v))
            o = causal_attention(q, k, v).transpose(1, 2).reshape(n, ids.shape[1], -1)
            x = attn_out_mlp(x, o, lw.wo, lw.bo, lw.ln2, lw.eps, lw.wgu, lw.bgu, lw.wd, lw.bd)
        owner = [v for v, it in enumerate(items) for _ in it.suffixes]
        p = self._suffixes([s for it in items for s in it.suffixes], owner, prefix_kv, next_pos)
        self.stats["prefix_tokens"] = self.stats.get("prefix_tokens", 0) + ids.numel()
        counts = np.cumsum([0] + [len(it.suffixes) for it in items])
        return [p[a:b] for a, b in zip(counts[:-1], counts[1:])]

    def _suffixes(self, suffixes: list, owner: list, prefix_kv: list, next_pos: int) -> np.ndarray:
        """Every question's suffix against its own video's cached prefix; P(yes) at each last token."""
        import torch
        import torch.nn.functional as F

        from vpo_ray.pipeline.decoder import _logits, attn_in, attn_out_mlp

        w, dev = self.w, self.w.device
        r, width = len(suffixes), max(len(s) for s in suffixes)
        ids = torch.tensor([list(s) + [s[-1]] * (width - len(s)) for s in suffixes], dtype=torch.int64, device=dev)
        lengths = torch.tensor([len(s) for s in suffixes], device=dev)
        rows = torch.tensor(owner, dtype=torch.int64, device=dev)
        plen = prefix_kv[0][0].shape[2]
        pos = (torch.arange(width, device=dev) + next_pos)[None, None].expand(3, r, width)
        cos, sin = self._cos_sin(pos)
        col = torch.arange(plen + width, device=dev)
        mask = (col[None, :] < plen) | (col[None, :] - plen <= torch.arange(width, device=dev)[:, None])
        x = F.embedding(ids, w.embed)
        rep = w.n_heads // w.n_kv
        for lw, (pk, pv) in zip(w.layers, prefix_kv):
            q, k, v = attn_in(x, lw.ln1, lw.eps, lw.wqkv, lw.bqkv, cos, sin, w.n_heads, w.n_kv, w.head_dim)
            k = torch.cat([pk.index_select(0, rows), k], dim=2).repeat_interleave(rep, 1)
            v = torch.cat([pv.index_select(0, rows), v], dim=2).repeat_interleave(rep, 1)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None])
            x = attn_out_mlp(x, o.transpose(1, 2).reshape(r, width, -1), lw.wo, lw.bo, lw.ln2, lw.eps,
                             lw.wgu, lw.bgu, lw.wd, lw.bd)
        logits = _logits(x[torch.arange(r, device=dev), lengths - 1], w.norm_w, w.norm_eps, w.lm_w, w.lm_b)
        probs = logits.softmax(-1)
        p_yes, p_no = probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)
        self.stats["suffix_tokens"] = self.stats.get("suffix_tokens", 0) + int(lengths.sum())
        return (p_yes / (p_yes + p_no).clamp_min(1e-12)).cpu().numpy()
