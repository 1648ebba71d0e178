"""Tags and names: which wheels a target interpreter runs, and package names as pip compares them."""
from __future__ import annotations

import fnmatch
import re
from typing import Optional

from vpo_ray.bundle.spec import BundleError, BundleSpec


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


def newer_platform(platform: str) -> Optional[str]:
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
