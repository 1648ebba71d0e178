"""The pip steps of a bundle: build the vpo_ray wheel, stand-ins for skipped packages, resolve
for the target, build sdist-only dependencies, choose what goes in, download and check hashes."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from vpo_ray.bundle.files import sha256_of
from vpo_ray.bundle.spec import STUB_LOCAL, BundleError, BundleSpec
from vpo_ray.bundle.tags import canonical, req_name, skipped, target_args, wheel_fits


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
    root = Path(spec.project) if spec.project else Path(__file__).resolve().parents[2]  # vpo_ray/bundle/ -> the tree
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
