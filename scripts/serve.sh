#!/usr/bin/env bash
# Start the embedded (or $COMFYUI_PATH) ComfyUI with this pack linked into custom_nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PORT="${1:-8188}"
BASE="${2:-$ROOT/.host/serve}"
COMFY="${COMFYUI_PATH:-$ROOT/.host/comfyui}"
if [ ! -f "$COMFY/main.py" ]; then
  echo "No ComfyUI at $COMFY (set COMFYUI_PATH or run 'make setup')." >&2
  exit 1
fi
mkdir -p "$BASE/custom_nodes" "$BASE/user" "$BASE/models/checkpoints" "$BASE/models/loras" \
         "$BASE/models/embeddings" "$BASE/input" "$BASE/output"
# A link, so edits to the pack show up after a restart.
ln -sfn "$ROOT" "$BASE/custom_nodes/dreammatcher"
echo
echo "  DreamMatcher on ComfyUI: http://127.0.0.1:$PORT"
echo "  Put an SD1.5 checkpoint in: $BASE/models/checkpoints"
echo "  LoRAs: $BASE/models/loras   embeddings: $BASE/models/embeddings"
echo
DEVICE_ARGS="--cpu"
if "$ROOT/.venv/bin/python" -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  DEVICE_ARGS=""
fi
cd "$COMFY"
exec "$ROOT/.venv/bin/python" main.py $DEVICE_ARGS --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
  --base-directory "$BASE" --database-url "sqlite:///$BASE/user/comfyui.db" --use-pytorch-cross-attention \
  ${DM_SERVE_ARGS:-}
