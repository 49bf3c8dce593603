#!/usr/bin/env bash
# Same-run throughput A/B of settings (environment variables and config overrides) of this checkout:
# bench/throughput.py on the MaxText-comparison config, each variant in turn, ROUNDS times, so all
# see the same machine load (bench/ab_throughput.sh does the same for two commits). One line per run:
#   round=<r> <label> tokens_per_s_median=… mfu=…
# A variant is "LABEL;ENV=VALUE ...;section.key=value ..." (either part may be empty).
#   bash bench/ab_settings.sh 2 "base;;" "no_hugepages;JAXLM_HUGEPAGES=0;" "c32;;model.head_chunk=32"
#   STEPS=16 PYTHON=~/.cache/jaxlm/vs_maxtext/venv/bin/python bash bench/ab_settings.sh 2 ...
set -euo pipefail
ROUNDS="$1"; shift
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python}"
for round in $(seq "${ROUNDS}"); do
  for variant in "$@"; do
    IFS=';' read -r label envs overrides <<< "${variant}"
    # shellcheck disable=SC2086  # word splitting of the env assignments and overrides is wanted
    r=$(cd "${ROOT}" && env JAX_PLATFORMS=cpu PYTHONPATH="${ROOT}" ${envs} "${PY}" bench/throughput.py \
        configs/bench_tiny_llama.yaml ${overrides} --steps "${STEPS:-10}" --warmup 3 2>/dev/null \
        | grep -E '^(tokens_per_s_median|mfu)=' | tr '\n' ' ')
    echo "round=${round} ${label} ${r}"
  done
done
