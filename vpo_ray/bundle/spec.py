"""What a bundle is for (BundleSpec, also the `--config` YAML) and the error every step raises."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # torch>=2.6 CUDA wheels are manylinux_2_28 only
DEFAULT_TORCH_SPEC = "torch==2.13.0"  # same release as the Makefile's CPU pin and cluster/Dockerfile
STUB_LOCAL = "vpostub"  # local version label of stand-in wheels; they never enter a bundle
CHUNK = 8 << 20  # bytes per read when hashing, compressing or splitting a wheel


class BundleError(RuntimeError):
    """The bundle cannot be built; the message names the package or file at fault."""


@dataclass(frozen=True)
class BundleSpec:
    """What `--config FILE` may hold (same names as the flags; a flag given replaces it)."""
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"  # target X.Y
    platform: str = DEFAULT_PLATFORM  # target's newest platform tag
    out: str = ""  # bundle folder; must be empty or absent
    max_wheel_mb: Optional[float] = None  # None: wheels stored as they are
    extra: tuple[str, ...] = ()  # more requirements to bundle (pip specifiers)
    skip: tuple[str, ...] = ()  # fnmatch patterns, or NAME==VERSION to pin the stand-in
    torch_spec: str = DEFAULT_TORCH_SPEC  # the torch requirement (exact when torch is skipped)
    find_links: tuple[str, ...] = ()  # folders of prebuilt wheels (e.g. sdist-only deps)
    project: Optional[str] = None  # vpo_ray source tree; None = the one this module is in
    xz_preset: int = 1  # wheels are deflate zips: xz -6 gains little over -1 and is ~5x slower
    strict_platform: bool = False  # False: an older tag that cannot resolve falls back to manylinux_2_28
