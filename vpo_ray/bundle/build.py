"""`vpo bundle`: the steps in order (build_bundle) and the command line."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from vpo_ray.bundle.files import write_bundle_files
from vpo_ray.bundle.pip_steps import build_project_wheel, download, project_root, resolve, select, stub_pins, \
    write_stub_wheel
from vpo_ray.bundle.spec import DEFAULT_PLATFORM, DEFAULT_TORCH_SPEC, BundleError, BundleSpec
from vpo_ray.bundle.tags import newer_platform, python_tags, skipped


def build_bundle(spec: BundleSpec) -> dict:
    """Build the bundle described by `spec` into spec.out; returns the manifest."""
    started = time.time()
    if not spec.out:
        raise BundleError("--out DIR is required")
    python_tags(spec.python)
    out = Path(spec.out).resolve()
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"--out {out} exists and is not empty")
    wheels = out / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    root = project_root(spec)
    with tempfile.TemporaryDirectory(prefix="vpo-bundle-") as tmp:
        work = Path(tmp)
        local = work / "local"  # vpo_ray wheel, sdist builds
        stub_dir = work / "stubs"
        local.mkdir()
        stub_dir.mkdir()
        project_wheel = build_project_wheel(root, local)
        stubs = stub_pins(spec)
        for name, ver in stubs.items():
            write_stub_wheel(name, ver, stub_dir)
        links = [local, stub_dir, *(Path(d).resolve() for d in spec.find_links)]
        roots = [str(project_wheel), *spec.extra]
        if not skipped("torch", spec.skip) or "torch" in stubs:
            roots.append(spec.torch_spec)
        try:
            items = resolve(spec, roots, links, work)
        except BundleError as e:
            newer = newer_platform(spec.platform)
            if spec.strict_platform or newer is None:
                raise
            # Current pyarrow/torch ship manylinux_2_28 wheels only: say so, bundle for the
            # oldest tag that resolves, and record it in manifest.json and install.sh.
            print(f"vpo bundle: warning: the dependencies do not resolve for {spec.platform} "
                  f"({str(e).splitlines()[-1][:200]}); bundling for {newer} instead: the target needs "
                  f"glibc >= 2.{newer.split('_')[2]} (pass --strict-platform to fail instead)", file=sys.stderr)
            spec = dataclasses.replace(spec, platform=newer)
            items = resolve(spec, roots, links, work)
        kept, left = select(items, spec)
        download(kept, spec, [local, *links[2:]], wheels)
        max_bytes = int(spec.max_wheel_mb * (1 << 20)) if spec.max_wheel_mb else None
        return write_bundle_files(out, spec, project_wheel, kept, left, stubs, max_bytes, started)


# ---------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--python", help="target Python MAJOR.MINOR (default: this interpreter's)")
    p.add_argument("--platform", help=f"target platform tag (default {DEFAULT_PLATFORM}); older "
                   "compatible manylinux tags are added")
    p.add_argument("--out", help="bundle folder (must be empty or absent)")
    p.add_argument("--config", help="YAML with any of: " + ", ".join(BundleSpec.__dataclass_fields__))
    p.add_argument("--max-wheel-mb", type=float, dest="max_wheel_mb",
                   help="store wheels above this size xz-compressed, split into parts if still above")
    p.add_argument("--extra", action="append", metavar="PKG", help="another requirement to bundle (repeatable)")
    p.add_argument("--skip", action="append", metavar="PKG",
                   help="leave out packages matching this fnmatch pattern, or NAME==VERSION (repeatable)")
    p.add_argument("--torch-spec", dest="torch_spec", help=f"torch requirement (default {DEFAULT_TORCH_SPEC})")
    p.add_argument("--find-links", action="append", dest="find_links", metavar="DIR",
                   help="folder of prebuilt wheels to use (repeatable)")
    p.add_argument("--project", help="vpo_ray source tree (default: the one this command runs from)")
    p.add_argument("--strict-platform", action="store_true", default=None, dest="strict_platform",
                   help="fail when the dependencies have no wheels for --platform instead of falling back "
                        "to manylinux_2_28")


def spec_from_args(args: argparse.Namespace) -> BundleSpec:
    from vpo_ray.config import load_config

    fields = {k: getattr(args, k, None) for k in
              ("python", "platform", "out", "max_wheel_mb", "torch_spec", "project", "strict_platform")}
    for k in ("extra", "skip", "find_links"):
        v = getattr(args, k, None)
        fields[k] = list(v) if v else None
    return load_config(BundleSpec, getattr(args, "config", None), **fields)


def run(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    manifest = build_bundle(spec)
    mb = manifest["total_bytes"] / (1 << 20)
    print(json.dumps({"out": str(Path(spec.out).resolve()), "wheels": len(manifest["wheels"]),
                      "total_mb": round(mb, 1), "left_out": manifest["left_out"],
                      "seconds": manifest["build_seconds"]}))
    return 0
