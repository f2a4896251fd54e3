#!/usr/bin/env bash
# Idempotent setup of the compatibility host: a second environment for a newer ComfyUI.
#
# Which ComfyUI (first match wins):
#   COMFYUI_PATH=/path/to/ComfyUI      an existing checkout, used as it is
#   COMFYUI_TARBALL=/path/to/x.tar.gz  a source tarball holding one top-level ComfyUI folder
#   otherwise the newest comfyui-*.tar.gz in ../shared/hosts/ (beside the repository)
# The tree is unpacked to .host/compat/<name>; the environment is .venv-compat (its own pins:
# the newer ComfyUI needs other transformers/frontend versions than the pinned 0.3.75 host).
# Prints the ComfyUI root on the last line of stdout; the Makefile reads it.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="$ROOT/.venv-compat"
HOST="$ROOT/.host/compat"
PY="$VENV/bin/python"

TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
# ComfyUI >= 0.2x imports torchaudio at start-up; no build for torch 2.14 is served, and this
# pure-Python wheel imports and works beside it.
TA_PIN="torchaudio==2.11.1"

if [ -n "${COMFYUI_PATH:-}" ]; then
  TREE="$(cd "$COMFYUI_PATH" && pwd)"
  TAG="path-$(basename "$TREE")"
else
  TARBALL="${COMFYUI_TARBALL:-}"
  if [ -z "$TARBALL" ]; then
    TARBALL="$(ls -1 "$ROOT"/../shared/hosts/comfyui-*.tar.gz 2>/dev/null | sort -V | tail -n 1 || true)"
  fi
  if [ -z "$TARBALL" ] || [ ! -f "$TARBALL" ]; then
    echo "[compat] no newer host: set COMFYUI_PATH or COMFYUI_TARBALL (none in ../shared/hosts/)" >&2
    exit 3
  fi
  TARBALL="$(cd "$(dirname "$TARBALL")" && pwd)/$(basename "$TARBALL")"
  NAME="$(tar tzf "$TARBALL" | awk -F/ 'NR == 1 { print $1 }')"
  TREE="$HOST/$NAME"
  TAG="$NAME-$(stat -c %s "$TARBALL")"
  if [ ! -f "$TREE/.dm-unpacked" ]; then
    echo "[compat] unpacking $TARBALL" >&2
    rm -rf "$TREE"
    mkdir -p "$HOST"
    tar xzf "$TARBALL" -C "$HOST"
    touch "$TREE/.dm-unpacked"
  fi
fi

if [ ! -f "$TREE/main.py" ] || [ ! -f "$TREE/requirements.txt" ]; then
  echo "[compat] $TREE is not a ComfyUI tree (no main.py / requirements.txt)" >&2
  exit 3
fi

STAMP="$VENV/.dm-compat-$TAG-$(sha1sum "$TREE/requirements.txt" "$ROOT/requirements-test.txt" | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[compat] creating $VENV for $TREE (first run: about 3 minutes)" >&2
  [ -x "$PY" ] || python3 -m venv "$VENV"
  mkdir -p "$HOST"
  printf '%s\n%s\n%s\n' "$TORCH_PIN" "$TV_PIN" "$TA_PIN" > "$HOST/constraints.txt"
  {
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "$TORCH_PIN" "$TV_PIN"
    "$PY" -m pip install -q --no-deps "$TA_PIN"
    # The tree's requirements without the torch family (pinned above); requests is imported by
    # older trees without being declared.
    grep -viE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$TREE/requirements.txt" > "$HOST/comfy-reqs.txt"
    echo "requests" >> "$HOST/comfy-reqs.txt"
    "$PY" -m pip install -q -c "$HOST/constraints.txt" -r "$HOST/comfy-reqs.txt"
    "$PY" -m pip install -q -c "$HOST/constraints.txt" -r "$ROOT/requirements-test.txt"
  } >&2
  rm -f "$VENV"/.dm-compat-*
  touch "$STAMP"
fi
echo "$TREE"
