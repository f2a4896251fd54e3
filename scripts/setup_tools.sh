#!/usr/bin/env bash
# Idempotent setup of the release tools: comfy-cli (for `comfy node validate`) in its own virtual
# environment, .venv-tools. It is a test-only tool, never a runtime dependency, and it lives apart
# from .venv because its own dependency pins would clash with the pinned host's.
# The stamp file holds the installed pin: a second run returns in well under a second, and a
# changed pin reinstalls.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$PWD/.venv-tools"
COMFY_CLI_PIN="comfy-cli==1.23.0"
STAMP="$VENV/.dm-tools-stamp"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$COMFY_CLI_PIN" ]; then
  echo "[setup-tools] installing $COMFY_CLI_PIN into $VENV"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q "$COMFY_CLI_PIN"
  printf '%s\n' "$COMFY_CLI_PIN" > "$STAMP"
fi
