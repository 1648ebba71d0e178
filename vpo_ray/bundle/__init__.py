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

Modules: `spec` (BundleSpec, BundleError), `tags` (platform/Python tags, package names),
`pip_steps` (steps 1-4, each one pip call), `files` (step 5, install.sh/unpack.py from
`templates/`, manifest.json), `build` (the order of the steps, and the CLI).
"""
from vpo_ray.bundle.build import add_arguments, build_bundle, run, spec_from_args
from vpo_ray.bundle.spec import DEFAULT_PLATFORM, DEFAULT_TORCH_SPEC, BundleError, BundleSpec

__all__ = ["BundleError", "BundleSpec", "DEFAULT_PLATFORM", "DEFAULT_TORCH_SPEC", "add_arguments", "build_bundle",
           "run", "spec_from_args"]
