"""A static-cache decoder over a Hugging Face Llama / Qwen2 / Mistral model's own weights.

The LLM engine (vpo_ray.pipeline.llm_engine) decodes many rows at once. HF `generate`
spends most of a step in Python at these batch sizes and cannot be captured as one CUDA
graph with per-row sampling, so this module runs the same layers as plain tensor code:

- weights are the HF model's own tensors (q/k/v and gate/up fused into one matrix each;
  the HF modules keep working on views of the fused tensors, so no memory is doubled);
- the KV cache is static: `slots` rows x `max_len` positions per layer; each row owns a
  slot and writes its keys at its own positions, so finished rows can be replaced by new
  ones mid-run (continuous batching) without moving anyone's cache;
- one decode step (embed -> layers -> logits -> per-row seeded sampling -> bookkeeping)
  touches only static buffers, so it can be captured once per KV-length bucket as a CUDA
  graph and replayed `sync_every` times between host checks;
- decode attention groups the query heads of each KV head (GQA) as a short query block,
  so K/V are read once per KV head and never repeated in memory.

The math follows the HF modules exactly (RMSNorm in float32, rotary tables from the
model's own rotary module, SiLU-gated MLP); tests compare logits with the HF forward.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vpo_ray.sampling import sample_rows, sample_rows_top_k

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")


def unsupported_reason(model) -> Optional[str]:
    """Why the static decoder cannot run `model` (None when it can): the engine falls back to HF generate."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        return f"model_type {mtype!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} (only silu)"
    if "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        return "sliding-window attention layers"
    if mtype == "mistral" and getattr(cfg, "sliding_window", None):
        return "Mistral sliding window"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "rotary_emb"):
        return "no model.layers / model.rotary_emb"
    return None


# ---------------------------------------------------------------------------- layer math

def rms_norm(x, weight, eps: float):
    """HF Llama/Qwen2 RMSNorm: statistics in float32, scale in the input dtype."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def attn_in(x, ln_w, eps: float, wqkv, bqkv, cos, sin, n_heads: int, n_kv: int, head_dim: int):
    """Norm, fused QKV projection and rotary: x (B, T, hidden) -> q (B, H, T, D), k, v (B, KV, T, D)."""
    b, t = x.shape[0], x.shape[1]
    qkv = F.linear(rms_norm(x, ln_w, eps), wqkv, bqkv)
    q, k, v = qkv.split([n_heads * head_dim, n_kv * head_dim, n_kv * head_dim], dim=-1)
    q = q.reshape(b, t, n_heads, head_dim).transpose(1, 2)
    k = k.reshape(b, t, n_kv, head_dim).transpose(1, 2)
    v = v.reshape(b, t, n_kv, head_dim).transpose(1, 2)
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, D): one table for every head
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def attn_out_mlp(x, attn, wo, bo, ln_w, eps: float, wgu, bgu, wd, bd):
    """Output projection + residual, then norm, SiLU-gated MLP + residual."""
    x = x + F.linear(attn, wo, bo)
    gate, up = F.linear(rms_norm(x, ln_w, eps), wgu, bgu).chunk(2, dim=-1)
    return x + F.linear(F.silu(gate) * up, wd, bd)


def causal_attention(q, k, v):
    """Prefill attention over right-padded rows (padding only ever follows real tokens).

    K/V heads are repeated for GQA rather than passing enable_gqa: with plain causal
    inputs every CUDA back-end (FlashAttention first) qualifies, and the copy is small
    next to a prefill's matmuls."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def cached_attention(q, k, v, mask):
    """A prompt piece's queries against its rows' cached keys (earlier pieces + this one), `mask` (n, 1, c, kv)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def decode_attention(q, k_cache, v_cache, pos, kv_len: int):
    """One new token per row against its cached keys 0..pos: q (S, H, 1, D) -> (S, 1, H*D).

    The query heads sharing a KV head form a short query block of that head (GQA without
    repeating K/V); the mask keeps each row to its own positions.
    """
    s, h, _, d = q.shape
    kv = k_cache.shape[1]
    qg = q.reshape(s, kv, h // kv, d)
    mask = (torch.arange(kv_len, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(qg, k_cache[:, :, :kv_len], v_cache[:, :, :kv_len], attn_mask=mask)
    return out.reshape(s, 1, h * d)


# ---------------------------------------------------------------------------- weights

@dataclass
class LayerWeights:
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    wqkv: torch.Tensor
    bqkv: Optional[torch.Tensor]
    wo: torch.Tensor
    bo: Optional[torch.Tensor]
    wgu: torch.Tensor
    bgu: Optional[torch.Tensor]
    wd: torch.Tensor
    bd: Optional[torch.Tensor]


def _fuse(linears) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One weight (and bias) for several nn.Linear of one input; the modules become views of it."""
    weight = torch.cat([m.weight.detach() for m in linears], dim=0)
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features)
                          for m in linears])
    start = 0
    for m in linears:
        stop = start + m.out_features
        m.weight.data = weight[start:stop]
        if m.bias is not None:
            m.bias.data = bias[start:stop]
        start = stop
    return weight, bias


def _param(t) -> Optional[torch.Tensor]:
    return None if t is None else t.detach()


class DecoderWeights:
    """The tensors of an HF causal LM that the static decoder reads (fused where it pays)."""

    def __init__(self, model, inner=None, config=None):
        """`model`: an HF causal LM. For a VLM's language part pass `inner` (its text model:
        embed_tokens, layers, norm, rotary_emb) and `config` (its text config); `model.lm_head` is the head."""
        if inner is None:
            reason = unsupported_reason(model)
            if reason:
                raise ValueError(f"static decoder: {reason}")
        inner = inner if inner is not None else model.model
        cfg = config if config is not None else model.config
        self.model, self.inner = model, inner
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.vocab = cfg.vocab_size
        self.embed = inner.embed_tokens.weight.detach()
        self.norm_w, self.norm_eps = inner.norm.weight.detach(), float(inner.norm.variance_epsilon)
        self.lm_w, self.lm_b = model.lm_head.weight.detach(), _param(model.lm_head.bias)
        self.layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            wqkv, bqkv = _fuse([at.q_proj, at.k_proj, at.v_proj])
            wgu, bgu = _fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append(LayerWeights(
                ln1=layer.input_layernorm.weight.detach(), ln2=layer.post_attention_layernorm.weight.detach(),
                eps=float(layer.input_layernorm.variance_epsilon), wqkv=wqkv, bqkv=bqkv,
                wo=at.o_proj.weight.detach(), bo=_param(at.o_proj.bias), wgu=wgu, bgu=bgu,
                wd=mlp.down_proj.weight.detach(), bd=_param(mlp.down_proj.bias)))
        self.dtype = self.embed.dtype
        self.device = self.embed.device
        self._rope_len = 0
        self.cos = self.sin = None

    def rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin (length, D) from the model's own rotary module (covers rope scaling variants)."""
        if length > self._rope_len:
            pos = torch.arange(length, device=self.device)[None]
            probe = torch.empty(1, 1, self.hidden, dtype=self.dtype, device=self.device)
            cos, sin = self.inner.rotary_emb(probe, pos)
            self.cos, self.sin, self._rope_len = cos[0].contiguous(), sin[0].contiguous(), length
        return self.cos, self.sin

    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.n_kv * self.head_dim * self.embed.element_size()

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads (every matrix once; the embedding table only per row)."""
        n = sum(t.numel() for lw in self.layers for t in (lw.ln1, lw.ln2, lw.wqkv, lw.wo, lw.wgu, lw.wd))
        n += self.lm_w.numel() + self.norm_w.numel()
        return n * self.embed.element_size()

    def last_logits(self, ids, lengths, cache: Optional["SlotCache"] = None, slots=None):
        """Prefill of right-padded rows: ids (n, T), lengths (n,) -> logits (n, V) at each row's last token.

        With `cache` and `slots`, the rows' keys/values are written to those slots (positions 0..T-1).
        """
        n, t = ids.shape
        cos, sin = self.rope_tables(t)
        cos, sin = cos[:t][None].expand(n, t, -1), sin[:t][None].expand(n, t, -1)
        x = F.embedding(ids, self.embed)
        for i, lw in enumerate(self.layers):
            q, k, v = attn_in(x, lw.ln1, lw.eps, lw.wqkv, lw.bqkv, cos, sin, self.n_heads, self.n_kv, self.head_dim)
            if cache is not None:
                cache.k[i][slots, :, :t] = k
                cache.v[i][slots, :, :t] = v
            o = causal_attention(q, k, v).transpose(1, 2).reshape(n, t, -1)
            x = attn_out_mlp(x, o, lw.wo, lw.bo, lw.ln2, lw.eps, lw.wgu, lw.bgu, lw.wd, lw.bd)
        last = x[torch.arange(n, device=x.device), lengths - 1]
        return _logits(last, self.norm_w, self.norm_eps, self.lm_w, self.lm_b)

    def piece_logits(self, ids, starts, ends, cache: "SlotCache", slots):
        """Prefill the next piece of prompts already cached up to `starts` (chunked prefill):
        ids (n, c) right-padded go to positions starts.. of their slots; logits (n, V) at each
        row's last piece token (position ends - 1). A row's padding lands past its piece, where
        nothing reads it before the row's own later tokens overwrite it."""
        n, c = ids.shape
        max_len = cache.k[0].shape[2]
        pos = (starts[:, None] + torch.arange(c, device=ids.device)).clamp_(max=max_len - 1)
        kv_len = min(max_len, int(starts.max()) + c)
        cos, sin = self.rope_tables(max_len)
        cos, sin = cos[pos], sin[pos]
        mask = (torch.arange(kv_len, device=ids.device)[None, None, :] <= pos[:, :, None])[:, None]
        x = F.embedding(ids, self.embed)
        for i, lw in enumerate(self.layers):
            q, k, v = attn_in(x, lw.ln1, lw.eps, lw.wqkv, lw.bqkv, cos, sin, self.n_heads, self.n_kv, self.head_dim)
            cache.k[i][slots[:, None], :, pos] = k.transpose(1, 2)
            cache.v[i][slots[:, None], :, pos] = v.transpose(1, 2)
            o = cached_attention(q, cache.k[i][slots, :, :kv_len], cache.v[i][slots, :, :kv_len], mask)
            x = attn_out_mlp(x, o.transpose(1, 2).reshape(n, c, -1), lw.wo, lw.bo, lw.ln2, lw.eps,
                             lw.wgu, lw.bgu, lw.wd, lw.bd)
        last = x[torch.arange(n, device=x.device), ends - starts - 1]
        return _logits(last, self.norm_w, self.norm_eps, self.lm_w, self.lm_b)


def _logits(h, norm_w, eps: float, lm_w, lm_b):
    return F.linear(rms_norm(h, norm_w, eps), lm_w, lm_b).float()


@dataclass(frozen=True)
class StepFns:
    """The pure functions of a decode step: eager, or each wrapped by torch.compile."""
    attn_in: object
    attn_out_mlp: object
    logits: object
    sample: object
    sample_top_k: object


EAGER = StepFns(attn_in=attn_in, attn_out_mlp=attn_out_mlp, logits=_logits, sample=sample_rows,
                sample_top_k=sample_rows_top_k)


@functools.lru_cache(maxsize=1)
def compiled_fns() -> StepFns:
    """torch.compile'd step pieces: norms, rotary, SiLU-gate and the sampler's elementwise work
    fuse into few kernels. Shapes are fixed per slot batch, and one compiled graph serves every
    layer (weights are arguments), so compiling costs seconds, not one graph per layer. One set
    of wrappers per process: a new slot batch of the same size reuses what was compiled."""
    def c(fn):
        return torch.compile(fn, dynamic=False, fullgraph=True)
    return StepFns(attn_in=c(attn_in), attn_out_mlp=c(attn_out_mlp), logits=c(_logits), sample=c(sample_rows),
                   sample_top_k=c(sample_rows_top_k))


@dataclass
class SlotCache:
    """Per-layer K and V of `slots` rows x `max_len` positions."""
    k: list
    v: list

    @classmethod
    def allocate(cls, w: DecoderWeights, slots: int, max_len: int) -> "SlotCache":
        shape = (slots, w.n_kv, max_len, w.head_dim)
        return cls(k=[torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in w.layers],
                   v=[torch.zeros(shape, dtype=w.dtype, device=w.device) for _ in w.layers])


# ---------------------------------------------------------------------------- decode state

@dataclass
class _Graph:
    graph: object  # torch.cuda.CUDAGraph
    logits: Optional[torch.Tensor]  # None: the graph samples too; else its logits, sampled eagerly


class DecodeBatch:
    """Decode state of `slots` rows in static buffers, and the step that advances every live row.

    Per slot: the last token, its position, tokens generated so far (the sampler's counter),
    the row's token limit, seed, temperature, top-p, and whether it is still live. A step
    feeds each slot's last token, samples the next one and updates the buffers in place;
    rows that hit EOS or their limit turn inactive by themselves, so `run` can repeat the
    step (or replay its CUDA graph) `n` times without asking the host.

    With `top_k`, the step samples through the top-k pre-filter and sorts the whole vocabulary
    only for rows it leaves undecided, at most `fallback_rows` of them (a fixed shape, so the
    step stays one graph per (KV bucket, fallback_rows)); further undecided rows wait a step,
    which recomputes the same logits for them. Each host check raises `fallback_rows` to the next
    power of two at or above twice the most undecided rows seen in one step since the last check
    (and lowers it to that once it is 4x too large).
    """

    def __init__(self, w: DecoderWeights, slots: int, max_len: int, max_new: int, eos_ids: list[int],
                 cuda_graphs: bool = True, compile: bool = False, top_k: int = 0):
        self.w, self.slots, self.max_len, self.max_new = w, slots, max_len, max_new
        self.pinned = False  # kept for calls that need fewer slots (LLMEngine.prepare)
        dev = w.device
        self.cache = SlotCache.allocate(w, slots, max_len)

        def zeros(dtype):
            return torch.zeros(slots, dtype=dtype, device=dev)

        self.tokens, self.pos, self.steps, self.limit, self.seeds = (zeros(torch.int64) for _ in range(5))
        self.temps, self.top_ps, self.active = zeros(torch.float32), zeros(torch.float32), zeros(torch.bool)
        self.no_eos = zeros(torch.bool)  # rows that may not end by EOS (forced lengths)
        self.out = torch.zeros(slots, max_new, dtype=torch.int64, device=dev)
        self.eos = torch.tensor(list(eos_ids) or [-1], dtype=torch.int64, device=dev)  # [-1]: the model has none
        self.has_eos = bool(eos_ids)  # known on the host: nothing in the step may read the device
        self.rows = torch.arange(slots, device=dev)
        self.kv_reads = torch.zeros((), dtype=torch.int64, device=dev)  # live K/V positions read, summed over steps
        self.top_k = top_k if 0 < top_k < w.vocab else 0  # k >= vocabulary: the full sort is no slower
        self.fallback_rows = slots  # rows the step may fully sort (adapted at host checks)
        self.fallback_peak = torch.zeros((), dtype=torch.int64, device=dev)  # most undecided rows in one step
        self.full_sorted = torch.zeros((), dtype=torch.int64, device=dev)  # tokens drawn by the full sort
        self.waited = torch.zeros((), dtype=torch.int64, device=dev)  # row-steps that waited for a full sort
        self.steps_run = 0
        self.fns = compiled_fns() if compile else EAGER
        self.use_graphs = bool(cuda_graphs) and dev.type == "cuda" and torch.cuda.is_available()
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.cos, self.sin = w.rope_tables(max_len)

    # -- host-side entry points

    def admit(self, slots: list[int], ids, lengths, seeds, temps, top_ps, limits, no_eos=None) -> None:
        """Prefill new rows (right-padded `ids`) into free `slots` and sample each one's first token."""
        s = torch.tensor(slots, dtype=torch.int64, device=self.w.device)
        self.start_rows(s, self.w.last_logits(ids, lengths, self.cache, s), lengths, seeds, temps, top_ps, limits,
                        no_eos)

    def hold(self, slots: list[int]) -> None:
        """Slots whose prompts are being cached piece by piece. The step writes K/V at every slot's
        position, live or not: point theirs at the last cache position, which nothing reads before
        the row's own decode writes it, so the pieces cached so far stay intact."""
        self.pos[torch.tensor(slots, dtype=torch.int64, device=self.w.device)] = self.max_len - 1

    def prefill_piece(self, slots: list[int], ids, starts, ends):
        """Cache the next piece of prompts (chunked prefill; see DecoderWeights.piece_logits); logits at its end."""
        s = torch.tensor(slots, dtype=torch.int64, device=self.w.device)
        return self.w.piece_logits(ids, starts, ends, self.cache, s)

    def start_rows(self, s, logits, lengths, seeds, temps, top_ps, limits, no_eos=None) -> None:
        """Rows whose whole prompt is cached in slots `s`: sample each one's first token from `logits` and go live."""
        no_eos = torch.zeros(len(s), dtype=torch.bool, device=s.device) if no_eos is None else no_eos
        logits = self._ban_eos(logits, no_eos)
        first = sample_rows(logits, temps, top_ps, seeds, torch.zeros_like(seeds))
        self.seeds[s], self.temps[s], self.top_ps[s], self.limit[s] = seeds, temps, top_ps, limits
        self.no_eos[s] = no_eos
        self.out[s, 0] = first
        self.tokens[s], self.pos[s] = first, lengths
        self.steps[s] = 1
        self.active[s] = ~(self._is_eos(first) | (limits <= 1))

    def run(self, kv_len: int, n: int) -> None:
        """`n` decode steps with attention over cache positions [0, kv_len)."""
        self.steps_run += n
        entry = self._graph(kv_len) if self.use_graphs else None
        if entry is None or entry.graph is None:
            for _ in range(n):
                self._advance(self._forward(kv_len))
            return
        for _ in range(n):
            entry.graph.replay()
            if entry.logits is not None:
                self._advance(entry.logits)

    def snapshot(self) -> tuple[list[bool], list[int]]:
        """(live, tokens generated) per slot: the one host sync between runs. Also sizes the
        next runs' full-sort rows from the most undecided rows one step saw."""
        both = torch.cat([self.active.to(torch.int64), self.steps, self.fallback_peak[None]]).cpu()
        if self.top_k:
            want = 2 * int(both[-1])
            want = min(self.slots, 1 if want <= 1 else 1 << (want - 1).bit_length())
            if want > self.fallback_rows or want <= self.fallback_rows // 4:  # shrink lazily: each size is a graph
                self.fallback_rows = want
            self.fallback_peak.zero_()
        return [bool(a) for a in both[:self.slots]], both[self.slots:2 * self.slots].tolist()

    def tokens_of(self, slots: list[int], width: int) -> list[list[int]]:
        idx = torch.tensor(slots, dtype=torch.int64, device=self.w.device)
        return self.out[idx, :width].cpu().tolist()

    def deactivate(self, slots: list[int]) -> None:
        self.active[torch.tensor(slots, dtype=torch.int64, device=self.w.device)] = False

    # -- the step (captured as a graph on CUDA)

    def _is_eos(self, tok):
        return (tok[:, None] == self.eos[None, :]).any(-1)

    def _ban_eos(self, logits, ban):
        """EOS logits of the `ban` rows set to -inf (in place; logits are float32 copies)."""
        if not self.has_eos:
            return logits
        cols = logits.index_select(1, self.eos)
        return logits.index_copy_(1, self.eos, torch.where(ban[:, None], float("-inf"), cols))

    def _forward(self, kv_len: int):
        w, f = self.w, self.fns
        x = F.embedding(self.tokens[:, None], w.embed)
        cos, sin = self.cos[self.pos][:, None], self.sin[self.pos][:, None]
        where = self.pos[:, None, None, None].expand(self.slots, w.n_kv, 1, w.head_dim)  # each row's own position
        for i, lw in enumerate(w.layers):
            q, k, v = f.attn_in(x, lw.ln1, lw.eps, lw.wqkv, lw.bqkv, cos, sin, w.n_heads, w.n_kv, w.head_dim)
            self.cache.k[i].scatter_(2, where, k)
            self.cache.v[i].scatter_(2, where, v)
            o = decode_attention(q, self.cache.k[i], self.cache.v[i], self.pos, kv_len)
            x = f.attn_out_mlp(x, o, lw.wo, lw.bo, lw.ln2, lw.eps, lw.wgu, lw.bgu, lw.wd, lw.bd)
        return f.logits(x[:, 0], w.norm_w, w.norm_eps, w.lm_w, w.lm_b)

    def _advance(self, logits) -> None:
        logits = self._ban_eos(logits, self.no_eos)
        if self.top_k:
            nxt, waiting = self._sample_top_k(logits)
            live = self.active & ~waiting
        else:
            nxt = self.fns.sample(logits, self.temps, self.top_ps, self.seeds, self.steps)
            live = self.active
        idx = self.steps.clamp(max=self.max_new - 1)[:, None]
        self.out.scatter_(1, idx, torch.where(live, nxt, self.out.gather(1, idx)[:, 0])[:, None])
        self.kv_reads += torch.where(live, self.pos + 1, 0).sum()
        ended = live & (self._is_eos(nxt) | (self.steps + 1 >= self.limit))
        inc = live.to(torch.int64)
        self.steps += inc
        self.pos += inc
        self.tokens.copy_(torch.where(live, nxt, self.tokens))
        self.active &= ~ended

    def _sample_top_k(self, logits):
        """(tokens, rows that wait this step): the pre-filter's tokens, the full sort's for up to
        `fallback_rows` undecided rows (undecided rows first, then by slot)."""
        tok, undecided = self.fns.sample_top_k(logits, self.temps, self.top_ps, self.seeds, self.steps, self.top_k)
        undecided &= self.active
        self.fallback_peak.copy_(torch.maximum(self.fallback_peak, undecided.sum()))
        if self.fallback_rows >= self.slots:  # every row may sort: no gather, nobody waits
            full = self.fns.sample(logits, self.temps, self.top_ps, self.seeds, self.steps)
            self.full_sorted += undecided.sum()
            return torch.where(undecided, full, tok), torch.zeros_like(undecided)
        served = torch.sort(undecided.to(torch.uint8), descending=True, stable=True)[1][:self.fallback_rows]
        full = self.fns.sample(logits[served], self.temps[served], self.top_ps[served], self.seeds[served],
                               self.steps[served])
        needed = undecided[served]
        tok = tok.index_copy(0, served, torch.where(needed, full, tok[served]))
        waiting = undecided.index_fill(0, served, False)
        self.full_sorted += needed.sum()
        self.waited += waiting.sum()
        return tok, waiting

    # -- CUDA graphs

    def _graph(self, kv_len: int) -> _Graph:
        key = (kv_len, self.fallback_rows)  # the full-sort rows are a shape baked into the graph
        entry = self.graphs.get(key)
        if entry is not None:
            return entry
        live, entry = self.active.clone(), None
        self.active.zero_()  # warm-up steps must not advance live rows (their cache writes land where the next step writes)
        try:
            for full in (True, False):
                try:
                    entry = self._capture(kv_len, full=full)
                    break
                except Exception as e:  # noqa: BLE001 - e.g. an op that syncs during capture
                    if torch.cuda.is_available():
                        torch.cuda.synchronize()
                    log.warning("decode step could not be captured %s (%s: %s)", "whole" if full else "at all",
                                type(e).__name__, e)
        finally:
            self.active.copy_(live)
        if entry is None:  # run eagerly from now on: slower, still correct
            self.use_graphs = False
            return _Graph(graph=None, logits=None)
        self.graphs[key] = entry
        return entry

    def _capture(self, kv_len: int, full: bool) -> _Graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compiles, autotunes, allocates outside the graph
                logits = self._forward(kv_len)
                if full:
                    self._advance(logits)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self._forward(kv_len)
            if full:
                self._advance(logits)
        return _Graph(graph=graph, logits=None if full else logits)
