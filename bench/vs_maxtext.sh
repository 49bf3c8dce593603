#!/usr/bin/env bash
# jaxlm vs MaxText: train-step tokens/s of the same tiny LLaMA on this machine's CPU (issue 6).
#
# What it does (nothing here runs in CI; it needs PyPI and ~10-20 minutes on a 2-core box the
# first time; steps 1-2 live in bench/maxtext_env.sh, shared with bench/memory.py):
#   1. finds a Python >= 3.12 (MaxText's floor) and makes a venv in $VS_MAXTEXT_DIR/venv
#      (default ~/.cache/jaxlm/vs_maxtext); an existing venv with the right MaxText is reused;
#   2. installs MaxText $MAXTEXT_VERSION from PyPI (default 0.2.5): the wheel declares its
#      dependencies only through extras (tpu, cuda12), so the script installs the wheel's own
#      "decoupled" requirements file (no Google Cloud clients, no accelerator wheels; run with
#      DECOUPLE_GCLOUD=TRUE), then the wheel with --no-deps, then this repository with
#      `pip install -e .` -- one venv, so MaxText and jaxlm run on the same jax/jaxlib;
#   3. runs MaxText's trainer (python -m maxtext.trainers.pre_train.train base.yml key=value ...)
#      on synthetic data with the issue's config: 4 layers, emb 256, 4 query heads and 4 kv heads
#      of 64, MLP 1024 (SwiGLU), vocab 32000, seq 256, per-device batch 8, float32 weights and
#      activations, dot_product attention, remat_policy=full, scan_layers, AdamW, $STEPS steps;
#      its step time is the median of the "completed step: N, seconds: S" lines for N = 5..STEPS-1;
#   4. runs jaxlm's bench/throughput.py on configs/bench_tiny_llama.yaml (remat full, MaxText's
#      policy and jaxlm's faster one here) and again with model.remat=none, median of blocked
#      per-step times;
#   5. the same on 2 fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=2) with
#      FSDP over both: MaxText ici_fsdp_parallelism=2, jaxlm mesh.fsdp=2, global batch 16.
# tokens/s = global batch * 256 / median step time (both programs, same statistic). The fake devices
# share the same cores, so the 2-device figures measure sharded-program overhead, not scaling.
#
# The last line is `jaxlm_vs_maxtext=<jaxlm tokens/s / MaxText tokens/s>` on one device. The machine
# is shared and noisy: REPEATS=N runs each program N times and keeps each one's best (fastest) run.
# Huge pages: XLA:CPU allocates its step temporaries afresh each step, and page-faulting them in
# 4 KiB pages costs a large share of a step on this kind of machine. jaxlm's commands (jaxlm-train,
# bench/throughput.py) re-execute themselves with GLIBC_TUNABLES=glibc.malloc.hugetlb=1 by default
# (jaxlm/utils/hugepages.py), MaxText's trainer does not: that is how each ships. THP=1 gives
# MaxText the same tunable (both programs with huge pages); JAXLM_HUGEPAGES=0 takes it from jaxlm.
#
#   bash bench/vs_maxtext.sh                    # from the repository root
#   REPEATS=2 STEPS=30 bash bench/vs_maxtext.sh
#   ONLY_1DEV=1 bash bench/vs_maxtext.sh        # skip the 2-device runs
#   MAXTEXT_REMAT=minimal JAXLM_REMAT=save_dots bash bench/vs_maxtext.sh   # both keep the matmul
#       outputs (MaxText's `minimal` saves the named projections) instead of remat full
#
# Figures and what they were measured on: bench/RESULTS.md, "Issue 6: speed vs MaxText".
set -euo pipefail

STEPS="${STEPS:-30}"        # MaxText steps; the median is over steps 5..STEPS-1
REPEATS="${REPEATS:-1}"
export JAX_PLATFORMS=cpu
if [ -n "${THP:-}" ]; then export GLIBC_TUNABLES=glibc.malloc.hugetlb=1; fi

# --- 1-2. MaxText's venv (found or created by bench/maxtext_env.sh; sets ROOT, WORK, PY, BASE_YML)
# shellcheck source=bench/maxtext_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/maxtext_env.sh" || exit 1
"$PY" -c "import jax, maxtext, jaxlm; print('== jax', jax.__version__, '| maxtext', \
maxtext.__file__.rsplit('/', 2)[0], '| jaxlm', jaxlm.__file__.rsplit('/', 2)[0])"
# the CPU the ratio was measured on: with the same code it depends on the core generation
# (bench/RESULTS.md, "Ninth session"), so every run names it
awk -F': *' '/^model name/{m=$2} /^cpu family/{f=$2} /^model\t/{n=$2} /^processor/{c++}
  END{printf "== cpu: %s (family %s, model %s), %d logical CPUs\n", m, f, n, c}' /proc/cpuinfo

# --- 3. MaxText: median step time of steps 5..STEPS-1 -> tokens/s (global)
maxtext_tps() {  # maxtext_tps N_DEVICES LOG
  local ndev="$1" log="$2"
  maxtext_args "$ndev" "$STEPS"
  DECOUPLE_GCLOUD=TRUE "$PY" -m maxtext.trainers.pre_train.train "$BASE_YML" "${MAXTEXT_ARGS[@]}" \
    >"$log" 2>&1 \
    || { tail -30 "$log" >&2; echo "error: MaxText failed (log: $log)" >&2; return 1; }
  "$PY" - "$log" "$ndev" <<'EOF'
import re, statistics, sys
times = {int(m[1]): float(m[2]) for m in
         re.finditer(r"completed step: (\d+), seconds: ([0-9.]+)", open(sys.argv[1]).read())}
sel = [t for s, t in times.items() if s >= 5]
if not sel:
    sys.exit(f"no 'completed step' lines for steps >= 5 in {sys.argv[1]}")
print(8 * int(sys.argv[2]) * 256 / statistics.median(sel))
EOF
}

# --- 4. jaxlm: bench/throughput.py, median of blocked per-step times -> tokens/s (global)
jaxlm_tps() {  # jaxlm_tps N_DEVICES LOG [overrides...]
  local ndev="$1" log="$2"; shift 2
  (cd "$ROOT" && PYTHONPATH="$ROOT" "$PY" bench/throughput.py configs/bench_tiny_llama.yaml \
     mesh.fsdp="$ndev" train.batch_size=$((8 * ndev)) "$@" \
     --steps $((STEPS - 5)) --warmup 5) >"$log" 2>&1 \
    || { tail -30 "$log" >&2; echo "error: jaxlm failed (log: $log)" >&2; return 1; }
  sed -n 's/^tokens_per_s_median=//p' "$log"
}

best() {  # best CMD ARGS...: run REPEATS times, print the highest tokens/s
  local b=0 r v
  for r in $(seq "$REPEATS"); do
    v="$("$@")" || return 1
    b="$("$PY" -c "print(max($b, $v))")"
  done
  echo "$b"
}

ratio() { "$PY" -c "print(f'{$1 / $2:.3f}')"; }

run_set() {  # run_set N_DEVICES
  local ndev="$1" mt jl jlf
  mt="$(best maxtext_tps "$ndev" "$WORK/maxtext_${ndev}dev.log")"
  jl="$(best jaxlm_tps "$ndev" "$WORK/jaxlm_${ndev}dev.log" model.remat="${JAXLM_REMAT:-full}")"
  jlf="$(best jaxlm_tps "$ndev" "$WORK/jaxlm_${ndev}dev_remat_none.log" model.remat=none)"
  printf '%s device(s): MaxText %.1f tok/s (remat %s) | jaxlm %.1f tok/s (remat %s) | jaxlm remat=none %.1f tok/s\n' \
    "$ndev" "$mt" "${MAXTEXT_REMAT:-full}" "$jl" "${JAXLM_REMAT:-full}" "$jlf"
  echo "  ratio jaxlm/MaxText: $(ratio "$jl" "$mt") (remat ${JAXLM_REMAT:-full}), $(ratio "$jlf" "$mt") (jaxlm remat none)"
  LAST_RATIO="$(ratio "$jl" "$mt")"
}

echo "== 1 CPU device (logs in $WORK)"
run_set 1
RATIO_1DEV="$LAST_RATIO"
if [ -z "${ONLY_1DEV:-}" ]; then
  echo "== 2 fake CPU devices, FSDP=2 (global batch 16)"
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=2" run_set 2
  echo "jaxlm_vs_maxtext_2dev=$LAST_RATIO"
fi
echo "jaxlm_vs_maxtext=$RATIO_1DEV"
