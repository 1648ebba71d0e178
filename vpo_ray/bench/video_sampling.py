"""`vpo bench video-sampling`: how fast the text-to-video stage renders, and where the time goes.

The preset's model is built from its real architecture config with random weights (same
compute as the released weights; `tiny` uses the tiny preset). The text encoder is
replaced by fixed prompt embeddings of its output shape (said in the record). Variants,
run in this order in one process (`variants` picks a subset):

  baseline   flags `baseline` (the naive path): a plain loop of denoise -> VAE decode -> mp4 write
  attention  DiT step time with each torch SDPA kernel (flash, cudnn, efficient) put first, with and
             without fused QKV, eager (GPU only)
  optimized  flags `optimizations` (exact: fused QKV, attention kernel, compile): the same plain loop,
             the "bare loop" the Ray stage is compared with
  ray        the same flags + "overlap" through `t2v.stage` (one actor, same GPU, prompts and seeds)
  scaling    the same stage with 1, 2, 4, 8 actors (one GPU each, as many as there are GPUs; CPU: 1
             and 2 actors): videos/s, efficiency against linear scaling, GPU busy per GPU
  quantized  optimized with each `quantized` flag set swapped in (e.g. FP8 linears: no step skipped,
             lower precision); PSNR and latent rel-L2 against baseline and optimized
  cache      optimized + each training-free cache flag; PSNR against the optimized frames, same seeds
  memory     peak GPU memory of one video under each memory mode (tiling, model / sequential offload)

Each variant first renders `warmup` throw-away clips of `warmup_steps` steps (compile and
kernel autotuning), which no figure includes. Throughput is steady state: one over the median
gap between consecutive completed videos (`videos_per_s_span`, (n-1) over first-to-last, is
kept beside it). GPU busy fraction is NVML's utilization averaged from the first to the last
completion. FLOPs: see vpo_ray/bench/flops.py.
"""
from __future__ import annotations

import dataclasses
import shutil
import time
from typing import Any, Optional

from vpo_ray import storage
from vpo_ray.bench import common, flops
from vpo_ray.bench.config import BenchConfig
from vpo_ray.config import StageConfig, VideoConfig

PROMPTS = (
    "A golden retriever runs along a sunny beach, waves rolling in, the camera tracking beside it at dog height.",
    "An astronaut floats inside a spaceship cabin, slowly turning toward a window that shows the blue Earth.",
    "A red vintage car drives down a neon-lit city street at night in the rain, reflections shimmering on the road.",
    "A hummingbird hovers at a purple flower in slow motion, wings blurred, soft morning light, shallow depth of field.",
    "A chef tosses vegetables in a flaming wok in a busy restaurant kitchen, steam rising, handheld camera.",
    "A panda eats bamboo in a misty bamboo grove, close-up, gentle wind moving the leaves.",
    "A sailboat glides across a calm lake at dawn, mist on the water, wide aerial shot slowly pulling back.",
    "A ballerina spins on a dark stage under a single spotlight, her dress flowing, slow dolly in.",
)
GPU_ONLY_FLAGS = ("compile", "attn", "linear")


def resolve_model(preset: str):
    """(model string for T2VRenderer, registry spec): tiny presets load as built, others as arch:<name>."""
    from vpo_ray.models import registry

    spec = registry.get_spec(preset, "t2v")
    return (spec.name if spec.tiny else f"arch:{spec.name}"), spec


def resolve_video(spec, overrides) -> VideoConfig:
    """The registry entry's generation defaults with the benchmark's non-None overrides."""
    opts = spec.options
    vals = {k: opts[k] for k in ("num_frames", "height", "width", "num_inference_steps", "guidance_scale", "fps")
            if opts.get(k) is not None}
    vals.update({k: v for k, v in dataclasses.asdict(overrides).items() if v is not None})
    return VideoConfig(**vals)


class VideoSamplingBench:
    def __init__(self, cfg: BenchConfig):
        self.cfg = cfg
        self.device = common.resolve_device(cfg.device)
        self.cuda = self.device.startswith("cuda")
        self.model, self.spec = resolve_model(cfg.preset)
        self.video = resolve_video(self.spec, cfg.video)
        self.stem = f"video_sampling_{cfg.preset}"
        self.work = storage.join(cfg.out, f"{self.stem}_videos")
        self.notes: list[str] = []
        self.optimizations = self._device_flags(cfg.optimizations)
        self.frames: dict[str, Any] = {}  # variant -> [uint8 frames of each timed video]
        self.latents: dict[str, Any] = {}
        self.sampler = None
        self.text_shape = None
        self.record: dict[str, Any] = {}

    def _device_flags(self, flags) -> tuple[str, ...]:
        if self.cuda:
            return tuple(flags)
        kept = tuple(f for f in flags if not f.startswith(GPU_ONLY_FLAGS))
        if kept != tuple(flags):
            self.notes.append(f"on CPU the GPU-only flags {sorted(set(flags) - set(kept))} are left out")
        return kept

    def _renderer(self, flags, video: Optional[VideoConfig] = None, warm: bool = True):
        from vpo_ray.pipeline import t2v

        t2v.set_sdpa_preference(None)  # a variant without attn= runs torch's default kernel order
        warm_steps = self.cfg.warmup_steps if (warm and self.cfg.warmup > 0) else 0
        t0 = time.perf_counter()
        r = t2v.T2VRenderer(self.model, video or self.video, out_root=self.work, device=self.device,
                            dtype=self.cfg.dtype, optimizations=tuple(flags), warmup_steps=warm_steps)
        self.text_shape = getattr(r.pipe, "_vpo_text_shape", None)
        for _ in range(max(0, self.cfg.warmup - 1) if warm else 0):
            r.render("warm-up", seed=0, steps=self.cfg.warmup_steps)
        common.sync(self.device)
        return r, time.perf_counter() - t0

    def _flops(self, renderer) -> dict:
        v = self.video
        f = flops.dit_flops(type(renderer.pipe.transformer).__name__, renderer.pipe.transformer.config,
                            num_frames=v.num_frames, height=v.height, width=v.width, guidance_scale=v.guidance_scale,
                            text_len=(getattr(renderer.pipe, "_vpo_text_shape", None) or (None,))[0])
        f["per_video"] = f["per_step"] * v.num_inference_steps
        return f

    # ---------------------------------------------------------------- the plain loop

    def plain_loop(self, name: str, flags, n: int) -> dict:
        from vpo_ray import video_io

        common.free_memory(self.device)
        renderer, setup_s = self._renderer(flags)
        out_dir = storage.join(self.work, name)
        shutil.rmtree(out_dir, ignore_errors=True)
        steps = self.video.num_inference_steps
        per, done, frames_kept = [], [], []
        t_start = time.time()
        for i in range(n):
            with common.Timer(self.device) as td:
                kind, out, event = renderer.denoise(PROMPTS[i % len(PROMPTS)], "", seed=i)
            if i == 0 and kind == "latent":
                self.latents[name] = out.float().cpu()
            with common.Timer(self.device) as tv:
                frames = renderer.decode(kind, out, event)
            t0 = time.perf_counter()
            video_io.write_mp4(frames, storage.join(out_dir, f"{i:03d}.mp4"), self.video.fps)
            per.append({"denoise_s": td.seconds, "decode_s": tv.seconds, "encode_s": time.perf_counter() - t0})
            done.append(time.time())
            frames_kept.append(frames)
            last = (kind, out, event)
        self.frames[name] = frames_kept
        mean = lambda k: sum(p[k] for p in per) / len(per)  # noqa: E731
        fl = self._flops(renderer)
        denoise = mean("denoise_s")
        tflops = fl["per_video"] / denoise / 1e12
        peak = self.record.get("device", {}).get("peak_bf16_tflops")
        ceiling = self.record.get("matmul_ceiling_tflops")
        window = (done[0], done[-1]) if n > 1 else (t_start, done[-1])
        result = {
            "flags": list(flags), "videos": n, "setup_s": round(setup_s, 2),
            "seconds_per_video": round(sum(mean(k) for k in ("denoise_s", "decode_s", "encode_s")), 3),
            "denoise_s": round(denoise, 3), "dit_step_s": round(denoise / steps, 4),
            "vae_decode_s": round(mean("decode_s"), 3), "mp4_encode_s": round(mean("encode_s"), 3),
            "videos_per_s": common.steady_rate(done) or round(1.0 / (done[-1] - t_start), 5),
            "videos_per_s_span": common.span_rate(done), "intervals_s": intervals(done),
            "dit_tflops": round(tflops, 1 if tflops > 10 else 5), "mfu": round(tflops / peak, 3) if peak else None,
            "fraction_of_measured_matmul_ceiling": round(tflops / ceiling, 3) if ceiling else None,
            "gpu": self.sampler.window(*window) if self.sampler else None,
            **common.peak_memory(self.device), "per_video": per, "notes": renderer.notes,
            "frame_mean": round(float(frames_kept[0].mean()), 2), "frame_std": round(float(frames_kept[0].std()), 2),
        }
        if name == "optimized" and (splits := self._tiling_decode(renderer, last)):
            result["vae_decode_s_other_tiling"] = splits
        del renderer, out, last
        common.free_memory(self.device)
        return result

    def _tiling_decode(self, renderer, last) -> Optional[dict]:
        """Decode the last latents once more with VAE tiling switched the other way (cheap, informative)."""
        vae = renderer.pipe.vae
        if not self.cuda or not hasattr(vae, "enable_tiling") or last[0] != "latent":
            return None
        tiled = bool(getattr(vae, "use_tiling", False))
        (vae.disable_tiling if tiled else vae.enable_tiling)()
        try:
            with common.Timer(self.device) as t:
                renderer.decode(*last)
            return {"tiling": not tiled, "vae_decode_s": round(t.seconds, 3), **common.peak_memory(self.device)}
        except Exception as e:  # noqa: BLE001 — e.g. untiled decode out of memory
            return {"tiling": not tiled, "error": f"{type(e).__name__}: {e}"}
        finally:
            (vae.enable_tiling if tiled else vae.disable_tiling)()

    # ---------------------------------------------------------------- the Ray stage

    def ray_stage(self, n: int, actors: int = 1, samplers: Optional[list] = None) -> dict:
        """`n` videos through `t2v.stage` with `actors` actors (one GPU each on CUDA).

        videos/s is the sum over actors of each actor's steady rate (1 / median gap between its
        own completions): completions of several actors interleave irregularly, so the gaps of
        the merged stream would mislead. GPU busy comes from `samplers` (one per GPU) if given.
        """
        import json

        import ray

        from vpo_ray import video_io
        from vpo_ray.pipeline import placement, t2v
        from vpo_ray.ray_utils import init_ray

        common.free_memory(self.device)
        started_here = not ray.is_initialized()
        init_ray(self.cfg.ray)
        out_root = storage.join(self.work, "ray")
        shutil.rmtree(out_root, ignore_errors=True)
        flags = tuple(dict.fromkeys(self.optimizations + ("overlap",)))
        rows = [{"query_id": f"bench{i:03d}", "sample_idx": 0, "prompt": PROMPTS[i % len(PROMPTS)],
                 "negative_prompt": "", "seed": i, "aspect_ratio": ""} for i in range(n)]
        stage_cfg = StageConfig(min_actors=actors, max_actors=actors, num_gpus=1.0 if self.cuda else 0.0,
                                num_cpus=1.0, batch_size=1)
        ds = ray.data.from_items(rows, override_num_blocks=n)  # one row per block: any actor can take any row
        out = t2v.stage(ds, stage_cfg, model=self.model, video=self.video, out_root=out_root, device=None,
                        dtype=self.cfg.dtype, optimizations=flags,
                        warmup_steps=self.cfg.warmup_steps if self.cfg.warmup > 0 else 0, timings=True)
        placement.start_together(out, timeout_s=1800)  # no actor takes rows before every actor has loaded and compiled
        t_submit = time.time()
        results = list(out.iter_rows())
        errors = [r["error"] for r in results if r["error"]]
        timings = sorted((json.loads(r["timings_json"]) for r in results if not r["error"]), key=lambda t: t["done_at"])
        done = [t["done_at"] for t in timings]
        by_actor: dict = {}
        for t in timings:
            by_actor.setdefault(t.get("actor"), []).append(t["done_at"])
        rates = [common.steady_rate(d) for d in by_actor.values()]
        # an actor that finished a single video has no gap of its own: fall back to the merged stream
        rate = sum(rates) if rates and None not in rates else common.steady_rate(done)
        bare = (self.record.get("optimized") or {}).get("videos_per_s")
        first = sorted(results, key=lambda r: r["seed"])[0]
        match = None
        if not first["error"] and self.frames.get("optimized"):
            match = common.psnr(video_io.read_frames(first["video_uri"]),
                                video_io.read_frames(storage.join(self.work, "optimized", "000.mp4")))
        if started_here:
            ray.shutdown()
        return {
            "flags": list(flags), "videos": n, "errors": errors,
            "stage": {"actors": actors, "num_gpus": stage_cfg.num_gpus, "batch_size": 1,
                      "max_concurrent_calls_per_actor": 2, "max_tasks_in_flight_per_actor": 2,
                      "start": "every actor loaded before the first row (wait_for_min_actors_s)"},
            "videos_by_actor": sorted(len(d) for d in by_actor.values()),
            "videos_per_s": rate, "videos_per_s_span": common.span_rate(done), "rows": len(results),
            "ratio_vs_bare_loop": round(rate / bare, 3) if rate and bare else None,
            "first_video_after_s": round(done[0] - t_submit, 1) if done else None,
            "intervals_s": intervals(done),
            "denoise_s": _mean(t["denoise_s"] for t in timings), "vae_decode_s": _mean(t["decode_s"] for t in timings),
            "mp4_encode_s": _mean(t["encode_s"] for t in timings), "denoise_slot_wait_s": _mean(t["wait_s"] for t in timings),
            "per_video": [{k: round(t[k] - (done[0] if k == "done_at" else 0), 3)
                           for k in ("done_at", "wait_s", "denoise_s", "decode_s", "encode_s")} for t in timings],
            "gpu": self.sampler.window(done[0], done[-1]) if (self.sampler and len(done) > 1) else None,
            "gpus": [s.window(done[0], done[-1]) for s in samplers] if (samplers and len(done) > 1) else None,
            "psnr_vs_bare_loop_mp4_db": match,
        }

    def scaling(self) -> dict:
        """The Ray stage on 1, 2, 4, 8 actors: aggregate videos/s and efficiency vs linear."""
        import torch

        from vpo_ray.bench.nvml import GpuSampler

        cfg = self.cfg
        gpus = torch.cuda.device_count() if self.cuda else 0
        counts = cfg.scaling_actors or ((1, 2, 4, 8) if self.cuda else (1, 2))
        limit = gpus if self.cuda else 2  # on CPU the variant checks the harness, not scaling
        kept = [c for c in counts if c <= limit]
        out: dict[str, Any] = {"gpus": gpus, "videos_per_actor": cfg.scaling_videos_per_actor, "runs": {},
                               "left_out": [c for c in counts if c > limit]}
        samplers = [GpuSampler(index=i).start() for i in range(gpus)] if self.cuda else []
        try:
            for c in kept:
                common.guarded(out["runs"], str(c),
                               lambda c=c: self.ray_stage(c * cfg.scaling_videos_per_actor, actors=c,
                                                          samplers=samplers[:c]))
                self.record["scaling"] = out  # a cut-off run keeps the counts it finished
                self._save()
        finally:
            for s in samplers:
                s.stop()
        one = (out["runs"].get("1") or {}).get("videos_per_s")
        out["efficiency_vs_linear"] = {c: (round(r["videos_per_s"] / (int(c) * one), 3)
                                           if one and r.get("videos_per_s") else None)
                                       for c, r in out["runs"].items()}
        return out

    # ---------------------------------------------------------------- attention kernels

    def attention(self) -> dict:
        """DiT step time with each SDPA kernel first in torch's priority order (eager, fused QKV)."""
        from vpo_ray.pipeline import t2v

        if not self.cuda:
            return {"skipped": "SDPA kernel choice matters on CUDA only"}
        steps, out = 3, {}
        for flags in (((), ("fuse-qkv",)) if self.cfg.attention_fused_too else (("fuse-qkv",),)):
            common.free_memory(self.device)
            renderer, _ = self._renderer(flags)
            for backend in ("flash", "cudnn", "efficient"):
                key = f"{backend}{' +fuse-qkv' if flags else ''}"
                try:
                    t2v.set_sdpa_preference(backend)
                    renderer.denoise(PROMPTS[0], steps=1)  # warm-up: this kernel's first launch
                    with common.Timer(self.device) as t:
                        renderer.denoise(PROMPTS[0], steps=steps)
                    out[key] = {"dit_step_s": round(t.seconds / steps, 4)}
                except Exception as e:  # noqa: BLE001 — a kernel that rejects these shapes
                    out[key] = {"error": f"{type(e).__name__}: {e}"}
            t2v.set_sdpa_preference(None)
            del renderer
        common.free_memory(self.device)
        return {"steps_timed": steps, "mode": "eager (no compile)", "backends": out}

    # ---------------------------------------------------------------- caches and memory

    def cache_variant(self, flag: str, n: int) -> dict:
        result = self.plain_loop(flag, self.optimizations + (flag,), n)
        ref, got = self.frames.get("optimized") or [], self.frames.get(flag) or []
        result["psnr_vs_optimized_db"] = [common.psnr(a, b) for a, b in zip(got, ref)]
        exact = (self.record.get("optimized") or {}).get("seconds_per_video")
        if exact:
            result["speedup_vs_optimized"] = round(exact / result["seconds_per_video"], 2)
        return result

    def quantized_variant(self, flag_set: str, n: int) -> dict:
        """optimizations with the flags of `flag_set` ("linear=fp8", "attn=flash,linear=fp8") replacing same-named ones."""
        if not self.cuda:
            return {"skipped": "FP8 GEMMs need CUDA"}
        swap = [f for f in flag_set.split(",") if f]
        names = {f.partition("=")[0] for f in swap}
        flags = tuple(f for f in self.optimizations if f.partition("=")[0] not in names) + tuple(swap)
        result = self.plain_loop(flag_set, flags, n)
        result["flags"] = list(flags)
        for ref in ("optimized", "baseline"):
            if self.frames.get(ref) and self.frames.get(flag_set):
                result[f"vs_{ref}"] = compare(self.frames[ref][0], self.frames[flag_set][0],
                                              self.latents.get(ref), self.latents.get(flag_set))
        exact = (self.record.get("optimized") or {}).get("seconds_per_video")
        if exact and result.get("seconds_per_video"):
            result["speedup_vs_optimized"] = round(exact / result["seconds_per_video"], 3)
        return result

    def memory(self) -> dict:
        if not self.cuda:
            return {"skipped": "peak GPU memory needs CUDA"}
        video = dataclasses.replace(self.video, num_inference_steps=self.cfg.memory_steps)
        out = {"steps": self.cfg.memory_steps, "text_encoder_params": self._text_encoder_params(), "modes": {}}
        for mode in self.cfg.memory_modes:
            flags = tuple(f for f in mode.split(",") if f)
            common.free_memory(self.device)
            try:
                renderer, _ = self._renderer(flags, video, warm=False)
                with common.Timer(self.device) as t:
                    renderer.render(PROMPTS[0], seed=0)
                out["modes"][mode] = {"seconds": round(t.seconds, 2), **common.peak_memory(self.device)}
                del renderer
            except Exception as e:  # noqa: BLE001
                out["modes"][mode] = {"error": f"{type(e).__name__}: {e}"}
            common.free_memory(self.device)
        return out

    def _text_encoder_params(self) -> Optional[int]:
        """Parameters of the (left out) text encoder, counted on the meta device."""
        try:
            from accelerate import init_empty_weights

            from vpo_ray.models import registry

            with init_empty_weights():
                enc = registry.random_init_from_config(self.spec, ["text_encoder"], device="meta")["text_encoder"]
            return sum(p.numel() for p in enc.parameters())
        except Exception:  # noqa: BLE001 — tiny presets ship no text_encoder.json
            return None

    # ---------------------------------------------------------------- driver

    def _text_encoder_note(self) -> str:
        if self.text_shape is None:
            return "the preset's own text encoder, included in the denoise time"
        return (f"replaced by fixed pseudo-random prompt embeddings of the encoder's output shape "
                f"{list(self.text_shape)} (max_sequence_length x d_model, from a hash of the prompt); "
                "text encoding time and memory are not included")

    def _save(self) -> None:
        self.record["text_encoder"] = self._text_encoder_note()
        self.record["notes"] = self.notes
        common.write_record(self.cfg.out, self.stem, self.record)

    def run(self) -> dict:
        from vpo_ray.bench.nvml import GpuSampler
        from vpo_ray.bench.plotting import plot_scaling, plot_video_sampling

        cfg = self.cfg
        storage.makedirs(cfg.out)
        self.record = {
            "benchmark": "video-sampling", "preset": cfg.preset, "model": self.model,
            "weights": "tiny preset" if self.spec.tiny else "random (real architecture config)",
            "video": dataclasses.asdict(self.video), "device": common.device_facts(self.device),
            "versions": common.versions(), "mp4_encoder": mp4_encoder(),
            "config": {"videos": cfg.videos, "warmup": cfg.warmup, "warmup_steps": cfg.warmup_steps,
                       "dtype": cfg.dtype or ("bfloat16" if self.cuda else "float32"), "variants": list(cfg.variants),
                       "baseline": list(cfg.baseline), "optimizations": list(self.optimizations),
                       "quantized": list(cfg.quantized), "caches": list(cfg.caches)},
            "warmup_note": f"each variant first renders {cfg.warmup} warm-up clip(s) of {cfg.warmup_steps} steps, "
                           "excluded from all figures",
        }
        t_ref = time.time()
        self.sampler = GpuSampler().start() if self.cuda else None
        try:
            self.record["gpu_sampler"] = self.sampler.source if self.sampler else "none"
            self.record["matmul_ceiling_tflops"] = common.matmul_ceiling_tflops(self.device)
            for variant in cfg.variants:
                self._run_variant(variant)
                self._save()
        finally:
            if self.sampler:
                self.sampler.stop()
        self.record["summary"] = summarize(self.record)
        png = storage.join(cfg.out, f"{self.stem}.png")
        plot_video_sampling(self.record, self.sampler.trace(t_ref) if self.sampler else [], png)
        self.record["png"] = png
        if isinstance(self.record.get("scaling"), dict) and self.record["scaling"].get("runs"):
            self.record["scaling"]["png"] = storage.join(cfg.out, f"{self.stem}_scaling.png")
            plot_scaling(self.record, self.record["scaling"]["png"])
        self._save()
        return self.record

    def _run_variant(self, variant: str) -> None:
        cfg, rec = self.cfg, self.record
        if variant == "baseline":
            common.guarded(rec, "baseline", lambda: self.plain_loop("baseline", self._device_flags(cfg.baseline),
                                                                    cfg.baseline_videos))
        elif variant == "optimized":
            res = common.guarded(rec, "optimized", lambda: self.plain_loop("optimized", self.optimizations, cfg.videos))
            if "error" not in res and self.frames.get("baseline"):
                res["vs_baseline"] = compare(self.frames["baseline"][0], self.frames["optimized"][0],
                                             self.latents.get("baseline"), self.latents.get("optimized"))
        elif variant == "attention":
            common.guarded(rec, "attention", self.attention)
        elif variant == "ray":
            common.guarded(rec, "ray", lambda: self.ray_stage(cfg.videos))
        elif variant == "scaling":
            common.guarded(rec, "scaling", self.scaling)
        elif variant == "quantized":
            rec["quantized"] = {}
            for flag_set in cfg.quantized:
                common.guarded(rec["quantized"], flag_set, lambda f=flag_set: self.quantized_variant(f, cfg.videos))
        elif variant == "cache":
            rec["cache"] = {}
            for flag in cfg.caches:
                common.guarded(rec["cache"], flag, lambda f=flag: self.cache_variant(f, cfg.cache_videos))
        elif variant == "memory":
            common.guarded(rec, "memory", self.memory)
        else:
            raise ValueError(f"variants: unknown variant {variant!r}")


def mp4_encoder() -> str:
    """Which ffmpeg writes the mp4s (IMAGEIO_FFMPEG_EXE may point at benchmarks/ffmpeg_shim.py)."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception as e:  # noqa: BLE001
        return f"none ({e})"


def compare(a, b, la, lb) -> dict:
    import numpy as np

    out = {"psnr_db": common.psnr(a, b),
           "max_abs_diff_uint8": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) if a.shape == b.shape else None}
    if la is not None and lb is not None and la.shape == lb.shape:
        out["latent_rel_l2"] = float((la - lb).norm() / lb.norm().clamp_min(1e-12))
    return out


def intervals(done: list[float]) -> list[float]:
    """Seconds between consecutive completions (the steady-state rate is their count over their sum)."""
    return [round(b - a, 3) for a, b in zip(done, done[1:])]


def _mean(values) -> Optional[float]:
    v = list(values)
    return round(sum(v) / len(v), 3) if v else None


def summarize(rec: dict) -> dict:
    """The headline numbers in one flat mapping (what the README table shows)."""
    def get(*path):
        node = rec
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return None
            node = node[p]
        return node

    out = {"device": get("device", "name"), "preset": rec.get("preset")}
    for v in ("baseline", "optimized"):
        out[f"{v}_s_per_video"] = get(v, "seconds_per_video")
        out[f"{v}_dit_step_s"] = get(v, "dit_step_s")
        out[f"{v}_vae_decode_s"] = get(v, "vae_decode_s")
        out[f"{v}_tflops"] = get(v, "dit_tflops")
        out[f"{v}_mfu"] = get(v, "mfu")
        out[f"{v}_peak_gib"] = get(v, "peak_allocated_gib")
    out["bare_loop_videos_per_s"] = get("optimized", "videos_per_s")
    out["bare_loop_gpu_busy"] = get("optimized", "gpu", "busy_fraction")
    out["ray_videos_per_s"] = get("ray", "videos_per_s")
    out["ray_vs_bare"] = get("ray", "ratio_vs_bare_loop")
    out["ray_gpu_busy"] = get("ray", "gpu", "busy_fraction")
    for c, eff in (get("scaling", "efficiency_vs_linear") or {}).items():
        out[f"scaling[{c} actors]_videos_per_s"] = get("scaling", "runs", c, "videos_per_s")
        out[f"scaling[{c} actors]_efficiency"] = eff
    out["optimized_vs_baseline_psnr_db"] = get("optimized", "vs_baseline", "psnr_db")
    for flag_set, res in (rec.get("quantized") or {}).items():
        out[f"{flag_set}_s_per_video"] = res.get("seconds_per_video")
        out[f"{flag_set}_dit_step_s"] = res.get("dit_step_s")
        out[f"{flag_set}_psnr_vs_baseline_db"] = (res.get("vs_baseline") or {}).get("psnr_db")
    for flag, res in (rec.get("cache") or {}).items():
        out[f"{flag}_s_per_video"] = res.get("seconds_per_video")
        out[f"{flag}_psnr_db"] = res.get("psnr_vs_optimized_db")
    for mode, res in (get("memory", "modes") or {}).items():
        out[f"memory[{mode}]_peak_gib"] = res.get("peak_allocated_gib")
    return out


def run(cfg: BenchConfig) -> dict:
    return VideoSamplingBench(cfg).run()
