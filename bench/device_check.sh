#!/usr/bin/env bash
# One-command accelerator check (issue #18 §5): MFU of the 1B LLaMA per remat policy, cuDNN vs XLA
# attention at 2k/8k, lightning vs cuDNN softmax at 8k/32k, peak HBM -- one `name=value` line each.
# Everything is in bench/device_check.py (its docstring says what each line measures).
#
#   bash bench/device_check.sh                 # on one GPU: <= 8 minutes (H200)
#   bash bench/device_check.sh --dry-run       # tiny shapes on CPU (CI), substitutes noted in `#` lines
#   bash bench/device_check.sh --budget-s 300 --batch 32
#
# PYTHON picks the interpreter (default: the repository's .venv if present, else python3).
# A hard wall-clock stop (DEVICE_CHECK_TIMEOUT_S, default 540 s; dry run 1200 s) backs up the
# script's own time-budget guard (--budget-s, default 450 s on a device, 900 s dry).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
LIMIT=540
for arg in "$@"; do
  if [ "$arg" = "--dry-run" ]; then export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"; LIMIT=1200; fi
done
cd "$ROOT" || exit 1
PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
  timeout --signal=TERM "${DEVICE_CHECK_TIMEOUT_S:-$LIMIT}" "$PY" bench/device_check.py "$@"
