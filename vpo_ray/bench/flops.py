"""FLOP count of a video diffusion transformer, for achieved TFLOP/s and MFU.

Counted: the matrix products of one transformer forward (a multiply-add = 2 FLOPs), per
layer and per token. With d = heads x head_dim, N tokens the attention sees and L layers:

  CogVideoX (joint attention over N = video tokens + 226 text tokens, FFN 4d):
    per layer = 24 N d^2                 (QKV 6 N d^2 + out 2 N d^2 + FFN 2 x 2 N d (4d))
              + 4 N^2 d                  (Q K^T 2 N^2 d + P V 2 N^2 d, summed over heads)
  Wan2.1 (self-attention over N video tokens, cross-attention to T = 512 text tokens, FFN f):
    per layer = 8 N d^2 + 4 N^2 d        (self: QKV + out, Q K^T + P V)
              + 4 N d^2 + 4 T d^2 + 4 N T d   (cross: Q and out on video, K and V on text, Q K^T + P V)
              + 4 N d f                  (FFN d -> f -> d)
  LTX-Video (as Wan, T = 128 text tokens, FFN 4d): 8 N d^2 + 4 N^2 d + 4 N d^2 + 4 T d^2 + 4 N T d + 16 N d^2

  forward = L x per layer + patch embedding + text projection + output projection
  per denoising step = forward x 2 with classifier-free guidance (CogVideoX/LTX batch the
  two; Wan runs two forwards), x 1 without;  per video = per step x steps.

Not counted (each well under 1%): norms, activations, RoPE, AdaLN modulation (per sample,
not per token), the scheduler; VAE decode and text encoder are outside the transformer
count and timed separately. MFU = achieved FLOP/s / the device's dense bf16 peak.
"""
from __future__ import annotations

from typing import Any, Optional

# Dense (no sparsity) bf16 tensor-core peaks from vendor datasheets, TFLOP/s.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H20", 148.0),
    ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("L40S", 362.0), ("L4", 121.0),
)


def peak_tflops(device_name: str) -> Optional[float]:
    """Datasheet dense bf16 peak for a CUDA device name, or None if unknown (e.g. CPU)."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    return cfg.get(key, default) if isinstance(cfg, dict) else getattr(cfg, key, default)


def dit_flops(family: str, cfg: Any, *, num_frames: int, height: int, width: int, guidance_scale: float,
              text_len: Optional[int] = None) -> dict:
    """FLOPs of the transformer for one video: tokens, per forward, per step (with CFG), breakdown.

    `family` is the transformer class name (CogVideoXTransformer3DModel, WanTransformer3DModel,
    LTXVideoTransformer3DModel); `cfg` its config (dict or FrozenDict).
    """
    heads, head_dim, layers = _get(cfg, "num_attention_heads"), _get(cfg, "attention_head_dim"), _get(cfg, "num_layers")
    d = heads * head_dim
    if family.startswith("CogVideoX"):
        p, pt = _get(cfg, "patch_size"), _get(cfg, "patch_size_t") or 1
        lf = (num_frames - 1) // _get(cfg, "temporal_compression_ratio", 4) + 1
        lf = -(-lf // pt)  # CogVideoX 1.5 pads latent frames to a multiple of patch_size_t
        video_tokens = lf * (height // (8 * p)) * (width // (8 * p))
        text = text_len or _get(cfg, "max_text_seq_length", 226)
        n = video_tokens + text
        linear, attention = 24 * n * d * d, 4 * n * n * d
        embed = 2 * video_tokens * (_get(cfg, "in_channels") * p * p * pt) * d + 2 * text * _get(cfg, "text_embed_dim") * d \
            + 2 * video_tokens * d * (_get(cfg, "out_channels") * p * p * pt)
    elif family.startswith(("Wan", "LTX")):
        wan = family.startswith("Wan")
        if wan:
            pt, ph, pw = _get(cfg, "patch_size")
            lf = (num_frames - 1) // 4 + 1
            video_tokens = (lf // pt) * (height // (8 * ph)) * (width // (8 * pw))
            text, text_dim, ffn = text_len or 512, _get(cfg, "text_dim"), _get(cfg, "ffn_dim")
            patch_in, patch_out = _get(cfg, "in_channels") * pt * ph * pw, _get(cfg, "out_channels") * pt * ph * pw
            text_proj = 2 * text * (text_dim * d + d * d)  # two-layer text embedder
        else:
            p, pt = _get(cfg, "patch_size", 1), _get(cfg, "patch_size_t", 1)
            lf = (num_frames - 1) // 8 + 1
            video_tokens = (lf // pt) * (height // (32 * p)) * (width // (32 * p))
            text, ffn = text_len or 128, 4 * d
            patch_in, patch_out = _get(cfg, "in_channels") * p * p * pt, _get(cfg, "out_channels") * p * p * pt
            text_proj = 2 * text * (_get(cfg, "caption_channels") * d + d * d)
        n = video_tokens
        linear = 8 * n * d * d + 4 * n * d * d + 4 * text * d * d + 4 * n * d * ffn
        attention = 4 * n * n * d + 4 * n * text * d
        embed = 2 * n * patch_in * d + text_proj + 2 * n * d * patch_out
    else:
        raise ValueError(f"dit_flops: no FLOP formula for {family}")
    forward = layers * (linear + attention) + embed
    passes = 2 if guidance_scale > 1.0 else 1
    return {"video_tokens": int(video_tokens), "attention_tokens": int(n), "hidden": int(d), "layers": int(layers),
            "per_forward": float(forward), "per_step": float(forward * passes), "cfg_passes": passes,
            "attention_share": float(layers * attention / forward)}
