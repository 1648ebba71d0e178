"""`vpo bundle`: the offline wheel bundle for air-gapped GPU nodes.

Fast tests cover tags, stand-in wheels, pruning and the xz/split round trip. The slow test
builds a real bundle for CPython 3.12 on manylinux_2_28_x86_64 with `--skip torch` (so no
CUDA torch or nvidia-* wheels are downloaded: a few hundred MB instead of several GB),
installs it with `install.sh --target` into a fresh folder using a real python3.12, and
checks what a user would: the packages import, and pip resolves the whole set offline.

Why manylinux_2_28 and not 2_17: torch 2.13 and pyarrow >= 21 (needed by datasets) publish
no manylinux_2_17 wheels, so a 2_17 bundle of this dependency set cannot exist.
Without torch on the target, a package that imports torch at import time cannot import:
for trl, peft, accelerate and deepspeed the test accepts only "No module named 'torch'" as
the failure, and the offline resolution (with a stand-in torch wheel) proves that every one of
their other dependencies is in the bundle.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vpo_ray.bundle import build as vbuild, files as vfiles, pip_steps as vsteps, spec as vspec, tags as vtags

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------- fast

def test_platform_tags_add_every_older_compatible_manylinux_tag():
    tags = vtags.platform_tags("manylinux_2_17_x86_64")
    assert tags[0] == "manylinux_2_17_x86_64"
    assert {"manylinux2014_x86_64", "manylinux_2_12_x86_64", "manylinux2010_x86_64",
            "manylinux_2_5_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_28_x86_64" not in tags  # needs a newer glibc than the target has
    assert "manylinux_2_17_x86_64" in vtags.platform_tags("manylinux_2_28_x86_64")
    assert vtags.platform_tags("manylinux2014_aarch64")[:2] == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    assert "manylinux1_aarch64" not in vtags.platform_tags("manylinux_2_28_aarch64")


def test_wheel_fits_reads_python_abi_and_platform_tags():
    spec = vspec.BundleSpec(python="3.12", platform="manylinux_2_17_x86_64")
    assert vtags.wheel_fits("deepspeed-0.19.8-py3-none-any.whl", spec)
    assert vtags.wheel_fits("decord-0.6.0-py3-none-manylinux2010_x86_64.whl", spec)
    assert vtags.wheel_fits("cryptography-50-cp311-abi3-manylinux2014_x86_64.whl", spec)
    assert not vtags.wheel_fits("x-1-cp311-cp311-manylinux_2_17_x86_64.whl", spec)  # built for this machine's 3.11
    assert not vtags.wheel_fits("x-1-cp312-cp312-manylinux_2_28_x86_64.whl", spec)


def test_stub_wheel_satisfies_the_same_specifiers_as_the_release(tmp_path):
    from packaging.requirements import Requirement
    from packaging.version import Version

    path = vsteps.write_stub_wheel("torch", "2.13.0", tmp_path)
    version = Version(path.name.split("-")[1])
    for spec in ("torch>=2.4,<=2.14.1", "torch==2.13.0", "torch>=2.13"):
        assert Requirement(spec).specifier.contains(version, prereleases=True), spec
    assert version > Version("2.13.0")  # so pip prefers it and never downloads the real one
    with zipfile.ZipFile(path) as z:
        meta = z.read(f"torch-{version}.dist-info/METADATA").decode()
    assert "Requires-Dist" not in meta


def test_skip_torch_needs_an_exact_torch_spec():
    with pytest.raises(vspec.BundleError, match="torch-spec"):
        vsteps.stub_pins(vspec.BundleSpec(skip=("torch",), torch_spec="torch>=2.4"))
    assert vsteps.stub_pins(vspec.BundleSpec(skip=("torch", "triton==3.7.1", "nvidia-*"))) == {
        "torch": "2.13.0", "triton": "3.7.1"}


def _item(name, version, requires=(), requested=False):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)},
            "requested": requested, "download_info": {"url": f"https://x/{name}-{version}.whl"}}


def test_select_drops_skipped_packages_and_what_only_they_need():
    items = [
        _item("vpo_ray", "0.1.0", ["torch>=2.4", "trl>=1", "pyyaml"], requested=True),
        _item("torch", "2.13.0", ["nvidia-cudnn-cu13==9", "triton==3.7.1; platform_system == 'Linux'", "sympy"]),
        _item("nvidia-cudnn-cu13", "9"), _item("triton", "3.7.1"), _item("sympy", "1.14"),
        _item("trl", "1.16", ["torch", "datasets"]), _item("datasets", "5.2"), _item("PyYAML", "6.0.4"),
        _item("nvidia-ml-py", "13"),
    ]
    items[-1]["metadata"]["requires_dist"] = []
    items[5]["metadata"]["requires_dist"].append("nvidia-ml-py")
    kept, left = vsteps.select(items, vspec.BundleSpec(skip=("torch",)))
    assert {vtags.canonical(i["metadata"]["name"]) for i in kept} == {
        "vpo-ray", "trl", "datasets", "pyyaml", "nvidia-ml-py"}
    assert {vtags.canonical(i["metadata"]["name"]) for i in left} == {"torch", "nvidia-cudnn-cu13", "triton", "sympy"}
    kept, _ = vsteps.select(items, vspec.BundleSpec(skip=("torch", "nvidia-*")))
    assert "nvidia-ml-py" not in {i["metadata"]["name"] for i in kept}


def _write_unpack(dest: Path) -> Path:
    path = dest / "unpack.py"
    path.write_text(vfiles.template("unpack.py"))
    return path


def test_big_wheels_are_xz_split_and_restored_byte_for_byte(tmp_path):
    bundle = tmp_path / "bundle"
    wheels = bundle / "wheels"
    wheels.mkdir(parents=True)
    payload = os.urandom(3 << 20)  # incompressible, like a wheel: xz cannot get it under 1 MiB
    wheel = wheels / "big-1.0-py3-none-any.whl"
    wheel.write_bytes(payload)
    small = wheels / "small-1.0-py3-none-any.whl"
    small.write_bytes(b"small")
    entries = []
    for f in (wheel, small):
        entry = {"wheel": f"wheels/{f.name}", "size": f.stat().st_size, "sha256": vfiles.sha256_of(f)}
        stored = vfiles.shrink(f, 1 << 20, preset=0) if entry["size"] > (1 << 20) else [f]
        entry["stored_as"] = [f"wheels/{p.name}" for p in stored]
        entries.append(entry)
    assert len(entries[0]["stored_as"]) >= 3 and all(".xz.part" in p for p in entries[0]["stored_as"])
    assert all((bundle / p).stat().st_size <= 1 << 20 for p in entries[0]["stored_as"])
    _write_unpack(bundle)
    files = [{"path": p.relative_to(bundle).as_posix(), "size": p.stat().st_size, "sha256": vfiles.sha256_of(p)}
             for p in sorted(bundle.rglob("*")) if p.is_file()]
    (bundle / "manifest.json").write_text(json.dumps({"wheels": entries, "files": files}))
    out = tmp_path / "restored"
    subprocess.run([sys.executable, str(bundle / "unpack.py"), str(bundle), str(out)], check=True)
    assert (out / wheel.name).read_bytes() == payload
    assert not (out / small.name).exists()  # stored as-is: installed straight from wheels/

    # a damaged piece is refused, naming it
    part = bundle / entries[0]["stored_as"][1]
    data = bytearray(part.read_bytes())
    data[100] ^= 0xFF
    part.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, str(bundle / "unpack.py"), str(bundle), str(tmp_path / "again")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and part.name in proc.stderr


def test_cli_parses_flags_over_the_config_file(tmp_path):
    import argparse

    cfg = tmp_path / "bundle.yaml"
    cfg.write_text("python: '3.12'\nplatform: manylinux_2_28_x86_64\nskip: [torch]\nmax_wheel_mb: 100\n")
    p = argparse.ArgumentParser()
    vbuild.add_arguments(p)
    spec = vbuild.spec_from_args(p.parse_args(["--config", str(cfg), "--out", "x", "--max-wheel-mb", "50",
                                           "--extra", "rich", "--extra", "tqdm"]))
    assert (spec.python, spec.platform, spec.skip, spec.max_wheel_mb, spec.extra, spec.out) == (
        "3.12", "manylinux_2_28_x86_64", ("torch",), 50.0, ("rich", "tqdm"), "x")


# ---------------------------------------------------------------------------- slow: a real bundle

def _python312() -> str | None:
    candidates = [os.environ.get("VPO_TEST_PYTHON312", ""), shutil.which("python3.12") or "",
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for c in candidates:
        if not c:
            continue
        try:
            out = subprocess.run([c, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out.returncode == 0 and out.stdout.strip() == "3.12":
            return c
    return None


def _pypi_reachable() -> tuple[bool, str]:
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "deepspeed"],
                              capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        return False, "pip index versions timed out"
    return proc.returncode == 0, (proc.stderr or proc.stdout).strip()[-300:]


@pytest.fixture(scope="module")
def built_bundle(tmp_path_factory):
    reachable, why = _pypi_reachable()
    if not reachable:
        pytest.skip(f"PyPI is unreachable, so no bundle can be built: {why}")
    py312 = _python312()
    if py312 is None:
        pytest.skip("no python3.12 interpreter here (set VPO_TEST_PYTHON312) to install the bundle with")
    root = tmp_path_factory.mktemp("bundle")
    cfg = root / "bundle.yaml"
    # max_wheel_mb 60: ray (79 MB), imageio-ffmpeg (68 MB) and opencv (61 MB) go through xz + split
    cfg.write_text("python: '3.12'\nplatform: manylinux_2_28_x86_64\nskip: [torch]\n"
                   "max_wheel_mb: 60\nxz_preset: 0\n")
    out = root / "out"
    proc = subprocess.run([sys.executable, "-m", "vpo_ray.cli", "bundle", "--config", str(cfg), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"bundle: {summary}")
    return out, py312, summary


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bundle_holds_every_runtime_wheel_and_no_cuda_stack(built_bundle):
    out, _, summary = built_bundle
    manifest = json.loads((out / "manifest.json").read_text())
    names = {vtags.canonical(Path(w["wheel"]).name.split("-")[0]) for w in manifest["wheels"]}
    for need in ("vpo-ray", "ray", "deepspeed", "transformers", "trl", "diffusers", "peft", "accelerate",
                 "datasets", "decord", "opencv-python-headless", "imageio-ffmpeg", "pyarrow", "fsspec"):
        assert need in names, f"{need} missing from the bundle"
    assert not [n for n in names if n == "torch" or n.startswith(("nvidia-", "triton", "cuda-"))]
    assert manifest["left_out"] == ["torch==2.13.0"]
    assert manifest["python"] == "3.12" and "manylinux_2_17_x86_64" in manifest["platform_tags"]
    for f in manifest["files"]:
        p = out / f["path"]
        assert p.stat().st_size == f["size"] and vfiles.sha256_of(p) == f["sha256"], f["path"]
    split = [w for w in manifest["wheels"] if len(w["stored_as"]) > 1]
    assert split and all(p.endswith(f".xz.part{i:03d}") for w in split for i, p in enumerate(w["stored_as"]))
    assert all((out / p).stat().st_size <= 60 << 20 for w in manifest["wheels"] for p in w["stored_as"])
    pins = (out / "requirements.txt").read_text().split()
    assert "vpo_ray==0.1.0" in pins and len(pins) == len(manifest["wheels"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_install_sh_installs_offline_into_a_fresh_target(built_bundle, tmp_path):
    out, py312, _ = built_bundle
    target = tmp_path / "site"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env["PIP_CONFIG_FILE"] = os.devnull  # no index, mirror or constraint from this machine's pip config
    proc = subprocess.run(["bash", str(out / "install.sh"), "--target", str(target), "--python", py312],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "restored ray-2.60.0" in proc.stdout

    check = ("import vpo_ray, vpo_ray.config, vpo_ray.storage, ray, ray.data, yaml, pyarrow, numpy, fsspec, "
             "transformers, diffusers, datasets, cv2, decord, imageio_ffmpeg, matplotlib; "
             "import importlib.util as u; print(ray.__version__, u.find_spec('torch'))")
    proc = subprocess.run([py312, "-c", check], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[:2] == ["2.60.0", "None"]  # torch really is absent
    # packages that may import torch at import time: torch (left out) must be the only thing missing
    for module in ("trl", "peft", "accelerate", "deepspeed"):
        proc = subprocess.run([py312, "-c", f"import {module}"], capture_output=True, text=True, cwd=tmp_path,
                              env={**env, "PYTHONPATH": str(target), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
        err = proc.stderr.strip().splitlines()[-1:] if proc.returncode else []
        print(f"import {module} without torch: {'ok' if not err else err[0]}")
        assert not err or "No module named 'torch'" in err[0], f"import {module}: {err}"


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pip_resolves_the_whole_set_offline_with_torch_supplied(built_bundle, tmp_path):
    """Every requirement of every bundled package is in the bundle, torch aside."""
    out, py312, _ = built_bundle
    restored = tmp_path / "restored"
    subprocess.run([py312, str(out / "unpack.py"), str(out), str(restored), "--no-verify"], check=True)
    stubs = tmp_path / "torch"
    stubs.mkdir()
    vsteps.write_stub_wheel("torch", "2.13.0", stubs)  # stands in for the image's torch
    report = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run([py312, "-m", "pip", "install", "--dry-run", "--no-index", "--ignore-installed",
                           "--disable-pip-version-check", "--report", str(report),
                           "--find-links", str(out / "wheels"), "--find-links", str(restored),
                           "--find-links", str(stubs), "-r", str(out / "requirements.txt")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {vtags.canonical(i["metadata"]["name"]) + "==" + i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    pins = {vtags.canonical(p.split("==")[0]) + "==" + p.split("==")[1]
            for p in (out / "requirements.txt").read_text().split()}
    assert resolved == pins | {"torch==2.13.0+vpostub"}


def test_old_glibc_tags_fall_back_to_manylinux_2_28():
    from vpo_ray.bundle.tags import newer_platform as _newer_platform

    assert _newer_platform("manylinux_2_17_x86_64") == "manylinux_2_28_x86_64"
    assert _newer_platform("manylinux2014_aarch64") == "manylinux_2_28_aarch64"
    assert _newer_platform("manylinux_2_28_x86_64") is None
    assert _newer_platform("manylinux_2_34_x86_64") is None


# ---------------------------------------------------------------------------- slow: the GPU bundle's training part

@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_bundle_training_wheels_install_into_a_fresh_target_and_import(tmp_path):
    """benchmarks/train_wheels.sh (what gpu_bundle.sh ships for training) for this Python: deepspeed built
    from its sdist without compiled ops, trl, datasets and their extras install with --no-deps into an empty
    folder and import from there on top of this machine's torch/transformers (as on the GPU image)."""
    reachable, why = _pypi_reachable()
    if not reachable:
        pytest.skip(f"PyPI is unreachable, so no wheel can be fetched: {why}")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pyver = "%d.%d" % sys.version_info[:2]
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "train_wheels.sh"), str(wheels), pyver],
                          capture_output=True, text=True, env={**os.environ, "GPU_BUNDLE_BUILD_PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert names == ["datasets", "deepspeed", "dill", "hjson", "multiprocess", "trl"]
    (ds_wheel,) = wheels.glob("deepspeed-*-py3-none-any.whl")  # pure Python: nothing compiled for this machine
    with zipfile.ZipFile(ds_wheel) as z:
        assert not [n for n in z.namelist() if n.endswith(".so")]
        info = z.read("deepspeed/git_version_info_installed.py").decode()
    assert "True" not in info.split("installed_ops=")[1].split("\n")[0]  # no op prebuilt, none needed
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
                           "--target", str(target), *map(str, wheels.glob("*.whl"))], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check = ("import sys, trl, datasets, deepspeed, dill, multiprocess, hjson\n"
             "from trl import SFTTrainer, DPOTrainer, SFTConfig, DPOConfig\n"
             "from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3\n"
             "for m in (trl, datasets, deepspeed, dill, multiprocess, hjson):\n"
             "    assert m.__file__.startswith(sys.argv[1]), (m.__name__, m.__file__)\n"
             "print(trl.__version__, datasets.__version__, deepspeed.__version__)")
    proc = subprocess.run([sys.executable, "-c", check, str(target)], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(target), "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1.16.0", "5.2.0", "0.19.8"]
