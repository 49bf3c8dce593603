#!/usr/bin/env bash
# Same-run throughput A/B of two commits: bench/throughput.py on the MaxText-comparison config,
# alternating an older commit (in a temporary git worktree) and this checkout, ROUNDS times, so
# that both see the same machine load. Prints one line per run:
#   <round> <tree> tokens_per_s_median=… tokens_per_s=… mfu=…
# Usage: bash bench/ab_throughput.sh BASE_REV [ROUNDS]   (e.g. bash bench/ab_throughput.sh 057b0a2)
set -euo pipefail
BASE_REV="$1"; ROUNDS="${2:-2}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
BASE="$(mktemp -d)/base"
git -C "${ROOT}" worktree add -q --detach "${BASE}" "${BASE_REV}"
trap 'git -C "${ROOT}" worktree remove --force "${BASE}"' EXIT
for round in $(seq "${ROUNDS}"); do
  for tree in "${BASE}" "${ROOT}"; do
    r=$(cd "${tree}" && PYTHONPATH="${tree}" "${PY}" bench/throughput.py \
        configs/bench_tiny_llama.yaml --steps 10 2>/dev/null | tail -3 | tr '\n' ' ')
    echo "${round} ${tree} ${r}"
  done
done
