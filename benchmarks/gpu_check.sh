#!/usr/bin/env bash
# One-shot GPU check (benchmarks/gpu_check.py) on a bare GPU machine that received this working tree
# plus the carried ignored paths .host/comfyui (ComfyUI 0.3.75) and .whl (wheels of the few Python
# packages that ComfyUI's import path needs and the machine lacks: torchsde, trampoline).
#
#   bash benchmarks/gpu_check.sh [gpu_check.py args...]     e.g. --smoke --cpu for a dry run
#
# With COMPAT_COMFYUI_PATH pointing at a newer ComfyUI tree (e.g. the carried .host/compat/comfyui-0.28.2,
# whose own Python requirements must be importable there: comfy-aimdo, comfy-kitchen, av, ...), it then
# runs benchmarks/gpu_check_server.py on that host's real server with dynamic VRAM on (its default) and
# off, checking parity and exact guidance there ($OUT/compat/gpu_check_server.json).
#
# Writes $OUT/gpu_check.json, $OUT/gpu_check.log (everything printed) and $OUT/nvidia-smi.txt;
# OUT defaults to ./gpu-out. GPU_CHECK_BUDGET (seconds, default 285) is the script's internal
# budget; a hard `timeout` kills it 45 s after that.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${GPU_CHECK_BUDGET:-285}"
LOG="$OUT/gpu_check.log"
: > "$LOG"
{
  echo "[gpu_check.sh] $(date -u +%FT%TZ) host $(hostname) python $($PY -c 'import sys; print(sys.version.split()[0])') at $(command -v "$PY")"
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || true
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1 || true
  fi
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "[gpu_check.sh] installing $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')into /tmp/site"
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "[gpu_check.sh] wheel install FAILED"; exit 3; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "[gpu_check.sh] no .whl/*.whl carried; relying on installed packages"
  fi
  export COMFYUI_PATH="${COMFYUI_PATH:-$PWD/.host/comfyui}"
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
  [ -f "$COMFYUI_PATH/main.py" ] || { echo "[gpu_check.sh] no ComfyUI at $COMFYUI_PATH (carry .host/comfyui)"; exit 4; }
  timeout -k 10 "$((${BUDGET%.*} + 45))" "$PY" benchmarks/gpu_check.py --out "$OUT" --budget "$BUDGET" "$@"
  rc=$?
  echo "[gpu_check.sh] gpu_check.py exit code $rc"
  if [ -n "${COMPAT_COMFYUI_PATH:-}" ]; then
    COMFYUI_PATH="$COMPAT_COMFYUI_PATH" timeout -k 10 "${COMPAT_BUDGET:-240}" "$PY" benchmarks/gpu_check_server.py \
      --out "$OUT/compat" --size "${COMPAT_SIZE:-512}" --steps "${COMPAT_STEPS:-20}"
    crc=$?
    echo "[gpu_check.sh] gpu_check_server.py (newer host $COMPAT_COMFYUI_PATH) exit code $crc"
    [ "$rc" -eq 0 ] && rc=$crc
  fi
  exit $rc
} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
