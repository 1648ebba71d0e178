"""cluster/Dockerfile builds into an OCI image with buildah (Debian's package), on a stand-in base.

What this machine allows (cluster/README.md says the same): buildah 1.28 builds with
`--isolation chroot` (its default runtime, crun, stops at "cgroups in hybrid mode not
supported"), and no container registry resolves, so `rayproject/ray:<ray>-py312-gpu` cannot
be pulled. So the real Dockerfile is built with BASE_IMAGE set to a stand-in made here from
this machine's Python: a `ray` user (uid 1000, gid 100, as in Ray's images), busybox's
`wget`, real pip/setuptools/wheel/PyYAML, and metadata-only records standing in for the
heavy dependencies (torch, ray, transformers, ...: no code), with PIP_NO_INDEX=1 so the
dependency step must be satisfied without a download. What is checked is what the
Dockerfile decides: it builds; the image runs as `ray`, not root; `wget` is there for
KubeRay's probes; vpo_ray is installed and `jobs` imports from any directory; a code edit
reuses the dependency layer and rebuilds only the code layers.

`make test` installs buildah (`make image-tools`); without it this module is skipped.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILDAH = shutil.which("buildah")
BUSYBOX = shutil.which("busybox")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800),
              pytest.mark.skipif(not (BUILDAH and BUSYBOX and os.geteuid() == 0),
                                 reason="needs buildah and busybox as root (make image-tools)")]
REAL = ("pip", "setuptools", "wheel", "packaging", "pyyaml")  # installed for real in the stand-in
APPLETS = ("sh", "wget", "id", "whoami", "ls", "cat", "env", "mkdir", "rm", "chmod", "chown", "cp", "mv", "grep")


class Buildah:
    """buildah with its own storage under the test's folder (nothing shared with the machine's)."""

    def __init__(self, root: Path):
        self.flags = ["--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "overlay"]

    def __call__(self, *args: str, timeout: float = 900) -> str:
        proc = subprocess.run([BUILDAH, *self.flags, *args], capture_output=True, text=True, timeout=timeout)
        assert proc.returncode == 0, f"buildah {' '.join(args)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    def clean_up(self, root: Path) -> None:
        """Remove the containers and images, then the storage's own mounts, then the folder."""
        self("rm", "--all")
        self("rmi", "--all", "--force")
        with open("/proc/mounts") as f:
            mounts = [line.split()[1] for line in f if str(root) in line.split()[1]]
        for m in sorted(mounts, reverse=True):
            subprocess.run(["umount", m], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)

    def build(self, context: Path, tag: str, *extra: str) -> str:
        return self("bud", "--isolation", "chroot", "--layers", "-f", str(context / "cluster" / "Dockerfile"),
                    "-t", tag, *extra, str(context))


def _shared_libs(binaries: list[Path]) -> set[str]:
    libs = set()
    for b in binaries:
        out = subprocess.run(["ldd", str(b)], capture_output=True, text=True).stdout
        libs |= set(re.findall(r"(/\S+\.so[.\d]*)", out))
    return libs


def _requirement_names() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return sorted({re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0] for d in deps} | {"torch", "ray"})


def _stand_in_records(site: Path) -> None:
    """dist-info records (name, version) for every heavy dependency: pip sees them installed."""
    for name in _requirement_names():
        if name.lower() in REAL:
            continue
        version = importlib.metadata.version(name).split("+")[0]
        info = site / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        (info / "INSTALLER").write_text("vpo-test-stand-in\n")
        (info / "RECORD").write_text("")


def _stand_in_rootfs(root: Path) -> Path:
    """A root filesystem: this machine's Python at /opt/python, busybox, a `ray` user."""
    fs = root / "rootfs"
    prefix = Path(sys.base_prefix)
    py = fs / "opt" / "python"
    shutil.copytree(prefix, py, symlinks=True, ignore=shutil.ignore_patterns(
        "site-packages", "test", "tests", "__pycache__", "idlelib", "tkinter", "turtledemo", "bin"))
    (py / "bin").mkdir()
    shutil.copy2(Path(sys.executable).resolve(), py / "bin" / "python3.11")
    for alias in ("python", "python3"):
        (py / "bin" / alias).symlink_to("python3.11")
    (py / "bin" / "pip").write_text('#!/bin/sh\nexec /opt/python/bin/python3.11 -m pip "$@"\n')
    (py / "bin" / "pip").chmod(0o755)
    site = py / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    site.mkdir()
    for dist in REAL:
        d = importlib.metadata.distribution(dist)
        for f in d.files or []:
            src = Path(d.locate_file(f))
            if src.is_file() and ".." not in f.parts and "bin" not in f.parts:
                (site / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, site / f)
    assert (site / "yaml").is_dir() and (site / "pip").is_dir()
    _stand_in_records(site)
    dynload = list((py / "lib").rglob("lib-dynload/*.so")) + [py / "bin" / "python3.11"]
    for lib in _shared_libs(dynload) | {"/lib64/ld-linux-x86-64.so.2"}:
        if not lib.startswith(str(prefix)):
            (fs / lib.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.realpath(lib), fs / lib.lstrip("/"))
    (fs / "bin").mkdir()
    shutil.copy2(BUSYBOX, fs / "bin" / "busybox")
    for applet in APPLETS:
        (fs / "bin" / applet).symlink_to("busybox")
    (fs / "etc").mkdir()
    (fs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nray:x:1000:100:ray:/home/ray:/bin/sh\n")
    (fs / "etc" / "group").write_text("root:x:0:\nusers:x:100:ray\n")
    for d in ("tmp", "root", "home/ray"):
        (fs / d).mkdir(parents=True)
    return fs


STAND_IN = """FROM scratch
COPY rootfs/ /
RUN ["/bin/busybox", "sh", "-c", "chmod 1777 /tmp && chown -R 1000:100 /home/ray /opt/python"]
ENV PATH=/opt/python/bin:/bin LD_LIBRARY_PATH=/opt/python/lib PIP_NO_INDEX=1 HOME=/home/ray
USER ray
"""


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("image")
    bah = Buildah(root)
    _stand_in_rootfs(root)
    (root / "Containerfile").write_text(STAND_IN)
    base = f"localhost/vpo-stand-in-base:{uuid.uuid4().hex[:8]}"
    bah("bud", "--isolation", "chroot", "-f", str(root / "Containerfile"), "-t", base, str(root))
    context = root / "context"  # what `docker build ... .` sends: the files the Dockerfile copies
    context.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, context / name)
    for name in ("vpo_ray", "jobs", "cluster"):
        shutil.copytree(REPO / name, context / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    first = bah.build(context, "localhost/vpo-ray:test", "--build-arg", f"BASE_IMAGE={base}")
    try:
        yield bah, context, base, first
    finally:
        bah.clean_up(root)


def _run(bah: Buildah, image: str, script: str) -> str:
    ctr = bah("from", image).strip()
    try:
        return bah("run", "--isolation", "chroot", ctr, "--", "sh", "-c", script)
    finally:
        bah("rm", ctr)


def test_image_runs_as_ray_with_wget_and_vpo_ray(built):
    bah, _, _, _ = built
    assert bah("inspect", "--format", "{{.OCIv1.Config.User}}", "localhost/vpo-ray:test").strip() == "ray"
    out = _run(bah, "localhost/vpo-ray:test",
               "id -u; command -v wget; cd / && python -c 'import vpo_ray.runs, jobs.build_sft; print(\"ok\")'; "
               "pip show vpo_ray | grep -i '^version'; env | grep -E '^VPO_UMASK='").splitlines()
    assert out[0] == "1000" and out[1].endswith("wget") and out[2] == "ok", out
    assert out[3].split() == ["Version:", "0.1.0"] and out[4] == "VPO_UMASK=022", out


def _cached_steps(log: str) -> dict[str, bool]:
    """{instruction: came from the cache} of a `buildah bud --layers` log."""
    steps, current = {}, None
    for line in log.splitlines():
        m = re.match(r"STEP \d+/\d+: (.*)", line)
        if m:
            current = m.group(1)
            steps[current] = False
        elif current and line.startswith("--> Using cache"):
            steps[current] = True
    return steps


def test_a_code_edit_reuses_the_dependency_layer(built):
    bah, context, base, first = built
    edited = context / "vpo_ray" / "runs.py"
    edited.write_text(edited.read_text() + "\n# edited by tests/test_image.py\n")
    steps = _cached_steps(bah.build(context, "localhost/vpo-ray:test-edited", "--build-arg", f"BASE_IMAGE={base}"))
    deps = [s for s in steps if s.startswith("RUN python -c \"import tomllib")]
    code = [s for s in steps if s.startswith("COPY --chown=ray:users vpo_ray")]
    assert len(deps) == 1 and len(code) == 1, steps
    assert steps[deps[0]], "the dependency install ran again after a code edit"
    assert not steps[code[0]], "the edited code was not copied again"
    assert "Using cache" not in first  # the first build did the work
