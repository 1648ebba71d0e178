"""One PNG per benchmark record (matplotlib, Agg backend; small files: ~100 dpi)."""
from __future__ import annotations

import io
from typing import Optional

from vpo_ray import storage


def _figure(rows: int, cols: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    fig.suptitle(title, fontsize=10)
    return fig, axes


def _save(fig, uri: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes(uri, buf.getvalue())


def _empty(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=9, transform=ax.transAxes)
    ax.set_axis_off()


def plot_video_sampling(rec: dict, trace: list, uri: str) -> None:
    """Seconds per video by part, videos/s bare vs Ray, GPU utilization over time, peak memory by mode."""
    dev = (rec.get("device") or {}).get("name", "?")
    v = rec.get("video") or {}
    fig, ax = _figure(2, 2, f"video-sampling {rec.get('preset')} on {dev}: {v.get('num_frames')}x{v.get('height')}x"
                            f"{v.get('width')}, {v.get('num_inference_steps')} steps, CFG {v.get('guidance_scale')}")
    # (a) seconds per video, stacked by part
    variants = [(k, rec[k]) for k in ("baseline", "optimized") if isinstance(rec.get(k), dict) and "denoise_s" in rec[k]]
    variants += [(k, r) for k, r in (rec.get("quantized") or {}).items() if "denoise_s" in r]
    variants += [(k, r) for k, r in (rec.get("cache") or {}).items() if "denoise_s" in r]
    a = ax[0][0]
    if variants:
        names = [k.replace("cache=", "") for k, _ in variants]
        bottom = [0.0] * len(variants)
        for part, color in (("denoise_s", "tab:blue"), ("vae_decode_s", "tab:orange"), ("mp4_encode_s", "tab:green")):
            vals = [r.get(part) or 0.0 for _, r in variants]
            a.bar(names, vals, bottom=bottom, color=color, label=part.replace("_s", ""))
            bottom = [b + x for b, x in zip(bottom, vals)]
        for i, total in enumerate(bottom):
            a.text(i, total, f"{total:.2f}s", ha="center", va="bottom", fontsize=8)
        a.set_ylabel("seconds per video")
        a.legend(fontsize=7)
        a.tick_params(axis="x", labelsize=7)
    else:
        _empty(a, "no timed variant")
    # (b) videos/s: bare loop vs Ray Data stage
    b = ax[0][1]
    bare = (rec.get("optimized") or {}).get("videos_per_s")
    ray = (rec.get("ray") or {}).get("videos_per_s")
    if bare or ray:
        b.bar(["bare loop", "Ray Data stage"], [bare or 0, ray or 0], color=["tab:gray", "tab:purple"])
        ratio = (rec.get("ray") or {}).get("ratio_vs_bare_loop")
        b.set_title(f"steady-state videos/s (Ray / bare = {ratio})", fontsize=9)
        b.set_ylabel("videos per second")
    else:
        _empty(b, "no throughput measured")
    # (c) GPU utilization over time
    c = ax[1][0]
    if trace:
        c.plot([t for t, _ in trace], [u for _, u in trace], lw=0.6)
        c.set_xlabel("seconds since start")
        c.set_ylabel("GPU utilization %")
        c.set_ylim(0, 105)
        busy = {k: ((rec.get(k) or {}).get("gpu") or {}).get("busy_fraction") for k in ("optimized", "ray")}
        c.set_title("NVML utilization; steady-state busy: " + ", ".join(
            f"{k} {x:.2f}" for k, x in busy.items() if x is not None), fontsize=9)
    else:
        _empty(c, f"no GPU utilization samples ({rec.get('gpu_sampler', 'none')})")
    # (d) peak memory by mode
    d = ax[1][1]
    modes = {m: r for m, r in ((rec.get("memory") or {}).get("modes") or {}).items() if r.get("peak_allocated_gib")}
    if modes:
        d.barh(list(modes), [r["peak_allocated_gib"] for r in modes.values()], color="tab:red")
        d.set_xlabel("peak GPU memory allocated, GiB (one video)")
        d.tick_params(axis="y", labelsize=7)
    else:
        _empty(d, "no memory probes (" + str((rec.get("memory") or {}).get("skipped", "not run")) + ")")
    _save(fig, uri)


def plot_bars(title: str, groups: dict, ylabel: str, uri: str, note: Optional[str] = None) -> None:
    """Grouped bars: {group: {series: value}} (llm-stages, train-step)."""
    fig, ax = _figure(1, 1, title)
    a = ax[0][0]
    series = sorted({s for g in groups.values() for s in g})
    if not groups or not series:
        _empty(a, "nothing measured")
        _save(fig, uri)
        return
    width = 0.8 / len(series)
    for j, s in enumerate(series):
        xs = [i + j * width for i in range(len(groups))]
        vals = [(g.get(s) or 0.0) for g in groups.values()]
        a.bar(xs, vals, width=width, label=s)
        for x, val in zip(xs, vals):
            a.text(x, val, f"{val:.3g}", ha="center", va="bottom", fontsize=7)
    a.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))])
    a.set_xticklabels(list(groups), fontsize=8)
    a.set_ylabel(ylabel)
    a.legend(fontsize=8)
    if note:
        a.set_title(note, fontsize=8)
    _save(fig, uri)


def plot_scaling(rec: dict, uri: str) -> None:
    """Ray stage videos/s against actor count (one GPU each), with linear scaling for reference."""
    sc = rec.get("scaling") or {}
    runs = {int(c): r for c, r in (sc.get("runs") or {}).items() if r.get("videos_per_s")}
    dev = (rec.get("device") or {}).get("name", "?")
    fig, ax = _figure(1, 1, f"video-sampling {rec.get('preset')}: Ray stage scaling on {dev}")
    a = ax[0][0]
    if not runs:
        _empty(a, "no scaling run finished")
        _save(fig, uri)
        return
    counts = sorted(runs)
    rates = [runs[c]["videos_per_s"] for c in counts]
    a.bar([str(c) for c in counts], rates, color="tab:blue", label="measured")
    if 1 in runs:
        a.plot([str(c) for c in counts], [c * runs[1]["videos_per_s"] for c in counts], "k--", label="linear")
    eff = sc.get("efficiency_vs_linear") or {}
    for i, c in enumerate(counts):
        busy = [g.get("busy_fraction") for g in (runs[c].get("gpus") or []) if g.get("busy_fraction") is not None]
        label = f"{rates[i]:.3g}/s"
        if eff.get(str(c)) is not None:
            label += f"\neff {eff[str(c)]:.2f}"
        if busy:
            label += f"\nbusy {min(busy):.2f}-{max(busy):.2f}"
        a.text(i, rates[i], label, ha="center", va="bottom", fontsize=7)
    a.set_xlabel("actors (one GPU each)")
    a.set_ylabel("videos / s")
    a.legend(fontsize=8)
    _save(fig, uri)


def plot_pipeline(rec: dict, traces: list, events: list, t_ref: float, uri: str) -> None:
    """Per-GPU busy timeline (NVML), each pool's actors at work over time, GPU-hours by stage."""
    dev = (rec.get("device") or {}).get("name", "?")
    e2e = rec.get("end_to_end") or {}
    fig, ax = _figure(3, 1, f"vpo generate dpo, preset {rec.get('preset')} (weights {rec.get('weights')}) on {dev}: "
                            f"{e2e.get('videos')} videos, {e2e.get('videos_per_s')} videos/s steady")
    fig.set_size_inches(10, 9)
    win = rec.get("steady_window") or {}
    a = ax[0][0]
    if any(traces):
        for i, trace in enumerate(traces):
            a.plot([t for t, _ in trace], [u for _, u in trace], lw=0.7, label=f"GPU {i}")
        a.set_ylim(0, 105)
        a.set_ylabel("utilization %")
        a.legend(fontsize=7, ncol=4)
        busy = [g.get("busy_fraction") for g in rec.get("gpus") or []]
        a.set_title("NVML utilization per GPU; steady window shaded; busy " +
                    ", ".join(f"{b:.2f}" for b in busy if b is not None), fontsize=9)
    else:
        _empty(a, "no GPU utilization samples (no GPU)")
    b = ax[1][0]
    actors = sorted({(e["pool"], e["actor"]) for e in events})
    for row, (pool, actor) in enumerate(actors):
        spans = [(e["t0"] - t_ref, e["t1"] - e["t0"]) for e in events
                 if e["pool"] == pool and e["actor"] == actor and e["kind"] == "call"]
        loads = [(e["t0"] - t_ref, e["t1"] - e["t0"]) for e in events
                 if e["pool"] == pool and e["actor"] == actor and e["kind"] == "ready"]
        b.broken_barh(loads, (row - 0.4, 0.8), color="lightgray")
        b.broken_barh(spans, (row - 0.4, 0.8), color=f"C{sorted({p for p, _ in actors}).index(pool)}")
    b.set_yticks(range(len(actors)))
    b.set_yticklabels([f"{p} {a.split('@')[0]}" for p, a in actors], fontsize=6)
    b.set_xlabel("seconds since start (gray: loading, colour: in a call)")
    for axis in (a, b) if any(traces) else (b,):
        if win.get("seconds"):
            axis.axvspan(win["start_s"], win["end_s"], color="green", alpha=0.1)
    c = ax[2][0]
    split = e2e.get("gpu_hours_by_stage") or {}
    if split:
        c.bar(list(split), list(split.values()), color="tab:blue")
        c.set_ylabel("GPU-hours / 1,000 queries")
        c.set_title(f"total {e2e.get('gpu_hours_per_1000_queries')} GPU-hours per 1,000 queries (steady state, "
                    "extrapolated), split by busy time", fontsize=9)
    else:
        _empty(c, "no GPU-hour figure (no GPU or no steady window)")
    _save(fig, uri)


def plot_llm_stages(rec: dict, uri: str) -> None:
    """Rewrite/critique/refine tok/s per variant, verdict prompt tok/s (old path vs bucketed), rows/s of
    every stage (old path vs engine), videos/s."""
    dev = (rec.get("device") or {}).get("name", "?")
    fig, ax = _figure(4, 1, f"llm-stages {rec.get('preset')} on {dev} (log scale; label: value, bandwidth or MFU share)")
    fig.set_size_inches(9, 14)
    table = rec.get("table") or []

    def of(stages, key):
        return [r for r in table if r["stage"] in stages and r.get(key)]

    panels = (("decode: generated tok/s", "tok_s", of(("rewrite", "critique", "refine"), "tok_s")),
              ("verdict prefill: prompt tok/s", "prompt_tok_s", of(("verdict",), "prompt_tok_s")),
              ("rows/s per stage: old path vs engine", "rows_per_s",
               [r for r in table if r.get("compare") and r.get("rows_per_s")]),
              ("video judge: videos/s", "videos_per_s", of(("video judge",), "videos_per_s")))
    for (a,), (title, key, rows) in zip(ax, panels):
        if not rows:
            _empty(a, f"{title}: not measured")
            continue
        labels = [f"{r['model']} {r['stage']}: {r['variant']}" for r in rows]
        vals = [r[key] for r in rows]
        a.barh(range(len(rows)), vals, color=["tab:gray" if r.get("compare") == "old" else "tab:blue" for r in rows])
        for i, v in enumerate(vals):
            share = rows[i].get("bandwidth_util_datasheet") or rows[i].get("mfu_datasheet")
            gain = rows[i].get("x_old_path") if key == "rows_per_s" else None
            a.text(v, i, f" {v:.3g}" + (f" ({share:.0%})" if share and not gain else "") +
                   (f" ({gain:g}x old)" if gain and rows[i].get("compare") == "engine" else ""), va="center", fontsize=7)
        a.set_yticks(range(len(rows)))
        a.set_yticklabels(labels, fontsize=7)
        a.invert_yaxis()
        a.set_xscale("log")
        a.set_xlim(left=min(vals) / 3)
        a.set_title(title, fontsize=9)
    _save(fig, uri)
