#!/usr/bin/env bash
# make demo: the embedded (or $COMFYUI_PATH) ComfyUI with this pack and the miniature world's demo nodes,
# opening the demo workflow. The demo folder is linked only here (and by the tests and the benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PORT="${1:-8188}"
BASE="${2:-$ROOT/.host/demo}"
if [ ! -f "$ROOT/scripts/miniworld/weights/miniworld.safetensors" ]; then
  echo "No trained miniworld model at scripts/miniworld/weights/miniworld.safetensors (make train-miniworld)." >&2
  exit 1
fi
mkdir -p "$BASE/custom_nodes"
ln -sfn "$ROOT/scripts/miniworld" "$BASE/custom_nodes/dreammatcher_miniworld"
echo
echo "  Miniature-world demo: open http://127.0.0.1:$PORT/?miniworld_demo"
echo "  (or Workflow > Browse Templates > dreammatcher_miniworld > miniworld_demo), then Queue (Run)."
exec bash "$ROOT/scripts/serve.sh" "$PORT" "$BASE"
