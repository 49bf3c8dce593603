"""Schedules against closed forms, weight-decay masks, AdamW vs. a numpy reference, registry."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxlm import config as config_mod
from jaxlm.config import Config, ConfigError, OptimConfig, TrainConfig, load_config
from jaxlm.optim import (OPTIMIZERS, build_optimizer, decay_mask, lr_at, make_schedule,
                         register_optimizer, with_clipping)

LR, LR_MIN = 1e-3, 1e-4  # min_lr_ratio = 0.1


def _values(t: TrainConfig, counts):
    sched = make_schedule(t)
    return [float(sched(i)) for i in counts]


# ----------------------------------------------------------------------------------- schedules
def test_cosine_key_steps():
    t = TrainConfig(steps=100, lr=LR, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    # i = optax count (0-based); update k = i + 1 uses lr*k/W during warmup.
    got = _values(t, [0, 4, 9, 54, 99, 500])
    want = [LR / 10, LR * 5 / 10, LR, LR_MIN + (LR - LR_MIN) / 2, LR_MIN, LR_MIN]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for i in (20, 37, 80):
        k = i + 1
        closed = LR_MIN + (LR - LR_MIN) * 0.5 * (1 + math.cos(math.pi * (k - 10) / 90))
        np.testing.assert_allclose(_values(t, [i])[0], closed, rtol=1e-5)


def test_wsd_key_steps():
    t = TrainConfig(steps=100, lr=LR, warmup_steps=10, min_lr_ratio=0.1, schedule="wsd",
                    decay_fraction=0.2)
    # decay covers updates k = 81..100; k = 80 is the last stable one; k = 90 is half-way.
    got = _values(t, [0, 9, 50, 79, 80, 89, 99, 150])
    want = [LR / 10, LR, LR, LR, LR + (LR_MIN - LR) / 20, LR + (LR_MIN - LR) / 2, LR_MIN, LR_MIN]
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_constant_and_edge_cases():
    const = TrainConfig(steps=50, lr=LR, warmup_steps=4, schedule="constant")
    np.testing.assert_allclose(_values(const, [0, 3, 49, 99]), [LR / 4, LR, LR, LR], rtol=1e-6)
    no_warm = dataclasses.replace(const, warmup_steps=0)
    np.testing.assert_allclose(_values(no_warm, [0, 10]), [LR, LR], rtol=1e-6)
    cos0 = TrainConfig(steps=100, lr=LR, warmup_steps=0, schedule="cosine")
    first = LR_MIN + (LR - LR_MIN) * 0.5 * (1 + math.cos(math.pi / 100))
    np.testing.assert_allclose(_values(cos0, [0, 99]), [first, LR_MIN], rtol=1e-5)
    # warmup longer than the run is clamped to `steps`: the last update reaches the peak.
    long = TrainConfig(steps=20, lr=LR, warmup_steps=1000, schedule="cosine")
    np.testing.assert_allclose(_values(long, [0, 19]), [LR / 20, LR], rtol=1e-5)
    # wsd decay never overlaps warmup: D = min(5, 10 - 9) = 1.
    tight = TrainConfig(steps=10, lr=LR, warmup_steps=9, schedule="wsd", decay_fraction=0.5)
    np.testing.assert_allclose(_values(tight, [7, 8, 9]), [LR * 8 / 9, LR, LR_MIN], rtol=1e-5)


def test_schedule_spans_steps_not_stop_at_and_jits():
    t = TrainConfig(steps=100, lr=LR, warmup_steps=10, schedule="wsd")
    counts = [0, 30, 85, 99]
    assert _values(t, counts) == _values(dataclasses.replace(t, stop_at=40), counts)
    sched = jax.jit(make_schedule(t))
    np.testing.assert_allclose(float(sched(jnp.int32(85))), _values(t, [85])[0], rtol=1e-6)
    cfg = Config(train=t)
    assert lr_at(cfg, 0) == pytest.approx(LR / 10, rel=1e-5)


def test_bad_schedule_is_config_error():
    with pytest.raises(ConfigError, match="train.schedule"):
        make_schedule(TrainConfig(schedule="linear"))
    with pytest.raises(ConfigError, match="decay_fraction"):
        make_schedule(TrainConfig(schedule="wsd", decay_fraction=1.5))


# -------------------------------------------------------------------------------------- masks
def _dict_params():
    z = jnp.zeros
    return {
        "embed": {"embedding": z((11, 4))},
        "blocks": {"attn": {"wq": {"kernel": z((2, 4, 4))}, "wk": {"kernel": z((2, 4, 2))}},
                   "mlp": {"w_gate": {"kernel": z((2, 4, 8))}},
                   "attn_norm": {"scale": z((2, 4))}},
        "final_norm": {"scale": z((4,))},
        "lm_head": {"kernel": z((4, 11)), "bias": z((11,))},
    }


def _expected(wd_norms=False, wd_embeddings=False):
    return {
        "embed": {"embedding": wd_embeddings},
        "blocks": {"attn": {"wq": {"kernel": True}, "wk": {"kernel": True}},
                   "mlp": {"w_gate": {"kernel": True}},
                   "attn_norm": {"scale": wd_norms}},
        "final_norm": {"scale": wd_norms},
        "lm_head": {"kernel": wd_embeddings, "bias": False},
    }


@pytest.mark.parametrize("wd_norms,wd_embeddings", [(False, False), (True, False), (False, True)])
def test_decay_mask_plain_dict(wd_norms, wd_embeddings):
    o = OptimConfig(wd_norms=wd_norms, wd_embeddings=wd_embeddings)
    assert decay_mask(_dict_params(), o) == _expected(wd_norms, wd_embeddings)


class _Attn(nnx.Module):
    def __init__(self, rngs):
        self.wq = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(4, 2, use_bias=False, rngs=rngs)


class _Mlp(nnx.Module):
    def __init__(self, rngs):
        self.w_gate = nnx.Linear(4, 8, use_bias=False, rngs=rngs)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.attn = _Attn(rngs)
        self.mlp = _Mlp(rngs)
        self.attn_norm = nnx.RMSNorm(4, rngs=rngs)


class _Tiny(nnx.Module):
    """Same parameter paths as the jaxlm LLaMA (without the stacked layer axis)."""

    def __init__(self, rngs):
        self.embed = nnx.Embed(11, 4, rngs=rngs)
        self.blocks = _Block(rngs)
        self.final_norm = nnx.RMSNorm(4, rngs=rngs)
        self.lm_head = nnx.Linear(4, 11, use_bias=True, rngs=rngs)


@pytest.fixture(scope="module")
def nnx_params():
    """``nnx.split(model, nnx.Param)`` state; shapes via eval_shape, values from numpy (fast)."""
    _, abstract = nnx.split(nnx.eval_shape(lambda: _Tiny(nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(s.dtype)), abstract)


def test_decay_mask_nnx_state(nnx_params):
    params = nnx_params
    assert isinstance(params["blocks"]["attn"]["wq"]["kernel"], nnx.Param)
    mask = decay_mask(params, OptimConfig())
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    assert nnx.to_pure_dict(mask) == _expected()
    mask = decay_mask(params, OptimConfig(wd_norms=True, wd_embeddings=True))
    assert nnx.to_pure_dict(mask) == _expected(True, True)


def test_adamw_decays_only_masked_leaves_on_nnx_state(nnx_params):
    """Zero gradients: Adam's direction is 0, so the update is exactly -lr * wd * p * mask."""
    cfg = Config(train=TrainConfig(steps=10, lr=0.5, warmup_steps=0, schedule="constant"),
                 optim=OptimConfig(weight_decay=0.1))
    params = nnx_params
    tx = build_optimizer(cfg)
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    want = jax.tree.map(lambda p, m: -0.5 * 0.1 * np.asarray(p) * m, params,
                        decay_mask(params, cfg.optim))
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, w, atol=1e-7), updates, want)
    assert np.abs(updates["blocks"]["attn"]["wq"]["kernel"][...]).sum() > 0
    assert np.abs(updates["final_norm"]["scale"][...]).sum() == 0


# ------------------------------------------------------------------------- AdamW vs. numpy
def _numpy_adamw(params, grads_seq, cfg: Config):
    """Loshchilov & Hutter 2019 Alg. 2 in the optax/PyTorch convention (decay scaled by lr_t)."""
    o, t = cfg.optim, cfg.train
    mask = decay_mask(params, o)
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for step, grads in enumerate(grads_seq, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        norm = math.sqrt(sum(float((x ** 2).sum()) for x in g.values()))
        if o.grad_clip > 0 and norm > o.grad_clip:
            g = {k: x * o.grad_clip / norm for k, x in g.items()}
        lr = t.lr * min(step / t.warmup_steps, 1.0)  # constant schedule with warmup
        for k in p:
            m[k] = o.b1 * m[k] + (1 - o.b1) * g[k]
            v[k] = o.b2 * v[k] + (1 - o.b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - o.b1 ** step), v[k] / (1 - o.b2 ** step)
            p[k] = p[k] - lr * (m_hat / (np.sqrt(v_hat) + o.eps) + o.weight_decay * mask[k] * p[k])
    return p


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_adamw_matches_numpy_reference(grad_clip):
    cfg = Config(train=TrainConfig(steps=10, lr=1e-2, warmup_steps=3, schedule="constant"),
                 optim=OptimConfig(b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1,
                                   grad_clip=grad_clip))
    rng = np.random.default_rng(0)
    params = {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
              "scale": rng.normal(size=(4,)).astype(np.float32)}
    # gradient norms vary across steps, so clipping changes Adam's moment ratios.
    grads_seq = [{k: (s * rng.normal(size=x.shape)).astype(np.float32) for k, x in params.items()}
                 for s in (3.0, 0.05, 1.0)]
    tx = build_optimizer(cfg)
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    update = jax.jit(tx.update)
    for grads in grads_seq:
        updates, state = update(jax.tree.map(jnp.asarray, grads), state, p)
        p = optax.apply_updates(p, updates)
    want = _numpy_adamw(params, grads_seq, cfg)
    for k in params:
        np.testing.assert_allclose(np.asarray(p[k]), want[k], atol=1e-6, rtol=0)
    if grad_clip:  # the clipped run really differs from the unclipped reference
        unclipped = _numpy_adamw(params, grads_seq, Config(
            train=cfg.train, optim=dataclasses.replace(cfg.optim, grad_clip=0.0)))
        assert np.abs(unclipped["kernel"] - want["kernel"]).max() > 1e-4


def test_with_clipping_bounds_global_norm():
    grads = {"a": np.full((3,), 4.0, np.float32), "b": np.full((4,), 3.0, np.float32)}
    tx = with_clipping(OptimConfig(grad_clip=1.0), optax.identity())
    update = jax.jit(tx.update)
    out, _ = update(grads, tx.init(grads))
    norm = math.sqrt(sum(float((np.asarray(x) ** 2).sum()) for x in out.values()))
    assert norm == pytest.approx(1.0, rel=1e-6)  # |g| = sqrt(3*16 + 4*9) > 1: rescaled to 1
    np.testing.assert_allclose(out["a"][0] / out["b"][0], 4 / 3, rtol=1e-6)  # direction kept
    small = jax.tree.map(lambda g: g * 1e-3, grads)  # below the threshold: untouched
    out, _ = update(small, tx.init(small))
    jax.tree.map(np.testing.assert_array_equal, out, small)
    off = with_clipping(OptimConfig(grad_clip=0.0), optax.identity())
    out, _ = off.update(grads, off.init(grads))
    jax.tree.map(np.testing.assert_array_equal, out, grads)


def test_clip_equals_optax_and_keeps_its_state():
    """jaxlm's clip (one scalar factor, for XLA:CPU's fusion) is optax.clip_by_global_norm to
    float32 rounding, with the same (empty) state, so checkpoints of either restore into both."""
    from jaxlm.optim.build import clip_by_global_norm

    rng = np.random.default_rng(0)
    for scale in (1e-3, 1.0, 50.0):  # below, near and far above the threshold
        g = {"w": rng.normal(size=(5, 7)).astype(np.float32) * scale,
             "b": rng.normal(size=(7,)).astype(np.float32) * scale}
        ours, theirs = clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
        assert jax.tree.structure(ours.init(g)) == jax.tree.structure(theirs.init(g))
        a, _ = jax.jit(ours.update)(g, ours.init(g))
        b, _ = jax.jit(theirs.update)(g, theirs.init(g))
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=3e-7, atol=0), a, b)


# ----------------------------------------------------------------------------------- registry
def test_unknown_optimizer_is_config_error():
    cfg = Config(optim=OptimConfig(name="lion"))  # bypasses validation on purpose
    with pytest.raises(ConfigError, match="optim.name='lion'.*adamw"):
        build_optimizer(cfg)
    with pytest.raises(ConfigError, match="optim.name"):
        load_config(None, ["optim.name=lion"])


def test_register_optimizer_extends_choices(monkeypatch):
    monkeypatch.setitem(config_mod._CHOICES, "optim.name", config_mod._CHOICES["optim.name"])
    monkeypatch.setitem(OPTIMIZERS, "sgd_test", None)  # restored (removed) after the test
    register_optimizer("sgd_test", lambda cfg: optax.sgd(cfg.train.lr))
    cfg = load_config(None, ["optim.name=sgd_test", "train.lr=0.5"])
    tx = build_optimizer(cfg)
    updates, _ = tx.update({"w": jnp.ones(2)}, tx.init({"w": jnp.ones(2)}))
    np.testing.assert_allclose(updates["w"], [-0.5, -0.5])
