"""jaxlm.ops.lightning_pallas (Pallas interpret mode on CPU): forward values and gradients (q, k, v,
decay, initial state) vs a float64 reference and the pure-JAX chunked form, with per-head and
per-token decay, document resets, T not a multiple of C, bf16; under a (data, tensor) mesh via
shard_map; a tiny TNL model's loss and gradients with linear_impl=pallas == jax; and, where libtpu
is installed, the kernels and a TNL train step compiled ahead of time for a TPU topology."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm.errors import ConfigError
from jaxlm.ops import linear_attention_reset
from jaxlm.ops.lightning_pallas import lightning_attention

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None


def ref_np(q, k, v, g, s0, reset):
    """float64 token loop: S_t = e^{g_t}(1 - r_t) S_{t-1} + k_t v_tᵀ, o_t = q_tᵀ S_t."""
    q, k, v, s = (np.asarray(a, np.float64) for a in (q, k, v, s0))
    g = np.broadcast_to(np.asarray(g, np.float64), q.shape[:3])
    o = np.zeros(v.shape)
    for i in range(q.shape[1]):
        a = np.exp(g[:, i]) * (1 - reset[:, i:i + 1])  # [B, H]
        s = a[..., None, None] * s + k[:, i, :, :, None] * v[:, i, :, None, :]
        o[:, i] = np.einsum("bhk,bhkv->bhv", q[:, i], s)
    return o, s


def inputs(seed, b=2, t=37, h=3, dk=8, dv=6, decay="data", resets=True):
    r = np.random.default_rng(seed)
    q, k = r.normal(size=(2, b, t, h, dk)).astype(np.float32) * 0.5
    v = r.normal(size=(b, t, h, dv)).astype(np.float32)
    g = {"none": np.zeros((h,), np.float32),
         "head": np.log(1 - 2.0 ** (-1.0 - np.arange(h))).astype(np.float32),  # [H]
         "data": np.log(r.uniform(0.6, 1.0, size=(b, t, h))).astype(np.float32)}[decay]
    reset = (r.uniform(size=(b, t)) < 0.15) if resets else np.zeros((b, t), bool)
    s0 = r.normal(size=(b, h, dk, dv)).astype(np.float32)
    return q, k, v, g, reset, s0


def rel(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / (np.max(np.abs(b)) + 1e-30))


def run(impl, form="chunked", chunk=8):
    return jax.jit(lambda q, k, v, g, r, s0: linear_attention_reset(
        q, k, v, g, r, form=form, chunk_size=chunk, initial_state=s0, return_state=True,
        impl=impl))


@pytest.mark.parametrize("chunk,decay,resets", [(8, "head", True), (16, "data", False),
                                                (5, "none", True)])
def test_forward_matches_float64_and_jax_chunked(chunk, decay, resets):
    q, k, v, g, reset, s0 = inputs(0, decay=decay, resets=resets)  # T=37: not a multiple of C
    o, s = run("pallas", chunk=chunk)(q, k, v, g, reset, s0)
    o_ref, s_ref = ref_np(q, k, v, g, s0, reset)
    assert o.shape == (2, 37, 3, 6) and s.shape == (2, 3, 8, 6) and s.dtype == jnp.float32
    assert rel(o, o_ref) < 2e-6 and rel(s, s_ref) < 2e-6
    o_jax, s_jax = run("jax", chunk=chunk)(q, k, v, g, reset, s0)
    assert rel(o, o_jax) < 2e-6 and rel(s, s_jax) < 2e-6


def test_bfloat16_inputs_and_one_line_errors():
    q, k, v, g, reset, s0 = inputs(1, t=24, decay="head")
    bf = [jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)]
    o, s = run("pallas", chunk=8)(*bf, g, reset, s0)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, _ = ref_np(*(np.asarray(a, np.float32) for a in bf), g, s0, reset)
    assert rel(o.astype(jnp.float32), o_ref) < 2e-2
    loss = lambda impl: lambda q, k, v: jnp.sum(jnp.sin(linear_attention_reset(
        q, k, v, g, reset, chunk_size=8, initial_state=s0, impl=impl).astype(jnp.float32)))
    grads = jax.jit(jax.grad(loss("pallas"), argnums=(0, 1, 2)))(*bf)
    ref = jax.jit(jax.grad(loss("jax"), argnums=(0, 1, 2)))(*(a.astype(jnp.float32) for a in bf))
    for a, r in zip(grads, ref):
        assert a.dtype == jnp.bfloat16 and rel(a.astype(jnp.float32), np.asarray(r)) < 3e-2
    with pytest.raises(ConfigError, match="linear_chunk"):
        lightning_attention(q, k, v, g, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        linear_attention_reset(q, k, v, g, impl="triton")


def _grads(impl, form, chunk, args):
    q, k, v, g, reset, s0 = args

    def loss(q, k, v, g, s0):
        o, s = linear_attention_reset(q, k, v, g, reset, form=form, chunk_size=chunk,
                                      initial_state=s0, return_state=True, impl=impl)
        return jnp.sum(o * jnp.cos(o)) + 0.5 * jnp.sum(s * s)  # non-trivial do and dS_T

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, g, s0)


@pytest.mark.parametrize("decay,dk", [("data", 8), ("head", 8), ("data", 128)])
def test_gradients_match_float64_and_jax_chunked(decay, dk):
    """dq, dk, dv, d(log_decay) ([B, T, H] or summed to [H]) and d(initial_state); K=128 ≠ V."""
    args = inputs(2, t=21, dk=dk, decay=decay)  # resets, initial state, T=21 with C=8
    got = _grads("pallas", "chunked", 8, args)
    with jax.enable_x64():
        ref = _grads("jax", "naive", 8, [np.asarray(a, np.float64) if a.dtype == np.float32
                                         else a for a in args])
    jax_chunked = _grads("jax", "chunked", 8, args)
    for name, a, r, j in zip(["q", "k", "v", "g", "s0"], got, ref, jax_chunked):
        assert a.shape == r.shape, name
        assert rel(a, np.asarray(r)) < 2e-5, name
        assert rel(a, np.asarray(j)) < 2e-5, name


def test_sharded_under_mesh_matches_single_device():
    """Mesh data=2, tensor=4: shard_map splits batch and heads; values and grads unchanged."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxlm.config import MeshConfig
    from jaxlm.sharding import make_mesh

    q, k, v, g, reset, s0 = inputs(3, b=2, t=12, h=4, decay="data")

    def f(q, k, v, g):
        o = lightning_attention(q, k, v, g, reset, chunk_size=4)
        return jnp.sum(o * o), o

    fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))
    (_, o_ref), g_ref = fn(q, k, v, g)
    mesh = make_mesh(MeshConfig(data=2, fsdp=1, tensor=4))
    put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", None, "tensor")))
    with jax.set_mesh(mesh):
        lowered = fn.lower(*map(put, (q, k, v, g)))
        (_, o), grads = fn(*map(put, (q, k, v, g)))
    assert "shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()
    np.testing.assert_allclose(o, o_ref, atol=1e-5 * np.abs(o_ref).max())
    for a, r in zip(grads, g_ref):
        np.testing.assert_allclose(a, r, atol=1e-5 * np.abs(r).max())


def test_tnl_model_loss_and_grads_pallas_equal_jax():
    """A tiny TNL model (LRPE, layer decay, packed documents, T=10 with C=4): the train step's
    loss and parameter gradients are the same with linear_impl=pallas and jax."""
    from jaxlm.config import ModelConfig
    from jaxlm.model import Transformer

    toks = jax.random.randint(jax.random.key(1), (2, 11), 0, 40)
    seg = jnp.array([[1] * 6 + [2] * 4, [1] * 10])
    pos = jnp.array([list(range(6)) + list(range(4)), list(range(10))])
    out = {}
    for impl in ("pallas", "jax"):
        cfg = ModelConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48,
                          vocab_size=40, linear_chunk=4, attention="tnl", linear_impl=impl)
        model = Transformer(cfg, rngs=nnx.Rngs(0))

        def loss(m):
            logits = m(toks[:, :-1], pos, seg)[0].astype(jnp.float32)  # [2, 10, 40]
            logp = jax.nn.log_softmax(logits)
            return -jnp.mean(jnp.take_along_axis(logp, toks[:, 1:, None], -1))

        out[impl] = nnx.jit(nnx.value_and_grad(loss))(model)
        assert ("pallas_call" in str(jax.make_jaxpr(lambda: loss(model))())) == (impl == "pallas")
    (lp, gp), (lj, gj) = out["pallas"], out["jax"]
    assert np.isfinite(lp) and abs(float(lp) - float(lj)) < 1e-6
    flat_p, flat_j = jax.tree.leaves(nnx.state(gp)), jax.tree.leaves(nnx.state(gj))
    assert len(flat_p) == len(flat_j) > 5
    for a, b in zip(flat_p, flat_j):
        np.testing.assert_allclose(a, b, atol=1e-5 * (np.abs(b).max() + 1e-12))


def test_variant_layers_pallas_equal_jax():
    """linear (elu+1, V+1 state), retnet, simple_gla (per-token decay from x): layer outputs and
    d/dx (through q, k, v and the decay) are the same with linear_impl=pallas and jax."""
    from jaxlm.config import ModelConfig
    from jaxlm.model import ATTENTION

    x = jax.random.normal(jax.random.key(3), (2, 9, 32))
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    mods = {(a, impl): ATTENTION[a](ModelConfig(
        d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=48, vocab_size=40, linear_chunk=4,
        attention=a, linear_impl=impl), rngs=nnx.Rngs(0))
        for a in ("linear", "retnet", "simple_gla") for impl in ("pallas", "jax")}

    @jax.jit
    def run(x):
        return {key: jax.value_and_grad(lambda x: jnp.sum(jnp.sin(m(x, pos)[0])))(x)
                for key, m in mods.items()}

    out = run(x)
    for (a, impl), m in mods.items():  # the kernel is really used (and only when asked for)
        jaxpr = str(jax.make_jaxpr(lambda x, m=m: m(x, pos)[0])(x))
        assert ("pallas_call" in jaxpr) == (impl == "pallas"), (a, impl)
    for a in ("linear", "retnet", "simple_gla"):
        (vp, gp), (vj, gj) = out[a, "pallas"], out[a, "jax"]
        assert abs(float(vp - vj)) < 1e-4 * (abs(float(vj)) + 1), a
        np.testing.assert_allclose(gp, gj, atol=1e-5 * np.abs(gj).max(), err_msg=a)


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
def test_tpu_compiles_the_kernels_and_a_tnl_train_step():
    """Mosaic compiles the three kernels (fwd, dq, dk/dv) for a TPU; the TNL train step with
    linear_impl=pallas compiles for v5e:4x4 with fsdp=8, tensor=2 (kernels under shard_map)."""
    from jax.sharding import SingleDeviceSharding

    from jaxlm.config import load_config
    from jaxlm.plan.compile import compile_train_step, memory_analysis, tpu_devices

    devices = tpu_devices("v5e:4x4")
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=SingleDeviceSharding(
        devices[0]))
    x = sds((1, 512, 2, 128), jnp.bfloat16)
    loss = lambda q, k, v, g: jnp.sum(lightning_attention(q, k, v, g, chunk_size=128) ** 2)
    kernels = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(
        x, x, x, sds((1, 512, 2), jnp.float32)).compile()
    assert kernels.as_text().count('custom_call_target="tpu_custom_call"') == 3
    cfg = load_config("tiny", ["model.vocab_size=256", "train.batch_size=16", "mesh.fsdp=8",
                               "mesh.tensor=2", "model.attention=tnl", "model.n_kv_heads=0",
                               "model.linear_impl=pallas", "model.linear_chunk=16"])
    step = compile_train_step(cfg, devices)
    assert step.platform == "tpu" and memory_analysis(step.compiled)["temp"] > 0
    assert step.compiled.as_text().count('custom_call_target="tpu_custom_call"') >= 3
