"""The bundle's own files: big wheels xz-compressed/split, requirements.txt, install.sh and
unpack.py (from `templates/`, shipped as package data), and manifest.json (size + sha256 of all)."""
from __future__ import annotations

import hashlib
import json
import lzma
import time
from importlib import resources
from pathlib import Path
from typing import Optional

from vpo_ray.bundle.spec import CHUNK, STUB_LOCAL, BundleSpec
from vpo_ray.bundle.tags import platform_tags


def template(name: str) -> str:
    """A file of vpo_ray/bundle/templates/ as text (unpack.py runs on the target: stdlib only)."""
    return resources.files("vpo_ray.bundle").joinpath("templates", name).read_text()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def shrink(path: Path, max_bytes: int, preset: int) -> list[Path]:
    """xz-compress a wheel above the limit; cut the .xz into parts when still above it."""
    xz = path.with_name(path.name + ".xz")
    with open(path, "rb") as src, lzma.open(xz, "wb", preset=preset) as dst:
        for block in iter(lambda: src.read(CHUNK), b""):
            dst.write(block)
    path.unlink()
    if xz.stat().st_size <= max_bytes:
        return [xz]
    parts = []
    with open(xz, "rb") as src:
        idx = 0
        while True:
            part = xz.with_name(f"{xz.name}.part{idx:03d}")
            written = 0
            with open(part, "wb") as dst:
                while written < max_bytes:
                    block = src.read(min(CHUNK, max_bytes - written))
                    if not block:
                        break
                    dst.write(block)
                    written += len(block)
            if written == 0:
                part.unlink()
                break
            parts.append(part)
            idx += 1
    xz.unlink()
    return parts


def write_bundle_files(out: Path, spec: BundleSpec, project_wheel: Path, kept: list[dict],
                       left: list[dict], stubs: dict[str, str], max_bytes: Optional[int],
                       started: float) -> dict:
    wheels_dir = out / "wheels"
    wheel_entries = []
    for f in sorted(wheels_dir.glob("*.whl")):
        entry = {"wheel": f"wheels/{f.name}", "size": f.stat().st_size, "sha256": sha256_of(f)}
        stored = [f]
        if max_bytes is not None and entry["size"] > max_bytes:
            stored = shrink(f, max_bytes, spec.xz_preset)
        entry["stored_as"] = [f"wheels/{p.name}" for p in stored]
        wheel_entries.append(entry)
    version = project_wheel.name.split("-")[1]
    pins = [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in kept]
    (out / "requirements.txt").write_text("\n".join(pins) + "\n")
    (out / "unpack.py").write_text(template("unpack.py"))
    skipped_desc = [f"{n}=={v}" for n, v in sorted(stubs.items())] + \
        [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in left
         if not i["metadata"]["version"].endswith("+" + STUB_LOCAL)]
    script = (template("install.sh").replace("@VERSION@", version).replace("@PYTHON@", spec.python)
              .replace("@PLATFORM@", spec.platform)
              .replace("@SKIPPED@", ", ".join(skipped_desc) or "nothing")
              .replace("@SKIPPED_NAMES@", " ".join(s.split("==")[0] for s in skipped_desc)))
    (out / "install.sh").write_text(script)
    (out / "install.sh").chmod(0o755)
    files = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files.append({"path": p.relative_to(out).as_posix(), "size": p.stat().st_size,
                          "sha256": sha256_of(p)})
    manifest = {
        "vpo_ray_version": version,
        "python": spec.python,
        "platform": spec.platform,
        "platform_tags": platform_tags(spec.platform),
        "torch_spec": spec.torch_spec,
        "skip_patterns": list(spec.skip),
        "left_out": skipped_desc,
        "extra": list(spec.extra),
        "max_wheel_mb": spec.max_wheel_mb,
        "requirements": pins,
        "wheels": wheel_entries,
        "files": files,
        "total_bytes": sum(f["size"] for f in files),
        "created_unix": int(time.time()),
        "build_seconds": round(time.time() - started, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
