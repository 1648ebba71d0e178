"""`vpo bundle`: every wheel vpo_ray needs, for one Python and one platform, in one folder.

For GPU nodes with no route to PyPI. The bundle holds the vpo_ray wheel, the wheels of its
whole runtime dependency tree resolved by pip for the *target* interpreter (not the one
running this command), `install.sh`, `unpack.py`, `requirements.txt` and `manifest.json`
(every file with size and sha256).

How it works:
1. Build the vpo_ray wheel (`pip wheel --no-deps`) from a clean copy of the source tree.
2. Resolve with `pip install --dry-run --report` and `--only-binary=:all: --python-version X
   --implementation cp --platform TAG...` (pip matches platform tags exactly, so every older
   manylinux tag the target's glibc also runs is passed too: manylinux_2_17 brings
   manylinux2014, manylinux_2_12/manylinux2010, manylinux_2_5/manylinux1).
   A dependency published only as an sdist is built here with `pip wheel`; if that gives a
   wheel the target cannot run (it is compiled for this machine), the command fails naming
   the package, and `--find-links DIR` can supply a wheel built on a matching machine.
3. `--skip NAME` leaves packages out (e.g. torch on an image that already has it). A skipped
   package that can be pinned (`torch` via `--torch-spec`, or `NAME==VERSION`) is stood in for
   by an empty stub wheel during resolution, so pip never downloads it (the CUDA torch wheel
   and its nvidia-* stack are several GB); packages reachable only through skipped ones
   (torch's nvidia-*, triton, cuda-*) drop out with it. Patterns use fnmatch (`nvidia-*`).
4. `pip download --no-deps` of exactly the resolved pins; sha256 checked against the index's.
5. Wheels above `--max-wheel-mb` are stored xz-compressed (`NAME.whl.xz`), and cut into
   `NAME.whl.xz.partNNN` pieces when still too big; `unpack.py` (stdlib only, run by
   install.sh) verifies every file against the manifest and restores them.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

DEFAULT_PLATFORM = "manylinux_2_28_x86_64"  # torch>=2.6 CUDA wheels are manylinux_2_28 only
DEFAULT_TORCH_SPEC = "torch==2.13.0"  # same release as the Makefile's CPU pin and cluster/Dockerfile
STUB_LOCAL = "vpostub"  # local version label of stand-in wheels; they never enter a bundle
CHUNK = 8 << 20


class BundleError(RuntimeError):
    """The bundle cannot be built; the message names the package or file at fault."""


@dataclass(frozen=True)
class BundleSpec:
    """What `--config FILE` may hold (same names as the flags; a flag given replaces it)."""
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"  # target X.Y
    platform: str = DEFAULT_PLATFORM  # target's newest platform tag
    out: str = ""
    max_wheel_mb: Optional[float] = None  # None: wheels stored as they are
    extra: tuple[str, ...] = ()  # more requirements to bundle (pip specifiers)
    skip: tuple[str, ...] = ()  # fnmatch patterns, or NAME==VERSION to pin the stand-in
    torch_spec: str = DEFAULT_TORCH_SPEC
    find_links: tuple[str, ...] = ()  # folders of prebuilt wheels (e.g. sdist-only deps)
    project: Optional[str] = None  # vpo_ray source tree; None = the one this module is in
    xz_preset: int = 1  # wheels are deflate zips: xz -6 gains little over -1 and is ~5x slower
    strict_platform: bool = False  # False: an older tag that cannot resolve falls back to manylinux_2_28


# ---------------------------------------------------------------------------- tags and names

def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


_REQ_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def req_name(req: str) -> str:
    m = _REQ_NAME.match(req)
    if not m:
        raise BundleError(f"cannot read a package name from requirement {req!r}")
    return canonical(m.group(1))


def platform_tags(platform: str) -> list[str]:
    """`platform` plus every older tag a system of that kind also runs, newest first.

    pip compares platform tags literally; a manylinux_2_17 system runs manylinux_2_5..2_17
    wheels, and the legacy aliases (manylinux1/2010/2014) name 2_5/2_12/2_17.
    """
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    legacy = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}
    if not m:
        lm = re.fullmatch(r"(manylinux1|manylinux2010|manylinux2014)_(\w+)", platform)
        if lm:
            major, minor = legacy[lm.group(1)]
            return platform_tags(f"manylinux_{major}_{minor}_{lm.group(2)}")
        mm = re.fullmatch(r"musllinux_(\d+)_(\d+)_(\w+)", platform)
        if mm:
            major, minor, arch = int(mm.group(1)), int(mm.group(2)), mm.group(3)
            return [f"musllinux_{major}_{m_}_{arch}" for m_ in range(minor, -1, -1)]
        return [platform]
    major, minor, arch = int(m.group(1)), int(m.group(2)), m.group(3)
    if major != 2:
        raise BundleError(f"--platform {platform}: only glibc 2.x manylinux tags are known")
    # PEP 600: manylinux1/2010 exist for x86 only, manylinux2014 for every arch
    alias_arches = {"manylinux1": ("x86_64", "i686"), "manylinux2010": ("x86_64", "i686")}
    tags = []
    for m_ in range(minor, 4, -1):
        tags.append(f"manylinux_2_{m_}_{arch}")
        for alias, (_, lminor) in legacy.items():
            if lminor == m_ and arch in alias_arches.get(alias, (arch,)):
                tags.append(f"{alias}_{arch}")
    return tags


def _newer_platform(platform: str) -> Optional[str]:
    """DEFAULT_PLATFORM's glibc tag for the same arch when `platform` is older, else None."""
    tags = platform_tags(platform)
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", tags[0])
    if not m or int(m.group(1)) >= 28:
        return None
    return f"manylinux_2_28_{m.group(2)}"


def python_tags(python: str) -> tuple[str, str]:
    m = re.fullmatch(r"(\d)\.(\d+)", python)
    if not m:
        raise BundleError(f"--python {python!r}: expected MAJOR.MINOR such as 3.12")
    return python, f"cp{m.group(1)}{m.group(2)}"


def target_args(spec: BundleSpec) -> list[str]:
    """pip options that make it choose wheels for the target instead of this interpreter."""
    version, cp = python_tags(spec.python)
    args = ["--only-binary=:all:", "--python-version", version, "--implementation", "cp",
            "--abi", cp, "--abi", "abi3", "--abi", "none"]
    for tag in platform_tags(spec.platform):
        args += ["--platform", tag]
    return args


def wheel_fits(filename: str, spec: BundleSpec) -> bool:
    """True when the wheel file's tags let the target interpreter install it."""
    parts = filename[:-len(".whl")].split("-")
    if len(parts) < 5:
        return False
    pys, abis, plats = (set(p.split(".")) for p in parts[-3:])
    _, cp = python_tags(spec.python)
    major = cp[2]
    py_ok = bool(pys & {cp, f"py{major}", f"py{cp[2:]}", "py2.py3"}) or any(
        p.startswith(f"cp{major}") and "abi3" in abis and int(p[3:] or 0) <= int(cp[3:]) for p in pys)
    abi_ok = bool(abis & {cp, "abi3", "none"})
    plat_ok = "any" in plats or bool(plats & set(platform_tags(spec.platform)))
    return py_ok and abi_ok and plat_ok


def skipped(name: str, patterns: tuple[str, ...]) -> bool:
    """`name` matches a --skip pattern (fnmatch on canonical names; NAME==VER matches NAME)."""
    n = canonical(name)
    return any(fnmatch.fnmatchcase(n, canonical(p.split("==")[0])) for p in patterns)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------- steps

def _pip(args: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise BundleError(f"{what} failed (pip exit {proc.returncode}):\n{_tail(proc)}")
    return proc


def _tail(proc: subprocess.CompletedProcess, n: int = 25) -> str:
    lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines()
             if not ln.startswith("WARNING: Location")]  # a mirror's noise, not the cause
    return "\n".join(lines[-n:])


_NO_WHEEL_FOR_TARGET = re.compile(
    r"no matching distributions available for your environment:\s*\n((?:\s+\S+\n?)+)")


def project_root(spec: BundleSpec) -> Path:
    root = Path(spec.project) if spec.project else Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "vpo_ray"' not in pyproject.read_text():
        raise BundleError(f"no vpo_ray source tree at {root} (pyproject.toml of vpo_ray missing); "
                          "pass --project DIR")
    return root


def build_project_wheel(root: Path, dest: Path) -> Path:
    """`pip wheel --no-deps` from a copy of the tree, so no build/ or egg-info lands in it."""
    with tempfile.TemporaryDirectory(prefix="vpo-bundle-src-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md", "LICENSE", "setup.cfg", "MANIFEST.in"):
            if (root / name).is_file():
                shutil.copy2(root / name, src / name)
        shutil.copytree(root / "vpo_ray", src / "vpo_ray",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        proc = _pip(["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dest), str(src)],
                    "building the vpo_ray wheel", check=False)
        if proc.returncode != 0:  # no setuptools/wheel here: let pip fetch the build backend
            _pip(["wheel", "--no-deps", "-q", "-w", str(dest), str(src)], "building the vpo_ray wheel")
    wheels = sorted(dest.glob("vpo_ray-*.whl"))
    if not wheels:
        raise BundleError(f"pip wheel produced no vpo_ray wheel in {dest}")
    return wheels[-1]


def write_stub_wheel(name: str, version: str, dest: Path) -> Path:
    """An empty wheel `name==version+vpostub` with no dependencies, for resolution only.

    PEP 440: `==V` and `<=V` ignore a local label, so the stub satisfies the same
    specifiers the real release does, and sorts above it (pip picks it, downloads nothing).
    """
    dist = re.sub(r"[-_.]+", "_", name)
    full = f"{version}+{STUB_LOCAL}"
    path = dest / f"{dist}-{full}-py3-none-any.whl"
    info = f"{dist}-{full}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {full}\n"
                            "Summary: vpo bundle stand-in for a skipped package (never installed)\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: vpo-bundle\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{k},,\n" for k in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as z:
        for k, v in files.items():
            z.writestr(k, v)
        z.writestr(f"{info}/RECORD", record)
    return path


def stub_pins(spec: BundleSpec) -> dict[str, str]:
    """Skipped packages that get a stand-in: torch (version from --torch-spec) and NAME==VER."""
    pins = {}
    for p in spec.skip:
        if "==" in p:
            name, ver = p.split("==", 1)
            pins[canonical(name)] = ver.strip()
        elif canonical(p) == "torch":
            m = re.fullmatch(r"\s*torch\s*==\s*([0-9][0-9A-Za-z.]*)\s*", spec.torch_spec)
            if not m:
                raise BundleError(f"--skip torch needs an exact --torch-spec (torch==X.Y.Z), got {spec.torch_spec!r}")
            pins["torch"] = m.group(1)
    return pins


_NO_DIST = [re.compile(r"No matching distribution found for (\S+)"),
            re.compile(r"Could not find a version that satisfies the requirement (\S+)")]


def resolve(spec: BundleSpec, roots: list[str], links: list[Path], work: Path) -> list[dict]:
    """pip's resolution for the target, as the `install` list of its --report.

    A dependency with no wheel for the target is built here from its sdist (pure-Python
    packages such as deepspeed give a py3-none-any wheel) and the resolution retried.
    """
    built: set[str] = set()
    for attempt in range(8):
        report = work / f"report-{attempt}.json"
        args = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                "--target", str(work / "dry-run-target"), *target_args(spec)]
        for d in links:
            args += ["--find-links", str(d)]
        proc = _pip(args + roots, "resolving dependencies", check=False)
        if proc.returncode == 0:
            return json.loads(report.read_text())["install"]
        text = proc.stdout + proc.stderr
        missing = next((m.group(1) for rx in _NO_DIST for m in [rx.search(text)] if m), None)
        if not missing or req_name(missing) in built:
            hint = ""
            nowheel = _NO_WHEEL_FOR_TARGET.search(text)
            if nowheel:
                names = ", ".join(nowheel.group(1).split())
                hint = (f"\n{names}: no release within the required range has a wheel for Python "
                        f"{spec.python} on {spec.platform} (or an older tag); a newer --platform such as "
                        "manylinux_2_28_x86_64 may have one, or --skip it")
            raise BundleError(f"pip could not resolve vpo_ray's dependencies for Python {spec.python} "
                              f"on {spec.platform}:\n{_tail(proc)}{hint}")
        build_sdist(missing, spec, links[0])
        built.add(req_name(missing))
    raise BundleError("dependency resolution did not settle after building 8 sdists")


def build_sdist(requirement: str, spec: BundleSpec, dest: Path) -> Path:
    name = req_name(requirement)
    before = set(dest.glob("*.whl"))
    proc = _pip(["wheel", "--no-deps", "--no-binary", name, "-q", "-w", str(dest), requirement],
                f"building {requirement} from source", check=False)
    new = sorted(set(dest.glob("*.whl")) - before)
    if proc.returncode != 0 or not new:
        raise BundleError(
            f"{name}: no wheel for Python {spec.python} on {spec.platform} on the index, and building "
            f"{requirement} from source failed. Build it on a matching machine and pass --find-links DIR, "
            f"skip it with --skip {name}, or pick another --platform.\n{_tail(proc)}")
    wheel = new[-1]
    if not wheel_fits(wheel.name, spec):
        wheel.unlink()
        raise BundleError(
            f"{name}: no wheel for Python {spec.python} on {spec.platform} on the index; building it here "
            f"gave {wheel.name}, which that target cannot install. Build it on a machine with Python "
            f"{spec.python} and {spec.platform} and pass --find-links DIR.")
    print(f"vpo bundle: built {wheel.name} from the sdist (no wheel on the index)", file=sys.stderr)
    return wheel


def select(items: list[dict], spec: BundleSpec) -> tuple[list[dict], list[dict]]:
    """Split the resolution into (kept, left out): skipped by pattern, stubs, and anything
    reachable only through those (edges from Requires-Dist, markers ignored: keeps more)."""
    by_name = {canonical(i["metadata"]["name"]): i for i in items}
    out = {n for n, i in by_name.items()
           if skipped(n, spec.skip) or i["metadata"]["version"].endswith("+" + STUB_LOCAL)}
    seen: set[str] = set()
    stack = [n for n, i in by_name.items() if i.get("requested") and n not in out]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        for dep in by_name[n]["metadata"].get("requires_dist") or []:
            d = req_name(dep)
            if d in by_name and d not in out and d not in seen:
                stack.append(d)
    kept = [by_name[n] for n in sorted(seen)]
    left = [by_name[n] for n in sorted(set(by_name) - seen)]
    return kept, left


def download(kept: list[dict], spec: BundleSpec, links: list[Path], wheels: Path) -> None:
    pins = []
    for item in kept:
        url = item["download_info"]["url"]
        if url.startswith("file://"):
            src = Path(url[len("file://"):])
            shutil.copy2(src, wheels / src.name)
        else:
            pins.append(f"{item['metadata']['name']}=={item['metadata']['version']}")
    if pins:
        req = wheels.parent / ".pins.txt"
        req.write_text("\n".join(pins) + "\n")
        args = ["download", "--no-deps", "--quiet", "-d", str(wheels), *target_args(spec), "-r", str(req)]
        for d in links:
            args += ["--find-links", str(d)]
        try:
            _pip(args, "downloading wheels")
        finally:
            req.unlink(missing_ok=True)
    on_disk = {}
    for f in wheels.glob("*.whl"):
        dist, ver = f.name.split("-")[:2]
        on_disk[(canonical(dist), ver.replace("_", "-"))] = f
    for item in kept:
        name, ver = canonical(item["metadata"]["name"]), item["metadata"]["version"]
        f = on_disk.get((name, ver))
        if f is None:
            raise BundleError(f"{name}=={ver}: resolved but no wheel landed in {wheels}")
        want = ((item["download_info"].get("archive_info") or {}).get("hashes") or {}).get("sha256")
        if want and sha256_of(f) != want:
            raise BundleError(f"{f.name}: sha256 differs from the index's ({want})")


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


# ---------------------------------------------------------------------------- bundle files

UNPACK_PY = r'''"""Verify a vpo bundle against manifest.json and restore its xz/split wheels (stdlib only).

python unpack.py BUNDLE_DIR OUT_DIR [--no-verify]
"""
import hashlib, json, lzma, os, shutil, sys

def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()

def main(argv):
    bundle, out = argv[0], argv[1]
    verify = "--no-verify" not in argv
    manifest = json.load(open(os.path.join(bundle, "manifest.json")))
    if verify:
        for f in manifest["files"]:
            p = os.path.join(bundle, f["path"])
            if not os.path.isfile(p):
                sys.exit(f"unpack: {f['path']} is missing from the bundle")
            if os.path.getsize(p) != f["size"] or sha256(p) != f["sha256"]:
                sys.exit(f"unpack: {f['path']} is damaged (size or sha256 differs from manifest.json)")
    os.makedirs(out, exist_ok=True)
    for w in manifest["wheels"]:
        if w["stored_as"] == [w["wheel"]]:
            continue
        target = os.path.join(out, os.path.basename(w["wheel"]))
        tmp = target + ".partial"
        with open(tmp, "wb") as dst:
            readers = [open(os.path.join(bundle, p), "rb") for p in w["stored_as"]]
            try:
                class Cat:
                    def __init__(self, fs): self.fs = list(fs)
                    def read(self, n=-1):
                        while self.fs:
                            b = self.fs[0].read(n)
                            if b:
                                return b
                            self.fs.pop(0)
                        return b""
                with lzma.open(Cat(readers), "rb") as src:
                    shutil.copyfileobj(src, dst, 8 << 20)
            finally:
                for r in readers:
                    r.close()
        if verify and sha256(tmp) != w["sha256"]:
            os.unlink(tmp)
            sys.exit(f"unpack: {w['wheel']} restored with a wrong sha256")
        os.replace(tmp, target)
        print(f"unpack: restored {os.path.basename(target)}")

if __name__ == "__main__":
    main(sys.argv[1:])
'''

INSTALL_SH = r'''#!/usr/bin/env bash
# Offline install of vpo_ray @VERSION@ for Python @PYTHON@ on @PLATFORM@ (made by `vpo bundle`).
#   ./install.sh                      install into $PYTHON (default python@PYTHON@, else python3)
#   ./install.sh --venv DIR           create a venv at DIR and install there
#   ./install.sh --target DIR         pip --target DIR (no dependency check against the system)
#   options: --python PY  --no-deps  --no-verify
# Left out of this bundle (the target must already have them): @SKIPPED@
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PY="${PYTHON:-}"; TARGET=""; VENV=""; NO_DEPS=0; VERIFY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET="$2"; shift 2 ;;
    --venv) VENV="$2"; shift 2 ;;
    --python) PY="$2"; shift 2 ;;
    --no-deps) NO_DEPS=1; shift ;;
    --no-verify) VERIFY="--no-verify"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$PY" ]; then PY="$(command -v python@PYTHON@ || command -v python3)"; fi
HAVE="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$HAVE" != "@PYTHON@" ]; then
  echo "install.sh: this bundle is for Python @PYTHON@, $PY is $HAVE" >&2; exit 2
fi
if [ -n "$VENV" ]; then "$PY" -m venv "$VENV"; PY="$VENV/bin/python"; fi
RESTORED="$(mktemp -d "${TMPDIR:-/tmp}/vpo-bundle.XXXXXX")"
trap 'rm -rf "$RESTORED"' EXIT
"$PY" "$HERE/unpack.py" "$HERE" "$RESTORED" $VERIFY
ARGS=(--no-index --find-links "$HERE/wheels" --find-links "$RESTORED" --disable-pip-version-check)
if [ -n "$TARGET" ]; then
  ARGS+=(--target "$TARGET")
  # pip --target resolves against an empty environment, where skipped packages cannot be found
  if [ -n "@SKIPPED_NAMES@" ]; then NO_DEPS=1; fi
fi
if [ "$NO_DEPS" = 1 ]; then ARGS+=(--no-deps); fi
PIP_CONSTRAINT= "$PY" -m pip install "${ARGS[@]}" -r "$HERE/requirements.txt"
echo "install.sh: vpo_ray @VERSION@ installed${TARGET:+ into $TARGET}"
'''


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
    (out / "unpack.py").write_text(UNPACK_PY)
    skipped_desc = [f"{n}=={v}" for n, v in sorted(stubs.items())] + \
        [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in left
         if not i["metadata"]["version"].endswith("+" + STUB_LOCAL)]
    script = (INSTALL_SH.replace("@VERSION@", version).replace("@PYTHON@", spec.python)
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
            newer = _newer_platform(spec.platform)
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
    try:
        manifest = build_bundle(spec)
    except BundleError as e:
        print(f"vpo bundle: {e}", file=sys.stderr)
        return 1
    mb = manifest["total_bytes"] / (1 << 20)
    print(json.dumps({"out": str(Path(spec.out).resolve()), "wheels": len(manifest["wheels"]),
                      "total_mb": round(mb, 1), "left_out": manifest["left_out"],
                      "seconds": manifest["build_seconds"]}))
    return 0
