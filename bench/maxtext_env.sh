#!/usr/bin/env bash
# MaxText's venv for the jaxlm-vs-MaxText benchmarks: create it once, reuse it after (issue 6, 18).
#
# Sourced by bench/vs_maxtext.sh (and run by bench/memory.py before its rss_vs_maxtext measurement);
# run directly it just makes sure the venv exists and prints where it is.
#   1. finds a Python >= 3.12 (MaxText's floor) and makes a venv in $VS_MAXTEXT_DIR/venv
#      (default ~/.cache/jaxlm/vs_maxtext); an existing venv with the right MaxText is reused;
#   2. installs MaxText $MAXTEXT_VERSION from PyPI (default 0.2.5): the wheel declares its
#      dependencies only through extras (tpu, cuda12), so this installs the wheel's own
#      "decoupled" requirements file (no Google Cloud clients, no accelerator wheels; run with
#      DECOUPLE_GCLOUD=TRUE), then the wheel with --no-deps, then this repository with
#      `pip install -e .` -- one venv, so MaxText and jaxlm run on the same jax/jaxlib.
# After sourcing, these are set: ROOT, WORK, MAXTEXT_VERSION, VENV, PY (the venv's python), BASE_YML
# (MaxText's configs/base.yml). Needs PyPI and ~10-20 minutes on a 2-core box the first time.
#
#   bash bench/maxtext_env.sh                   # create (or check) the venv; prints PY= and BASE_YML=
#   source bench/maxtext_env.sh                 # from another bash script
#   MAXTEXT_ENV_CHECK_ONLY=1 bash bench/maxtext_env.sh   # exit 1 instead of installing
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${VS_MAXTEXT_DIR:-$HOME/.cache/jaxlm/vs_maxtext}"
MAXTEXT_VERSION="${MAXTEXT_VERSION:-0.2.5}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
mkdir -p "$WORK"
VENV="$WORK/venv"
PY="$VENV/bin/python"

# --- 1. a Python >= 3.12 (pyenv shims may answer `command -v` but fail to run: test each one)
find_python() {
  local cand
  for cand in "${PYTHON:-}" python3.13 python3.12 python3 \
              "$HOME"/.pyenv/versions/3.13*/bin/python "$HOME"/.pyenv/versions/3.12*/bin/python; do
    [ -n "$cand" ] || continue
    cand="$(command -v "$cand" 2>/dev/null || true)"
    if [ -n "$cand" ] && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  return 1
}

have_venv() {
  [ -x "$PY" ] && "$PY" - "$MAXTEXT_VERSION" <<'EOF' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(version("maxtext") != sys.argv[1] or not version("jaxlm"))
EOF
}

# --- 2. install (skipped when the venv already has this MaxText and jaxlm)
install_maxtext_venv() {
  local base_py wheel
  base_py="$(find_python)" || { echo "error: MaxText needs Python >= 3.12; none found" >&2; return 1; }
  echo "== creating $VENV with $("$base_py" --version)"
  rm -rf "$VENV"
  "$base_py" -m venv "$VENV" || return 1
  "$PY" -m pip install -q --upgrade pip || return 1
  "$PY" -m pip download -q --no-deps "maxtext==$MAXTEXT_VERSION" -d "$WORK/wheels" || return 1
  wheel="$(ls "$WORK"/wheels/maxtext-"$MAXTEXT_VERSION"-*.whl | head -1)"
  "$PY" - "$wheel" "$WORK/maxtext-requirements.txt" <<'EOF' || return 1
import sys, zipfile
name = "dependencies/requirements/generated_requirements/decoupled-requirements.txt"
with zipfile.ZipFile(sys.argv[1]) as z:
    open(sys.argv[2], "wb").write(z.read(name))
EOF
  echo "== installing MaxText $MAXTEXT_VERSION's requirements (a few minutes)"
  "$PY" -m pip install -q -r "$WORK/maxtext-requirements.txt" || return 1
  "$PY" -m pip install -q --no-deps "$wheel" || return 1
  echo "== installing jaxlm (pip install -e $ROOT)"
  "$PY" -m pip install -q -e "$ROOT"
}

# The comparison config (issue 6) as MaxText key=value arguments: 4 layers, emb 256, 4 query and 4
# kv heads of 64, MLP 1024 (SwiGLU), vocab 32000, seq 256, per-device batch 8, float32, dot_product
# attention, remat full, scan_layers, AdamW, synthetic data. Run it as
#   maxtext_args N_DEVICES STEPS; DECOUPLE_GCLOUD=TRUE "$PY" -m maxtext.trainers.pre_train.train \
#     "$BASE_YML" "${MAXTEXT_ARGS[@]}"
maxtext_args() {  # maxtext_args N_DEVICES STEPS -> sets the array MAXTEXT_ARGS
  MAXTEXT_ARGS=(
    run_name=jaxlm_vs_maxtext base_output_directory="$WORK/maxtext_out" hardware=cpu
    skip_jax_distributed_system=true enable_checkpointing=false enable_tensorboard=false
    model_name=default decoder_block=llama2 base_num_decoder_layers=4 base_emb_dim=256
    base_num_query_heads=4 base_num_kv_heads=4 head_dim=64 base_mlp_dim=1024 vocab_size=32000
    max_target_length=256 per_device_batch_size=8 dtype=float32 weight_dtype=float32
    attention=dot_product remat_policy="${MAXTEXT_REMAT:-full}" scan_layers=true opt_type=adamw
    dataset_type=synthetic steps="$2" ici_fsdp_parallelism="$1")
}

maxtext_env_main() {
  if ! have_venv; then
    if [ -n "${MAXTEXT_ENV_CHECK_ONLY:-}" ]; then
      echo "error: no MaxText $MAXTEXT_VERSION venv at $VENV (run: bash bench/maxtext_env.sh)" >&2
      return 1
    fi
    install_maxtext_venv || { echo "error: MaxText venv setup failed ($VENV)" >&2; return 1; }
  fi
  BASE_YML="$(JAX_PLATFORMS=cpu "$PY" -c "import maxtext, os; \
print(os.path.join(os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))")" || return 1
}

if (return 0 2>/dev/null); then  # sourced
  maxtext_env_main || return 1
else  # run directly
  set -uo pipefail
  maxtext_env_main || exit 1
  echo "PY=$PY"
  echo "BASE_YML=$BASE_YML"
fi
