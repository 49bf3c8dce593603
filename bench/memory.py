"""Memory of the train step at large vocabularies: the fused, chunked head + loss vs the full logits.

    python bench/memory.py                 # vocab 32k, 128k, 256k on configs/bench_tiny_llama.yaml
    python bench/memory.py --vocab 131072  # one size

For each vocabulary size the train step of ``configs/bench_tiny_llama.yaml`` (d_model 256, 4
layers, 8 × 256 tokens, remat full, one device) is compiled twice — ``model.head_chunk=0`` (the
[tokens, vocab] logits and their gradient materialised, as before issue #18) and the default
``model.head_chunk=-1`` (jaxlm/ops/head_loss.py: the head's gradients formed in the forward pass,
over chunks of at most 32 MiB of logits) — and
XLA's memory analysis of two compiled programs gives their temporary bytes: the loss gradient
(forward + backward, where the head and the loss live) and the whole train step (that plus the
optimizer update; parameters and optimizer state are arguments, not temporaries). Nothing is
run, so the figures do not drift with the machine's load. Prints one table line per size,
``head_loss_temp_ratio_128k=`` (chunked / full temporaries of the loss gradient at vocab 131072;
issue target <= 0.25) and ``step_temp_ratio_128k=`` (the same for the whole step, whose
remaining temporaries at a large vocabulary are the AdamW update of the [V, D] tables).

Peak RSS vs MaxText (``rss_vs_maxtext=``, issue target <= 0.6): the MaxText-comparison config of
bench/vs_maxtext.sh run as two child processes of this one, in MaxText's venv (bench/maxtext_env.sh;
one venv, so both run the same jax/jaxlib): MaxText's trainer for ``--rss-steps`` steps and
jaxlm's bench/throughput.py on configs/bench_tiny_llama.yaml (5 warm-up + 2 x (steps - 5) steps).
Each child's peak resident set is the ``ru_maxrss`` that ``os.wait4`` returns for it (Linux: KiB;
the high-water mark of the whole process, imports and compilation included). The ratio is
``jaxlm / MaxText``. Without that venv the line is ``rss_vs_maxtext=unavailable:<reason>`` (create
it with ``bash bench/maxtext_env.sh``, 10-20 minutes, needs PyPI).

    python bench/memory.py --rss-only      # just the two RSS runs (~1-2 minutes on 2 cores)
    python bench/memory.py --no-rss        # just the compiled-memory table
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (32768, 131072, 262144)


def step_temp_bytes(vocab: int, head_chunk: int) -> dict:
    """XLA's memory analysis of the compiled train step (nothing allocated, nothing run)."""
    import jax

    from jaxlm.config import load_config
    from jaxlm.optim import build_optimizer
    from jaxlm.data.pipeline import BATCH_KEYS
    from jaxlm.sharding import batch_sharding, make_mesh
    from jaxlm.train.state import StateSpec
    from jaxlm.train.step import loss_fn, make_train_step

    cfg = load_config(os.path.join(ROOT, "configs", "bench_tiny_llama.yaml"),
                      [f"model.vocab_size={vocab}", f"model.head_chunk={head_chunk}"])
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    shape, sharding = (cfg.train.batch_size, cfg.data.seq_len), batch_sharding(spec.mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, jax.numpy.float32 if k == "loss_mask" else
                                     jax.numpy.int32, sharding=sharding) for k in BATCH_KEYS}
    abstract = spec.abstract_with_shardings()
    grad = jax.jit(lambda p, b: jax.grad(lambda q: loss_fn(spec, q, b, 1.0)[0])(p))
    with jax.set_mesh(spec.mesh):
        step = make_train_step(spec).jitted.lower(abstract, batch).compile().memory_analysis()
        fwd_bwd = grad.lower(abstract["params"], batch).compile().memory_analysis()
    return {"temp": step.temp_size_in_bytes, "grad_temp": fwd_bwd.temp_size_in_bytes,
            "logits": cfg.train.batch_size * cfg.data.seq_len * vocab * 4}


def maxtext_command(steps: int) -> tuple[str, list]:
    """(MaxText venv python, MaxText trainer argv) from bench/maxtext_env.sh, never installing."""
    script = ('source "$0" && maxtext_args 1 "$1" && '
              'printf "%s\\0" "$PY" -m maxtext.trainers.pre_train.train "$BASE_YML" '
              '"${MAXTEXT_ARGS[@]}"')
    env = dict(os.environ, MAXTEXT_ENV_CHECK_ONLY="1", JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", "-c", script, os.path.join(ROOT, "bench", "maxtext_env.sh"),
                          str(steps)], env=env, capture_output=True, text=True)
    if out.returncode:
        last = (out.stderr.strip().splitlines() or ["bench/maxtext_env.sh failed"])[-1]
        raise RuntimeError(last.removeprefix("error: "))
    argv = out.stdout.split("\0")[:-1]
    return argv[0], argv


# Runs argv[2:] and writes its peak RSS (KiB) to argv[1]. Why a wrapper: Linux carries the
# forking process's high-water RSS into the child's ru_maxrss across exec (even for vfork /
# posix_spawn, which share the parent's memory until exec), so a child of a large process (pytest,
# or this script after compiling) would report at least its parent's size. The wrapper is a fresh,
# small interpreter; its own child's ru_maxrss is the command's alone.
_WRAP = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
         "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
         "sys.exit(rc)")


def child_peak_rss(argv: list, env: dict, log: str) -> int:
    """Run ``argv`` (output to ``log``); its peak RSS in bytes (rusage, through :data:`_WRAP`)."""
    out = log + ".maxrss"
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-c", _WRAP, out, *argv], stdout=f,
                             stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if rc:
        raise RuntimeError(f"{os.path.basename(argv[1 if argv[1] != '-m' else 2])} exited "
                           f"{rc} (log: {log})")
    with open(out) as f:
        return int(f.read()) * 1024  # Linux reports KiB


def rss_vs_maxtext(steps: int, overrides=()) -> dict:
    """Peak RSS of MaxText's and jaxlm's train-step runs of the comparison config (docstring)."""
    py, maxtext_argv = maxtext_command(steps)
    env = dict(os.environ, JAX_PLATFORMS="cpu", DECOUPLE_GCLOUD="TRUE")
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()  # one device, as the issue's
    jaxlm_argv = [py, os.path.join(ROOT, "bench", "throughput.py"),
                  os.path.join(ROOT, "configs", "bench_tiny_llama.yaml"), "mesh.fsdp=1",
                  "train.batch_size=8", *overrides, "--steps", str(max(steps - 5, 1)),
                  "--warmup", "5"]
    logs = os.path.join(tempfile.gettempdir(), "jaxlm_memory_rss")
    os.makedirs(logs, exist_ok=True)
    mt = child_peak_rss(maxtext_argv, env, os.path.join(logs, "maxtext.log"))
    jl = child_peak_rss(jaxlm_argv, dict(env, PYTHONPATH=ROOT), os.path.join(logs, "jaxlm.log"))
    return {"maxtext": mt, "jaxlm": jl}


def print_rss(steps: int, overrides=()) -> None:
    try:
        r = rss_vs_maxtext(steps, overrides)
    except (RuntimeError, OSError) as e:
        print(f"rss_vs_maxtext=unavailable:{' '.join(str(e).split())}")
        return
    mib = 1 << 20
    print(f"peak RSS, comparison config, {steps} steps: jaxlm{' ' if overrides else ''}"
          f"{' '.join(overrides)} {r['jaxlm'] / mib:.0f} MiB, "
          f"MaxText {r['maxtext'] / mib:.0f} MiB")
    print(f"rss_jaxlm_mib={r['jaxlm'] / mib:.0f}")
    print(f"rss_maxtext_mib={r['maxtext'] / mib:.0f}")
    print(f"rss_vs_maxtext={r['jaxlm'] / r['maxtext']:.3f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, action="append", help="vocabulary size(s)")
    p.add_argument("--rss-steps", type=int, default=10,
                   help="MaxText steps of the RSS comparison (jaxlm: 5 warm-up + 2 x (N - 5))")
    p.add_argument("--jaxlm-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for jaxlm's RSS run only (e.g. model.head_chunk=64)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--rss-only", action="store_true", help="only the rss_vs_maxtext runs")
    g.add_argument("--no-rss", action="store_true", help="skip the rss_vs_maxtext runs")
    a = p.parse_args(argv)
    if a.rss_steps < 6:
        p.error(f"--rss-steps={a.rss_steps} must be >= 6 (5 warm-up steps, then timed ones)")
    if not a.rss_only:
        print_table(tuple(a.vocab or SIZES))
    if not a.no_rss:
        print_rss(a.rss_steps, tuple(a.jaxlm_override))
    return 0


def print_table(sizes: tuple) -> None:
    """The compiled-memory table and the head_loss/step temp ratios at vocab 128k."""
    gib = 1 << 30
    print("| vocab | f32 logits | loss gradient (fwd+bwd): full / chunked / ratio | whole step "
          "(+ optimizer update): full / chunked / ratio |")
    print("|---|---|---|---|")
    ratios = {}
    for v in sizes:
        full, chunked = step_temp_bytes(v, 0), step_temp_bytes(v, -1)
        ratios[v] = (chunked["grad_temp"] / full["grad_temp"], chunked["temp"] / full["temp"])
        print(f"| {v:,} | {full['logits'] / gib:.2f} GiB | {full['grad_temp'] / gib:.3f} / "
              f"{chunked['grad_temp'] / gib:.3f} GiB / {ratios[v][0]:.3f} | "
              f"{full['temp'] / gib:.3f} / {chunked['temp'] / gib:.3f} GiB / {ratios[v][1]:.3f} |",
              flush=True)
    if 131072 in ratios:
        print(f"head_loss_temp_ratio_128k={ratios[131072][0]:.3f}")
        print(f"step_temp_ratio_128k={ratios[131072][1]:.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
