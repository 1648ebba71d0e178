#!/usr/bin/env bash
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
