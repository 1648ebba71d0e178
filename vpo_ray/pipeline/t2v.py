"""Text-to-video stage: a diffusers pipeline per Ray Data actor, mp4s written where they are made.

Rows in: `query_id`, `sample_idx`, `prompt`, `negative_prompt` ("" = none), `seed`,
`aspect_ratio` ("" = the configured size, else "W:H"). Rows out: the `schema.Video` fields
plus `error` ("" when the row rendered; otherwise the row still comes out, with `video_uri`
"" and the reason). Decoded frames and latents never leave the actor: the mp4 is written
here and only its URI goes downstream (ARCHITECTURE.md, "GPU placement"). With
`video.keep_latents` the denoised latents are written here too, beside the mp4
(`latents_uri`), for the video model's preference training.

Rendering is deterministic per seed (the initial noise comes from a CPU `torch.Generator`,
so it is the same on any device) and rerun-safe (a readable mp4 at the target path is
returned as is). Speed options are named flags, listed in `OPTIMIZATIONS`; none of them
skips denoising steps except the `cache=` family, which is approximate by design, and all
keep bf16 precision except `linear=fp8` (e4m3 GEMMs, stated error in benchmarks/README.md).

`model` is a registry preset or name (`registry.load_t2v_pipeline`), a local pipeline
directory, a weights=random reference (`random_weights.RandomModel` or "random:<name>": the
whole pipeline at real size with random weights, text encoder and stand-in tokenizer
included), or `arch:<name>`: the transformer and VAE from `vpo_ray/models/configs/<name>/`
with random weights and no text encoder (the video benchmark's set-up): prompts map to
fixed pseudo-random embeddings of the encoder's output shape, derived from a hash of the text.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from vpo_ray import storage
from vpo_ray.config import StageConfig, VideoConfig
from vpo_ray.pipeline.guard import RowFailed, StageGuard

ARCH_PREFIX = "arch:"

OPTIMIZATIONS = {
    "fuse-qkv": "one QKV matmul per attention layer (transformer.fuse_qkv_projections)",
    "attn=<cudnn|flash|efficient|math>": "preferred torch SDPA kernel (all models call SDPA on the native path)",
    "linear=fp8": "attention and feed-forward projections as e4m3 GEMMs (pipeline/fp8.py; approximate, "
                  "~47 dB PSNR vs bf16 on CogVideoX-2B); CUDA with compute capability >= 8.9",
    "attn-backend=<name>": "diffusers attention backend (set_attention_backend), e.g. _native_cudnn, flash, sage",
    "compile": "torch.compile of each transformer block (regional; one compile serves every layer)",
    "compile=full": "torch.compile of the whole transformer",
    "vae-tiling": "decode the video in overlapping spatial tiles (less memory, some extra compute)",
    "vae-slicing": "decode a batch one video at a time",
    "overlap": "denoise the next video while a side thread and CUDA stream decode and encode the last one",
    "cache=<fbc|taylorseer|taylorseer-lite|faster|pab>[:<param>]": "training-free diffusers cache (approximate)",
    "offload=<model|sequential>": "keep weights on the CPU and move them in per model / per layer",
}
_SDPA = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_CACHES = ("fbc", "taylorseer", "taylorseer-lite", "faster", "pab")
OUTPUT_COLUMNS = ("query_id", "sample_idx", "seed", "model", "video_uri", "frames", "fps", "prompt",
                  "checklist_json", "score", "error")


# ---------------------------------------------------------------------------- options

def parse_optimizations(flags) -> dict:
    """("fuse-qkv", "attn=cudnn", "cache=fbc:0.05") -> {"fuse-qkv": True, "attn": "cudnn", "cache": ("fbc", "0.05")}."""
    out: dict[str, Any] = {}
    for flag in flags or ():
        name, _, value = str(flag).strip().partition("=")
        if name in ("fuse-qkv", "vae-tiling", "vae-slicing", "overlap") and not value:
            out[name] = True
        elif name == "compile" and value in ("", "regional", "full"):
            out[name] = value or "regional"
        elif name == "attn" and value in _SDPA:
            out[name] = value
        elif name == "linear" and value == "fp8":
            out[name] = value
        elif name == "attn-backend" and value:
            out[name] = value
        elif name == "offload" and value in ("model", "sequential"):
            out[name] = value
        elif name == "cache" and value.partition(":")[0] in _CACHES:
            kind, _, param = value.partition(":")
            out[name] = (kind, param)
        else:
            raise ValueError(f"optimizations: unknown flag {flag!r} (known: {', '.join(OPTIMIZATIONS)})")
    return out


def dtype_name(name: Optional[str], device: str) -> Optional[str]:
    """Canonical torch dtype name ("bfloat16", ...) or None (= the registry spec's default)."""
    if name is None:
        return None
    canon = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    out = canon.get(name, name).replace("torch.", "")
    if out not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype: expected bfloat16 | float16 | float32, got {name!r}")
    return out


def set_sdpa_preference(backend: Optional[str]) -> None:
    """Put `backend` first in torch's SDPA priority order for this process (None = torch's default)."""
    import torch
    from torch.nn.attention import SDPBackend

    if not hasattr(torch._C, "_set_sdp_priority_order"):
        return
    default = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION]
    order = default if backend is None else [getattr(SDPBackend, _SDPA[backend])] + default
    torch._C._set_sdp_priority_order(list(dict.fromkeys(int(b) for b in order)))


# ---------------------------------------------------------------------------- loading

def arch_names() -> list[str]:
    """Registry T2V models whose architecture ships (configs/<name or arch_config>/transformer.json)."""
    from vpo_ray.models import random_weights, registry

    return sorted(n for n, s in registry.MODELS.items()
                  if s.role == "t2v" and (random_weights.config_folder(s) / "transformer.json").is_file())


def build_arch_pipeline(name: str, device: str, dtype: Optional[str] = None, seed: int = 0):
    """The released architecture of registry model `name` with random weights, built on `device`, no text encoder.

    Transformer and VAE from configs/<name>/ (`random_weights.build_t2v_pipeline`), built
    directly on the device under `seed`, so two builds on one device are identical. The
    text encoder's output shape (max_sequence_length x d_model) is `_vpo_text_shape`.
    """
    from vpo_ray.models import random_weights

    if name not in arch_names():
        raise ValueError(f"model 'arch:{name}': no architecture config (known: {', '.join(arch_names())})")
    return random_weights.build_t2v_pipeline(name, device, dtype, seed=seed, text_encoder=False)


def load_pipeline(model, device: str, dtype: Optional[str] = None):
    """(pipeline on `device`, model name for the output rows); `model` may be a weights=random reference."""
    from vpo_ray.models import random_weights, registry

    if random_weights.as_random(model) is not None:  # the whole pipeline, text encoder included
        return registry.load_t2v_pipeline(model, device, dtype), str(model)
    if model.startswith(ARCH_PREFIX):
        return build_arch_pipeline(model[len(ARCH_PREFIX):], device, dtype), model

    if Path(model).is_dir():
        return registry.load_t2v_pipeline(model, device, dtype), model
    spec = registry.get_spec(model, "t2v")
    return registry.load_t2v_pipeline(spec, device, dtype), getattr(spec, "name", model)


def synthetic_prompt_embeds(text: str, shape: tuple[int, int], device, dtype):
    """Fixed pseudo-random stand-in for a text encoder's output: same text, same tensor."""
    import torch

    gen = torch.Generator().manual_seed(int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:15], 16))
    return (0.1 * torch.randn((1, *shape), generator=gen)).to(device=device, dtype=dtype)


def transformer_blocks(transformer):
    """The transformer's list of repeated blocks (CogVideoX/LTX: transformer_blocks, Wan: blocks)."""
    import torch

    n = getattr(transformer.config, "num_layers", None)
    for name in ("transformer_blocks", "blocks"):
        blocks = getattr(transformer, name, None)
        if isinstance(blocks, torch.nn.ModuleList) and (n is None or len(blocks) == n):
            return blocks
    raise ValueError(f"{type(transformer).__name__}: no list of repeated blocks found")


def _cache_config(pipe, kind: str, param: str):
    import diffusers

    def timestep():
        t = pipe.current_timestep
        return int(t.item()) if hasattr(t, "item") else int(t if t is not None else 999)

    if kind == "fbc":
        return diffusers.FirstBlockCacheConfig(threshold=float(param or 0.05))
    if kind in ("taylorseer", "taylorseer-lite"):
        # cache_interval N: one full forward, then N-1 steps predicted from a first-order Taylor series.
        return diffusers.TaylorSeerCacheConfig(cache_interval=int(param or 5), disable_cache_before_step=3,
                                               max_order=1, use_lite_mode=kind == "taylorseer-lite",
                                               cache_identifiers=None if kind == "taylorseer-lite"
                                               else [r"(transformer_blocks|blocks)\.\d+\.(attn\d?|ff|ffn)"])
    cog = type(pipe).__name__.startswith("CogVideoX")
    if kind == "pab":
        return diffusers.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=int(param or 2),
                                                         spatial_attention_timestep_skip_range=(100, 800),
                                                         current_timestep_callback=timestep)
    # FasterCache settings from the diffusers docs for CogVideoX.
    return diffusers.FasterCacheConfig(spatial_attention_block_skip_range=int(param or 2),
                                       spatial_attention_timestep_skip_range=(-1, 681),
                                       current_timestep_callback=timestep, attention_weight_callback=lambda _: 0.3,
                                       unconditional_batch_skip_range=5,
                                       unconditional_batch_timestep_skip_range=(-1, 781),
                                       tensor_format="BFCHW" if cog else "BCFHW", is_guidance_distilled=False)


def _compile(transformer, mode: str) -> None:
    """Regional compile: one graph per block class, reused by every layer (inlined nn.Module params).

    A module carrying a diffusers cache hook is not compiled itself (its Python-side state
    would force a recompile every step); its children are compiled instead.
    """
    import torch

    if mode == "full" and not hasattr(transformer, "_diffusers_hook"):
        transformer.compile(dynamic=False)
        return
    for block in transformer_blocks(transformer):
        if not hasattr(block, "_diffusers_hook"):
            block.compile(fullgraph=True, dynamic=False)
            continue
        for child in block.children():
            if not hasattr(child, "_diffusers_hook") and any(True for _ in child.parameters()):
                child.compile(dynamic=False)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 16)


def apply_optimizations(pipe, opts: dict, device: str) -> list[str]:
    """Apply parsed `opts` to `pipe` in place; returns notes on what did not apply (and why)."""
    notes = []
    transformer = pipe.transformer
    if opts.get("fuse-qkv"):
        try:
            transformer.fuse_qkv_projections()
        except (AttributeError, ValueError, NotImplementedError) as e:
            notes.append(f"fuse-qkv: not applied ({e})")
    if "attn" in opts:
        set_sdpa_preference(opts["attn"])
    if "linear" in opts:
        notes.append(_apply_fp8_linears(pipe, device))
    if "attn-backend" in opts:
        transformer.set_attention_backend(opts["attn-backend"])
    if opts.get("vae-tiling"):
        pipe.vae.enable_tiling()
    if opts.get("vae-slicing"):
        pipe.vae.enable_slicing()
    if "cache" in opts:
        try:
            transformer.enable_cache(_cache_config(pipe, *opts["cache"]))
        except (IndexError, ValueError) as e:  # e.g. first-block cache on a one-block model
            raise ValueError(f"optimizations: cache={opts['cache'][0]} does not apply to "
                             f"{type(transformer).__name__} with {len(transformer_blocks(transformer))} block(s): {e}") from e
    if "compile" in opts:
        _compile(transformer, opts["compile"])
    if opts.get("offload") == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif opts.get("offload") == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    return notes


def _apply_fp8_linears(pipe, device: str) -> str:
    import torch

    from vpo_ray.pipeline import fp8

    if not str(device).startswith("cuda") or torch.cuda.get_device_capability(torch.device(device)) < (8, 9):
        raise ValueError("optimizations: linear=fp8 needs a CUDA GPU with FP8 tensor cores "
                         f"(compute capability >= 8.9); device is {device!r}")
    return f"linear=fp8: {fp8.apply_fp8_linears(transformer_blocks(pipe.transformer))} linears in e4m3"


# ---------------------------------------------------------------------------- sizes

def size_multiple(pipe) -> int:
    """Pixels per transformer token edge: VAE spatial factor x patch size (16 for CogVideoX/Wan, 32 for LTX)."""
    factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_spatial_compression_ratio", 8)
    patch = getattr(pipe.transformer.config, "patch_size", 1) or 1
    if isinstance(patch, (list, tuple)):
        patch = patch[-1]
    return int(factor) * int(patch)


def target_size(aspect_ratio: str, height: int, width: int, multiple: int) -> tuple[int, int]:
    """(height, width) with the pixel budget height*width at `aspect_ratio` ("W:H"), rounded to `multiple`."""
    if not aspect_ratio:
        return height, width
    try:
        w_part, h_part = (float(x) for x in aspect_ratio.split(":"))
        if not (w_part > 0 and h_part > 0 and math.isfinite(w_part / h_part)):
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect_ratio {aspect_ratio!r}: expected W:H with positive numbers, like 16:9") from None
    budget = height * width
    w = math.sqrt(budget * w_part / h_part)
    h = budget / w
    return max(multiple, round(h / multiple) * multiple), max(multiple, round(w / multiple) * multiple)


# ---------------------------------------------------------------------------- decode

def frames_to_uint8(video):
    """(C, F, H, W) in [-1, 1] on any device -> uint8 numpy (F, H, W, C); the conversion runs on-device."""
    import torch

    v = ((video.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return v.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def decode_latents(pipe, latents):
    """Latents from `output_type="latent"` -> (C, F, H, W) in [-1, 1], as the pipeline itself decodes them."""
    import torch

    name = type(pipe).__name__
    if name.startswith("CogVideoX"):
        patch_t = getattr(pipe.transformer.config, "patch_size_t", None)
        if patch_t:  # CogVideoX 1.5 pads latent frames to a multiple of patch_size_t; drop the padding
            n = latents.shape[1]
            latents = latents[:, (patch_t - n % patch_t) % patch_t:]
        return pipe.decode_latents(latents)[0]
    if name.startswith("Wan"):
        vae = pipe.vae
        latents = latents.to(vae.dtype)
        mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
        return vae.decode(latents / inv_std + mean, return_dict=False)[0][0]
    raise ValueError(f"{name}: no split decode")


def splits_decode(pipe) -> bool:
    return type(pipe).__name__.startswith(("CogVideoX", "Wan"))


# ---------------------------------------------------------------------------- latents

LATENTS_SUFFIX = ".latents.safetensors"


def latents_uri(video_uri: str) -> str:
    """Where the renderer keeps a video's latents: beside its mp4 (`video.keep_latents`)."""
    stem = video_uri[:-4] if video_uri.endswith(".mp4") else video_uri
    return stem + LATENTS_SUFFIX


def latents_layout(pipe) -> str:
    """Axis order of the pipeline's `output_type="latent"` tensor, batch axis dropped."""
    return "FCHW" if type(pipe).__name__.startswith("CogVideoX") else "CFHW"


def save_latents(uri: str, latents, metadata: dict) -> None:
    """One video's denoised latents (batch axis dropped) as safetensors, written atomically."""
    from safetensors.torch import save

    tensor = latents.detach()[0].to("cpu").contiguous()
    storage.write_bytes(uri, save({"latents": tensor}, metadata={k: str(v) for k, v in metadata.items()}))


def latents_header(uri: str) -> tuple[list[int], dict]:
    """(shape of the latents, metadata) from a latents file's header alone (no tensor read)."""
    fs, path = storage.fs_for(uri)
    try:
        with fs.open(path, "rb") as f:  # safetensors: 8-byte little-endian header size, then a JSON header
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    except (OSError, ValueError) as e:
        raise ValueError(f"{uri}: not a readable latents file ({type(e).__name__}: {e})") from None
    if "latents" not in header:
        raise ValueError(f"{uri}: no 'latents' tensor (keys: {', '.join(k for k in header if k != '__metadata__')})")
    return list(header["latents"]["shape"]), header.get("__metadata__") or {}


def load_latents(uri: str):
    """The latents tensor of a file written by `save_latents`."""
    from safetensors.torch import load

    tensors = load(storage.read_bytes(uri))
    if "latents" not in tensors:
        raise ValueError(f"{uri}: no 'latents' tensor (keys: {', '.join(tensors) or 'none'})")
    return tensors["latents"]


# ---------------------------------------------------------------------------- the actor

class T2VRenderer:
    """Ray Data callable class: loads the pipeline once per actor, renders a batch of rows to mp4.

    `video` gives frames/size/steps/guidance/fps; `out_root` is where videos/ is written;
    `optimizations` are flags from OPTIMIZATIONS; `warmup_steps` > 0 renders one throw-away
    clip of that many steps at construction (compile and kernel autotuning happen before the
    first row); `timings` adds a `timings_json` column (denoise/decode/encode seconds).
    """

    def __init__(self, model: str, video: Optional[VideoConfig] = None, out_root: str = "runs/t2v",
                 device: Optional[str] = None, dtype: Optional[str] = None, optimizations: tuple[str, ...] = (),
                 warmup_steps: int = 0, timings: bool = False, watchdog_s: float = 0.0):
        import torch

        self.opts = parse_optimizations(optimizations)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.video = video if isinstance(video, VideoConfig) else VideoConfig(**(video or {}))
        self.out_root = out_root
        self.timings = timings
        # Denoising and decoding of one video, each: out of memory -> one retry -> the row's error; hung -> actor restart.
        self.guard = StageGuard("render", watchdog_s, storage.join(out_root, "watchdog") if watchdog_s > 0 else None)
        offload = bool(self.opts.get("offload"))
        # A checkpoint to offload is loaded on the CPU; a random-weight arch: build is made on the device (fast) and moved.
        load_device = "cpu" if offload and not str(model).startswith((ARCH_PREFIX, "random:")) else self.device
        self.pipe, self.model_name = load_pipeline(model, load_device, dtype_name(dtype, self.device))
        self.dtype = self.pipe.transformer.dtype
        self.pipe.to("cpu" if offload else self.device)
        self.pipe.set_progress_bar_config(disable=True)
        self.notes = apply_optimizations(self.pipe, self.opts, self.device)
        self.multiple = size_multiple(self.pipe)
        self.keep_latents = bool(getattr(self.video, "keep_latents", False))
        if self.keep_latents and not splits_decode(self.pipe):
            raise ValueError(f"video.keep_latents: {type(self.pipe).__name__} decodes inside its call, so its "
                             "latents never reach the renderer (CogVideoX and Wan keep them)")
        self._text_shape = getattr(self.pipe, "_vpo_text_shape", None)
        self._cuda = self.device.startswith("cuda") and torch.cuda.is_available()
        self._denoise_lock = threading.Lock()  # one denoising loop on the GPU at a time
        overlap = bool(self.opts.get("overlap"))
        self._finisher = ThreadPoolExecutor(1, thread_name_prefix="t2v-finish") if overlap else None
        self._side_stream = torch.cuda.Stream() if overlap and self._cuda else None
        if warmup_steps > 0:
            self.render(prompt="warm-up", seed=0, steps=warmup_steps, write_to=None)

    # -- one video -------------------------------------------------------------------------

    def _call_kwargs(self, prompt: str, negative: str, seed: int, height: int, width: int, steps: int) -> dict:
        import torch

        v = self.video
        kw = dict(num_frames=v.num_frames, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=v.guidance_scale, generator=torch.Generator().manual_seed(int(seed)),
                  return_dict=False)
        if self._text_shape is None:
            kw.update(prompt=prompt, negative_prompt=negative or None)
            return kw
        emb = lambda t: synthetic_prompt_embeds(t, self._text_shape, self.device, self.dtype)  # noqa: E731
        kw.update(prompt_embeds=emb(prompt), negative_prompt_embeds=emb(negative))
        if type(self.pipe).__name__.startswith("LTX"):
            ones = torch.ones((1, self._text_shape[0]), dtype=torch.bool, device=self.device)
            kw.update(prompt_attention_mask=ones, negative_prompt_attention_mask=ones)
        return kw

    def denoise(self, prompt: str, negative: str = "", seed: int = 0, height: Optional[int] = None,
                width: Optional[int] = None, steps: Optional[int] = None, timing: Optional[dict] = None):
        """Run the denoising loop; returns ("latent", latents, cuda event | None) or ("frames", (C,F,H,W) in [-1,1], None).

        `timing`, if given, receives wait_s (waiting for the GPU's denoising slot) and denoise_s.
        """
        import torch

        kw = self._call_kwargs(prompt, negative, seed, height or self.video.height, width or self.video.width,
                               steps or self.video.num_inference_steps)
        t0 = time.perf_counter()
        with self._denoise_lock, torch.inference_mode():
            t1 = time.perf_counter()
            if timing is not None:
                timing["wait_s"] = t1 - t0
            if splits_decode(self.pipe):
                kind, out = "latent", self.pipe(output_type="latent", **kw)[0]
            else:  # (F, C, H, W) in [0, 1] -> (C, F, H, W) in [-1, 1]
                kind, out = "frames", self.pipe(output_type="pt", **kw)[0][0].permute(1, 0, 2, 3) * 2 - 1
            event = torch.cuda.Event() if self._cuda else None
            if event is not None:
                event.record()  # the side stream waits on this before it reads `out`
            if timing is not None:
                timing["denoise_s"] = time.perf_counter() - t1
            return kind, out, event

    def decode(self, kind: str, tensor, event=None):
        """Output of `denoise` -> uint8 numpy (F, H, W, C); on the side stream when overlapping."""
        import contextlib

        import torch

        stream = self._side_stream
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx, torch.inference_mode():
            if stream is not None and event is not None:
                stream.wait_event(event)
                tensor.record_stream(stream)
            video = decode_latents(self.pipe, tensor) if kind == "latent" else tensor
            return frames_to_uint8(video)

    def render(self, prompt: str, negative: str = "", seed: int = 0, aspect_ratio: str = "",
               steps: Optional[int] = None, write_to: Optional[str] = None) -> dict:
        """Render one video synchronously (no overlap); write it to `write_to` if given. For tools and tests."""
        height, width = target_size(aspect_ratio, self.video.height, self.video.width, self.multiple)
        out = self.denoise(prompt, negative, seed, height, width, steps)
        frames = self.decode(*out)
        if write_to:
            from vpo_ray import video_io

            video_io.write_mp4(frames, write_to, self.video.fps)
        return {"frames": frames, "height": height, "width": width}

    # -- rows ------------------------------------------------------------------------------

    def target_uri(self, row: dict) -> str:
        return storage.safe_join(self.out_root, "videos", f"{row['query_id']}_{int(row['sample_idx'])}_{int(row['seed'])}.mp4")

    def _row(self, row: dict, uri: str = "", frames: int = 0, error: str = "", timings: Optional[dict] = None) -> dict:
        out = {"query_id": str(row.get("query_id", "")), "sample_idx": int(row.get("sample_idx", 0) or 0),
               "seed": int(row.get("seed", 0) or 0), "model": self.model_name, "video_uri": uri, "frames": int(frames),
               "fps": int(self.video.fps), "prompt": str(row.get("prompt", "") or ""), "checklist_json": "[]",
               "score": 0.0, "error": error}
        if self.timings:
            out["timings_json"] = json.dumps(timings or {}, sort_keys=True)
        return out

    @staticmethod
    def _existing_frames(uri: str) -> int:
        """Frame count of a readable mp4 at `uri`, else 0 (absent or unreadable: render again)."""
        from vpo_ray import video_io

        try:
            return int(video_io.video_info(uri)["frames"]) if storage.exists(uri) else 0
        except Exception:  # a truncated or corrupt file is re-rendered, not trusted
            return 0

    def _finish(self, row: dict, uri: str, denoised: tuple, t: dict) -> dict:
        from vpo_ray import video_io

        try:
            t0 = time.perf_counter()
            kind, tensor, _ = denoised
            if self.keep_latents and kind == "latent":  # before the mp4: an mp4 without latents is redone
                save_latents(latents_uri(uri), tensor, {"layout": latents_layout(self.pipe), "model": self.model_name,
                                                        "seed": int(row["seed"]), "prompt": str(row.get("prompt", ""))})
            frames = self.guard.call_one(lambda: self.decode(*denoised), row=str(row.get("query_id", "")),
                                         key=uri + "#decode")
            t1 = time.perf_counter()
            video_io.write_mp4(frames, uri, self.video.fps)
            t.update(decode_s=t1 - t0, encode_s=time.perf_counter() - t1, done_at=time.time(), actor=os.getpid())
            return self._row(row, uri, len(frames), timings=t)
        except RowFailed as e:
            return self._row(row, error=f"render: {e.failure.reason}", timings=t)
        except Exception as e:  # noqa: BLE001 — a row's failure becomes its error row
            return self._row(row, error=f"render: {type(e).__name__}: {e}", timings=t)

    def _start(self, row: dict):
        """Denoise one row; returns its output row, or a Future of it when decoding overlaps."""
        try:
            uri = self.target_uri(row)
            existing = self._existing_frames(uri)
            if existing and self.keep_latents and not storage.exists(latents_uri(uri)):
                existing = 0  # rendered before latents were kept: render again to get them
            if existing:
                return self._row(row, uri, existing, timings={"skipped": True})
            prompt = str(row.get("prompt") or "").strip()
            if not prompt:
                raise ValueError("prompt is empty")
            height, width = target_size(str(row.get("aspect_ratio") or ""), self.video.height, self.video.width,
                                        self.multiple)
            t = {"height": height, "width": width}
            denoised = self.guard.call_one(
                lambda: self.denoise(prompt, str(row.get("negative_prompt") or ""), int(row["seed"]), height, width,
                                     timing=t), row=str(row.get("query_id", "")), key=uri)
        except RowFailed as e:
            return self._row(row, error=f"render: {e.failure.reason}")
        except Exception as e:  # noqa: BLE001
            return self._row(row, error=f"render: {type(e).__name__}: {e}")
        if self._finisher is not None:
            return self._finisher.submit(self._finish, row, uri, denoised, t)
        return self._finish(row, uri, denoised, t)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["query_id"])
        rows = [{k: batch[k][i] for k in batch} for i in range(n)]
        results = [self._start(r) for r in rows]
        results = [r.result() if isinstance(r, Future) else r for r in results]
        columns = OUTPUT_COLUMNS + (("timings_json",) if self.timings else ())
        return {c: [r[c] for r in results] for c in columns}


def stage(ds, cfg_stage: StageConfig, *, model: str, video: VideoConfig, out_root: str,
          device: Optional[str] = None, dtype: Optional[str] = None, optimizations: tuple[str, ...] = (),
          warmup_steps: int = 0, timings: bool = False):
    """`ds.map_batches(T2VRenderer, ...)` with the actor pool, GPUs, batch size and watchdog of `cfg_stage`.

    With "overlap" each actor takes two calls at once: one denoises while the other decodes
    and encodes, so the GPU keeps working between videos (the two share one model copy).
    An actor is sent no more rows than it runs at once (placement.map_kwargs), so rows wait
    in the operator's queue for whichever GPU frees up instead of queueing behind one.
    """
    from vpo_ray.pipeline import placement

    parse_optimizations(optimizations)  # fail in the driver, not in every actor
    pool = placement.Pool("t2v", cfg_stage.min_actors, cfg_stage.max_actors, cfg_stage.num_gpus, cfg_stage.num_cpus,
                          cfg_stage.batch_size, concurrency=2 if "overlap" in optimizations else 1)
    kwargs = dict(model=model, video=video, out_root=out_root, device=device, dtype=dtype,
                  optimizations=tuple(optimizations), warmup_steps=warmup_steps, timings=timings,
                  watchdog_s=cfg_stage.watchdog_s)
    return ds.map_batches(T2VRenderer, fn_constructor_kwargs=kwargs, batch_format="numpy",
                          **placement.map_kwargs(pool))
