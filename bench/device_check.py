"""One-command accelerator check: 1B MFU per remat policy, cuDNN vs XLA attention, lightning vs
cuDNN softmax, peak HBM -- one ``name=value`` line each (issue #18 §5).

    bash bench/device_check.sh             # on a GPU: <= 8 minutes on one H200
    bash bench/device_check.sh --dry-run   # tiny shapes on CPU (CI): every line, substitutes noted

What is measured (every timing: ``jax.block_until_ready`` per call, median of ``iters`` calls after
one untimed call that compiles):

* ``peak_tflops`` -- the device's achieved dense bf16 matmul rate, ``2 n^3 / t`` for an
  ``n x n @ n x n`` product (n = 8192; :func:`jaxlm.utils.flops.measure_peak_flops`, best of 10).
  A lower bound on the datasheet peak (H200 SXM: 989 dense bf16 TFLOP/s).
* ``mfu_1b_remat_{none,save_dots,full}`` and ``tokens_per_s_1b_remat_*`` -- the train step of the
  ``llama_1b`` preset (1.34B parameters, bf16 compute, f32 master weights and AdamW state, seq 256,
  ``--batch`` sequences per device) timed by ``bench/throughput.py``'s :func:`run`, so the MFU is
  its formula, ``flops_per_token * tokens_per_s / (n_devices * peak)``, with ``peak`` = the probe
  above (``cfg.peak_flops``). Model FLOPs: remat recomputation is not counted.
* ``peak_hbm_gib`` -- ``device.memory_stats()["peak_bytes_in_use"]`` right after the remat sweep
  (the process-wide peak so far, i.e. the largest of the three steps; remat none at these shapes).
* ``{xla,cudnn}_attn_ms_{2k,8k}`` and ``cudnn_over_xla_{2k,8k}`` -- the softmax attention op
  (:func:`jaxlm.ops.attention`, ``impl=xla`` / ``impl=cudnn``), forward + backward (grads of q, k,
  v), causal, no document mask, bf16, llama_1b's heads (32 x 64), batch * T = 16k tokens.
  ``cudnn_over_xla = xla_ms / cudnn_ms``: > 1 means cuDNN is faster.
* ``{lightning,lightning_jax,softmax_cudnn}_layer_ms_{8k,32k}`` and
  ``lightning_over_cudnn_{8k,32k}`` (Pallas kernel, ``model.linear_impl=pallas``),
  ``lightning_jax_over_cudnn_{8k,32k}`` (pure-JAX chunked form) -- one attention *layer* (the
  model's own module, projections included) forward + backward at sequence length 8k / 32k,
  d_model 2048, 32 heads of 64: a TNL lightning layer (``model.attention=tnl``) vs a softmax layer
  with ``model.attn_impl=cudnn``. Layer level because that is what a user swaps; the projections
  are a similar share of both. ``lightning_over_cudnn = softmax_ms / lightning_ms``. The Pallas
  kernel (jaxlm/ops/lightning_pallas.py) is a TPU kernel that refuses GPUs, so on a GPU the
  ``lightning_*`` (pallas) lines read ``unavailable:`` and ``lightning_jax_*`` is the GPU figure.

Each measurement is isolated: an exception prints ``name=error:<one line>`` (an impl the platform
or the installed jaxlm refuses: ``name=unavailable:<reason>``) and the check goes on. A time budget
(``--budget-s``, default 450 s on a device) skips what no longer fits: ``name=skipped:<why>``.

``--dry-run`` runs the same code path on tiny shapes on CPU so it never rots; names stay the same
(``2k`` etc. label the slot, not the size) and what the CPU cannot run is replaced, each with a
``# dry-run:`` line: ``cudnn`` -> ``xla``; ``linear_impl=pallas`` runs as the platform allows it
(Pallas interpret mode) or, if refused, ``jax``; ``peak_hbm_gib`` (CPU has no memory_stats) ->
the process's peak RSS.

Example (what the dry run prints, abridged)::

    peak_tflops=0.02
    mfu_1b_remat_none=0.0912
    cudnn_over_xla_2k=1.000
    lightning_over_cudnn_8k=0.41
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import os
import signal
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMATS = ("none", "save_dots", "full")
ATTN_SLOTS = ("2k", "8k")
LIGHTNING_SLOTS = ("8k", "32k")


def expected_names() -> list[str]:
    """Every ``name=`` line a complete run prints, in order (tests check each one)."""
    names = ["peak_tflops"]
    for r in REMATS:
        names += [f"tokens_per_s_1b_remat_{r}", f"mfu_1b_remat_{r}"]
    names.append("peak_hbm_gib")
    for s in ATTN_SLOTS:
        names += [f"xla_attn_ms_{s}", f"cudnn_attn_ms_{s}", f"cudnn_over_xla_{s}"]
    for s in LIGHTNING_SLOTS:
        names += [f"softmax_cudnn_layer_ms_{s}", f"lightning_layer_ms_{s}",
                  f"lightning_jax_layer_ms_{s}", f"lightning_over_cudnn_{s}",
                  f"lightning_jax_over_cudnn_{s}"]
    return names + ["device_check_s"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Shapes of one run: the device plan or the CPU dry-run plan."""
    dry_run: bool
    matmul_n: int  # peak probe: n x n @ n x n
    model_overrides: tuple  # on top of the llama_1b preset
    batch_per_device: int
    steps: int  # throughput.run: timed steps (twice) after `warmup`
    warmup: int
    heads: int  # softmax / lightning heads and head dim
    head_dim: int
    attn_len: dict  # slot -> sequence length
    attn_tokens: int  # batch = attn_tokens // T (>= 1)
    lightning_len: dict
    lightning_d_model: int
    lightning_chunk: int
    iters: int  # timed calls per attention measurement


DEVICE_PLAN = Plan(dry_run=False, matmul_n=8192, model_overrides=(), batch_per_device=64,
                   steps=5, warmup=2, heads=32, head_dim=64, attn_len={"2k": 2048, "8k": 8192},
                   attn_tokens=16384, lightning_len={"8k": 8192, "32k": 32768},
                   lightning_d_model=2048, lightning_chunk=64, iters=10)
DRY_PLAN = Plan(dry_run=True, matmul_n=256, model_overrides=(
    "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=4",
    "model.d_ff=128", "model.vocab_size=512", "data.seq_len=32"), batch_per_device=1, steps=1,
    warmup=1, heads=2, head_dim=16, attn_len={"2k": 64, "8k": 128}, attn_tokens=128,
    lightning_len={"8k": 64, "32k": 128}, lightning_d_model=32, lightning_chunk=16, iters=2)


class Unavailable(Exception):
    """The platform or the installed jaxlm cannot run this impl (printed as ``unavailable:``)."""


class Budget:
    """Wall-clock guard: ``fits(cost)`` is False once the estimated cost would overrun; a
    SIGALRM at the deadline interrupts a measurement between Python bytecodes."""

    def __init__(self, total_s: float):
        self.start, self.total = time.monotonic(), total_s
        if hasattr(signal, "SIGALRM"):
            signal.signal(signal.SIGALRM, self._alarm)
            signal.alarm(max(int(total_s), 1))

    @staticmethod
    def _alarm(signum, frame):
        raise TimeoutError("time budget exhausted mid-measurement")

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fits(self, cost_s: float) -> bool:
        return self.elapsed() + cost_s <= self.total


def emit(name: str, value) -> None:
    print(f"{name}={value}", flush=True)


def note(text: str) -> None:
    print(f"# {text}", flush=True)


def one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text}"[:300]


def guarded(names, budget: Budget, cost_s: float, fn, *args):
    """Run ``fn(*args)`` -> {name: value}; print each of ``names`` (value, or why not)."""
    if not budget.fits(cost_s):
        why = f"skipped:time budget ({budget.elapsed():.0f} s used of {budget.total:.0f} s)"
        for n in names:
            emit(n, why)
        return {}
    try:
        values = fn(*args)
    except Unavailable as e:
        values, why = {}, f"unavailable:{one_line(e.__cause__ or e)}"
    except Exception as e:  # noqa: BLE001 -- isolate each measurement, report it, go on
        values, why = {}, f"error:{one_line(e)}"
    for n in names:
        emit(n, values[n] if n in values else why)
    return values


def time_call(fn, *args, iters: int) -> float:
    """Median seconds of ``fn(*args)`` (blocked per call) after one untimed compile call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def refusal_is_unavailable(label: str):
    """An impl refused by config checks / dispatch (ConfigError, or a ValueError naming the
    impl) becomes :class:`Unavailable`; a crash inside a kernel stays an error."""
    from jaxlm.errors import ConfigError

    try:
        yield
    except (ConfigError, NotImplementedError, ValueError) as e:
        if isinstance(e, ValueError) and not isinstance(e, ConfigError) and "impl" not in str(e):
            raise
        raise Unavailable(label) from e


def peak_probe(plan: Plan) -> dict:
    from jaxlm.utils.flops import measure_peak_flops

    flops = measure_peak_flops("bfloat16", n=plan.matmul_n, repeats=10)
    return {"peak_tflops": f"{flops / 1e12:.4g}"}


def mfu_1b(plan: Plan, remat: str, peak_flops: float) -> dict:
    """bench/throughput.py's run() on the llama_1b preset with this remat policy."""
    import jax

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from throughput import run

    from jaxlm.config import load_config

    batch = plan.batch_per_device * jax.device_count()
    cfg = load_config("llama_1b", [*plan.model_overrides, "model.dtype=bfloat16",
                                   f"model.remat={remat}", f"train.batch_size={batch}",
                                   f"peak_flops={peak_flops}"])
    with small_probe(plan):
        r = run(cfg, steps=plan.steps, warmup=plan.warmup)
    note(f"1b remat={remat}: {r['params']:,} params, batch {batch} x {cfg.data.seq_len}, "
         f"loop {r['step_time_s'] * 1e3:.1f} ms/step, median {r['step_time_median_s'] * 1e3:.1f}"
         f" ms, first step {r['first_step_s']:.1f} s")
    return {f"tokens_per_s_1b_remat_{remat}": f"{r['tokens_per_s']:.1f}",
            f"mfu_1b_remat_{remat}": f"{r['mfu']:.4f}"}


@contextlib.contextmanager
def small_probe(plan: Plan):
    """Dry run: run()'s own 2048^3 matmul probes (unused: cfg.peak_flops is set) shrink to
    ``plan.matmul_n``; they cost seconds on a CPU, milliseconds on a GPU (left as they are)."""
    import jaxlm.utils.flops as flops

    original = flops.measure_peak_flops
    if plan.dry_run:
        flops.measure_peak_flops = lambda dtype, n, repeats: original(dtype, plan.matmul_n, 2)
    try:
        yield
    finally:
        flops.measure_peak_flops = original


def peak_hbm(plan: Plan) -> dict:
    """Process peak of device memory; on CPU (no memory_stats) the process's peak RSS instead."""
    import resource

    import jax

    stats = jax.devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return {"peak_hbm_gib": f"{stats['peak_bytes_in_use'] / 2**30:.2f}"}
    if not plan.dry_run:
        raise RuntimeError(f"{jax.devices()[0].platform} device has no memory_stats()")
    note("dry-run: CPU has no memory_stats(); peak_hbm_gib = this process's peak RSS so far "
         "(ru_maxrss)")
    return {"peak_hbm_gib": f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.3f}"}


def attn_op_ms(plan: Plan, impl: str, seq: int) -> float:
    """Softmax attention op fwd+bwd (grads of q, k, v) in ms; ``impl`` as jaxlm.ops.attention."""
    import jax
    import jax.numpy as jnp

    from jaxlm.ops.attention import attention

    b = max(plan.attn_tokens // seq, 1)
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(kk, (b, seq, plan.heads, plan.head_dim), jnp.bfloat16)
               for kk in keys)  # [B, T, H, K] each (no GQA: llama_1b)

    def loss(q, k, v):
        return attention(q, k, v, None, impl=impl).astype(jnp.float32).sum()

    with refusal_is_unavailable(f"attn_impl={impl}"):
        return time_call(jax.jit(jax.grad(loss, argnums=(0, 1, 2))), q, k, v,
                         iters=plan.iters) * 1e3


def layer_ms(plan: Plan, seq: int, overrides: list) -> float:
    """One attention layer of the model (projections included) fwd+bwd in ms, built from
    ``overrides`` on the default config with llama_1b's width; grads of params and input."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxlm.config import load_config
    from jaxlm.model.layers import ATTENTION

    importlib.import_module("jaxlm.model.linear")  # registers model.attention=tnl etc.
    d, h, b = plan.lightning_d_model, plan.heads, max(plan.attn_tokens // seq, 1)
    with refusal_is_unavailable(" ".join(overrides)):
        m = load_config(None, [f"model.d_model={d}", f"model.n_heads={h}", "model.n_layers=24",
                               f"model.linear_chunk={plan.lightning_chunk}",
                               "model.dtype=bfloat16", *overrides]).model
        layer = ATTENTION[m.attention](m, rngs=nnx.Rngs(0), layer=1)  # layer 1: no TNL LRPE
        graphdef, params = nnx.split(layer)
        x = jax.random.normal(jax.random.key(1), (b, seq, d), jnp.bfloat16)  # [B, T, D]
        pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (b, seq))  # [B, T]

        def loss(params, x):
            y, _ = nnx.merge(graphdef, params)(x, pos)
            return y.astype(jnp.float32).sum()

        return time_call(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x,
                         iters=plan.iters) * 1e3


def cpu_substitute(plan: Plan, impl: str) -> str:
    """cuDNN runs on NVIDIA GPUs only: the dry run times xla in its place (and says so)."""
    if plan.dry_run and impl == "cudnn":
        import jax

        if jax.default_backend() != "gpu":
            note(f"dry-run: attn_impl=cudnn needs a GPU ({jax.default_backend()} here): "
                 "timing attn_impl=xla in its place")
            return "xla"
    return impl


def pallas_layer_ms(plan: Plan, seq: int) -> float:
    """Lightning layer with model.linear_impl=pallas; in a dry run, jax if the platform refuses."""
    if importlib.util.find_spec("jaxlm.ops.lightning_pallas") is None:
        raise Unavailable(RuntimeError("this jaxlm has no Pallas lightning kernel "
                                       "(jaxlm/ops/lightning_pallas.py)"))
    overrides = ["model.attention=tnl", "model.linear_norm=all"]
    if plan.dry_run:
        import jax

        note(f"dry-run: model.linear_impl=pallas on {jax.default_backend()} runs in Pallas "
             "interpret mode (a correctness path, not a speed figure)")
    try:
        return layer_ms(plan, seq, overrides + ["model.linear_impl=pallas"])
    except Unavailable:
        if not plan.dry_run:
            raise
        note("dry-run: model.linear_impl=pallas refused on this platform: timing "
             "linear_impl=jax in its place")
        return layer_ms(plan, seq, overrides + ["model.linear_impl=jax"])


def ratio(values: dict, name: str, num: str, den: str) -> dict:
    if num not in values or den not in values:
        missing = num if num not in values else den
        raise Unavailable(RuntimeError(f"needs {missing}"))
    return {name: f"{float(values[num]) / float(values[den]):.3f}"}


def timed(name: str, fn, *args) -> dict:
    return {name: f"{fn(*args):.3f}"}


def softmax_layer_ms(plan: Plan, seq: int) -> float:
    return layer_ms(plan, seq, [f"model.attn_impl={cpu_substitute(plan, 'cudnn')}"])


def jax_layer_ms(plan: Plan, seq: int) -> float:
    return layer_ms(plan, seq, ["model.attention=tnl", "model.linear_norm=all",
                                "model.linear_impl=jax"])


def attention_checks(plan: Plan, budget: Budget, cost: dict) -> None:
    for slot, seq in plan.attn_len.items():
        got = {}
        for impl in ("xla", "cudnn"):
            n = f"{impl}_attn_ms_{slot}"
            got |= guarded([n], budget, cost["attn"],
                           lambda i: timed(n, attn_op_ms, plan, cpu_substitute(plan, i), seq), impl)
        guarded([f"cudnn_over_xla_{slot}"], budget, 0, ratio, got, f"cudnn_over_xla_{slot}",
                f"xla_attn_ms_{slot}", f"cudnn_attn_ms_{slot}")


def lightning_checks(plan: Plan, budget: Budget, cost: dict) -> None:
    for slot, seq in plan.lightning_len.items():
        got = {}
        for name, fn in ((f"softmax_cudnn_layer_ms_{slot}", softmax_layer_ms),
                         (f"lightning_layer_ms_{slot}", pallas_layer_ms),
                         (f"lightning_jax_layer_ms_{slot}", jax_layer_ms)):
            got |= guarded([name], budget, cost["layer"], timed, name, fn, plan, seq)
        for kind, den in (("lightning", "lightning"), ("lightning_jax", "lightning_jax")):
            guarded([f"{kind}_over_cudnn_{slot}"], budget, 0, ratio, got,
                    f"{kind}_over_cudnn_{slot}", f"softmax_cudnn_layer_ms_{slot}",
                    f"{den}_layer_ms_{slot}")


def run_all(plan: Plan, budget: Budget) -> None:
    """Every measurement in order, each isolated (see the module docstring)."""
    import jax

    dev = jax.devices()[0]
    note(f"device: {jax.device_count()} x {dev.device_kind} ({dev.platform}), jax "
         f"{jax.__version__}{', DRY RUN (tiny shapes)' if plan.dry_run else ''}")
    cost = ({"probe": 5, "mfu": 30, "attn": 5, "layer": 5} if plan.dry_run else
            {"probe": 15, "mfu": 75, "attn": 15, "layer": 20})
    got = guarded(["peak_tflops"], budget, cost["probe"], peak_probe, plan)
    peak = float(got["peak_tflops"]) * 1e12 if "peak_tflops" in got else 0.0
    for remat in REMATS:
        names = [f"tokens_per_s_1b_remat_{remat}", f"mfu_1b_remat_{remat}"]
        guarded(names, budget, cost["mfu"], mfu_1b, plan, remat, peak)
    guarded(["peak_hbm_gib"], budget, 1, peak_hbm, plan)
    attention_checks(plan, budget, cost)
    lightning_checks(plan, budget, cost)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bash bench/device_check.sh",
                                description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU (CI)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total time budget in seconds (default 450 on a device, 900 dry)")
    p.add_argument("--batch", type=int, default=None,
                   help="1B step: sequences of 256 tokens per device (default 64)")
    a = p.parse_args(argv)
    if a.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    plan = DRY_PLAN if a.dry_run else DEVICE_PLAN
    if a.batch is not None:
        if a.batch < 1:
            print(f"error: --batch={a.batch} must be >= 1", file=sys.stderr)
            return 2
        plan = dataclasses.replace(plan, batch_per_device=a.batch)
    import jax

    if not a.dry_run and jax.default_backend() == "cpu":
        print("error: no accelerator here (jax backend cpu); run with --dry-run for the CPU "
              "smoke test", file=sys.stderr)
        return 2
    budget = Budget(a.budget_s or (900.0 if a.dry_run else 450.0))
    run_all(plan, budget)
    if hasattr(signal, "SIGALRM"):
        signal.alarm(0)
    emit("device_check_s", f"{budget.elapsed():.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
