#!/usr/bin/env bash
# Train jaxlm on every worker of an existing Cloud TPU slice (docs/multihost.md).
#
# Copies this checkout (tracked files, `git archive HEAD`) to all workers, installs it with
# jax[tpu] on all workers, then runs the same `jaxlm-train ... distributed=true` on all workers at
# once; jax.distributed.initialize() detects the slice (coordinator, process count, process id).
# Creates and deletes nothing; create the slice first, e.g.
#   gcloud compute tpus tpu-vm create NAME --zone=ZONE --accelerator-type=v5litepod-32 \
#     --version=v2-alpha-tpuv5-lite
#
# out_dir must be storage every worker sees at the same path (a gcsfuse or NFS mount): each
# process writes its own shards of every checkpoint. data.path must exist on every worker.
set -euo pipefail

usage() {
  cat >&2 <<'EOF'
usage: scripts/tpu_pod.sh TPU_NAME ZONE CONFIG.yaml [key=value ...]

  Runs on every worker of the TPU slice TPU_NAME:
    jaxlm-train CONFIG.yaml distributed=true key=value ...
  e.g. scripts/tpu_pod.sh my-v5e-32 europe-west4-b configs/llama_1b.yaml \
         data.path=/mnt/data/c4.txt out_dir=/mnt/ckpt/llama_1b mesh.data=4 mesh.fsdp=-1

environment:
  PROJECT       gcloud project (default: gcloud's configured project)
  REMOTE_DIR    where the checkout goes on each worker (default: jaxlm, in the home directory)
  JAX_SPEC      jax requirement to install (default: jax[tpu]>=0.10.2,<0.13)
  PYTHON        python on the workers (default: python3; e.g. a venv's bin/python)
  SKIP_INSTALL  1 = skip copying and installing (already done), just train
  DRY_RUN       1 = print the gcloud commands instead of running them
EOF
  exit 2
}

[[ $# -ge 3 ]] || usage
case "$1" in -h|--help) usage ;; esac
TPU_NAME=$1 ZONE=$2 CONFIG=$3
shift 3
REMOTE_DIR=${REMOTE_DIR:-jaxlm}
JAX_SPEC=${JAX_SPEC:-"jax[tpu]>=0.10.2,<0.13"}
PYTHON=${PYTHON:-python3}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ ! -f "$REPO/$CONFIG" ]]; then
  echo "error: $CONFIG is not a file of this checkout (give it relative to $REPO)" >&2
  exit 2
fi
for arg in "$@"; do
  [[ $arg == *=* ]] || { echo "error: expected key=value, got '$arg'" >&2; exit 2; }
done
[[ " $* " == *" out_dir="* ]] || echo "warning: no out_dir=...; it must be shared storage" >&2

GCLOUD=(gcloud compute tpus tpu-vm)
FLAGS=(--zone="$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then FLAGS+=(--project="$PROJECT"); fi
run() { if [[ ${DRY_RUN:-0} == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  archive=$tmp/jaxlm.tar.gz
  git -C "$REPO" archive --format=tar.gz -o "$archive" HEAD
  run "${GCLOUD[@]}" scp "$archive" "$TPU_NAME:jaxlm.tar.gz" "${FLAGS[@]}"
  install="rm -rf $(printf '%q' "$REMOTE_DIR") && mkdir -p $(printf '%q' "$REMOTE_DIR")"
  install+=" && tar -xzf jaxlm.tar.gz -C $(printf '%q' "$REMOTE_DIR")"
  install+=" && $(printf '%q' "$PYTHON") -m pip install -U $(printf '%q' "$JAX_SPEC")"
  install+=" -e $(printf '%q' "$REMOTE_DIR")"
  run "${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" --command="$install"
fi

# The same command on every worker: jaxlm-train, as `python -m jaxlm.cli train` (no PATH needed).
train="cd $(printf '%q' "$REMOTE_DIR") && $(printf '%q' "$PYTHON") -m jaxlm.cli train"
train+=" $(printf '%q ' "$CONFIG" distributed=true "$@")"
run "${GCLOUD[@]}" ssh "$TPU_NAME" "${FLAGS[@]}" --command="$train"
