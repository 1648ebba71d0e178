"""Helpers for the video Diffusion-DPO tests: small video preference sets with latents on disk."""
from __future__ import annotations

from pathlib import Path

from vpo_ray import schema


def write_video_set(root: Path, shapes: list[tuple[tuple, tuple]], seed: int = 0) -> list[dict]:
    """video_dpo.parquet under `root` with one pair per (chosen shape, rejected shape); random latents
    saved as the renderer saves them, paths relative to `root` as `vpo generate` writes them."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from vpo_ray.pipeline.t2v import save_latents

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, (shape_w, shape_l) in enumerate(shapes):
        sides = {}
        for side, video_seed, shape in (("chosen", 0, shape_w), ("rejected", 1, shape_l)):
            rel = f"videos/q{i}_0_{video_seed}.latents.safetensors"
            save_latents(str(root / rel), torch.randn(1, *shape, generator=g), {"layout": "FCHW"})
            sides[side] = {"seed": video_seed, "video_uri": f"videos/q{i}_0_{video_seed}.mp4", "latents_uri": rel,
                           "score": 5.0 if side == "chosen" else 3.0}
        rows.append(schema.video_dpo_row(f"q{i}", 0, f"a cat playing piano, take {i}", "tiny-t2v", sides["chosen"],
                                         sides["rejected"], {"gap": 2.0}))
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema.arrow_schema("video_dpo")), root / "video_dpo.parquet")
    return rows
