"""Sharding on 8 fake CPU devices: rules resolve, parameters are really sharded as the rules say,
and train steps on a (data=2, fsdp=2, tensor=2) mesh equal the single-device steps."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxlm.config import ConfigError, MeshConfig, load_config
from jaxlm.optim import build_optimizer
from jaxlm.sharding import host_to_global, logical_to_spec, make_mesh, mesh_shape
from jaxlm.train.state import StateSpec
from jaxlm.train.step import make_train_step

OVERRIDES = ["model.vocab_size=64", "model.n_layers=2", "model.d_model=32", "model.n_heads=4",
             "model.n_kv_heads=2", "model.d_ff=64", "data.seq_len=16", "train.batch_size=8",
             "train.steps=10", "train.warmup_steps=2"]


def batches(n, b=8, t=16, vocab=64):
    rng = np.random.default_rng(0)
    for _ in range(n):
        toks = rng.integers(0, vocab, (b, t + 1)).astype(np.int32)
        yield {"inputs": toks[:, :-1], "targets": toks[:, 1:],
               "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1)),
               "segment_ids": np.ones((b, t), np.int32), "loss_mask": np.ones((b, t), np.float32),
               "target_bytes": np.ones((b, t), np.int32)}


def train(mesh_overrides, devices, steps=3, extra=()):
    cfg = load_config(None, OVERRIDES + list(mesh_overrides) + list(extra))
    mesh = make_mesh(cfg.mesh, devices)
    spec = StateSpec.build(cfg, mesh, build_optimizer(cfg))
    state = spec.init()
    step = make_train_step(spec)
    losses = []
    for b in batches(steps):
        state, m = step(state, host_to_global(b, mesh))
        losses.append(float(m["loss"]))
    return losses, state, spec


@pytest.fixture(scope="module")
def single():
    return train(["mesh.fsdp=1"], jax.devices()[:1])


def test_mesh_shape_fill_and_errors():
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    with pytest.raises(ConfigError, match="cannot fill"):
        mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(ConfigError, match="devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_logical_rules():
    assert logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
    assert logical_to_spec(("batch", "seq", "act_embed")) == P(("data", "fsdp"), None, None)
    assert logical_to_spec(("layers", "heads", "head_dim", "embed")) == P(None, "tensor", None,
                                                                          "fsdp")


def test_dp_fsdp_tp_equals_single_device(single):
    l1, s1, _ = single
    l8, s8, spec = train(["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"], jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(jax.device_get(s8["params"])),
                    jax.tree.leaves(jax.device_get(s1["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
    # parameters are really split as the rules table says
    p = s8["params"]
    expect = {
        ("embed", "embedding"): P("tensor", "fsdp"),
        ("lm_head", "kernel"): P("fsdp", "tensor"),
        ("blocks", "attn", "wq", "kernel"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "wk", "kernel"): P(None, "fsdp", "tensor", None),
        ("blocks", "attn", "wo", "kernel"): P(None, "tensor", None, "fsdp"),
        ("blocks", "mlp", "w_gate", "kernel"): P(None, "fsdp", "tensor"),
        ("blocks", "mlp", "w_down", "kernel"): P(None, "tensor", "fsdp"),
        ("blocks", "attn_norm", "scale"): P(None, None),
    }
    for path, spec_ in expect.items():
        leaf = p
        for k in path:
            leaf = leaf[k]
        assert leaf.sharding.spec == spec_, path
        # each device holds 1/(fsdp*tensor) of a fully split weight
        n_split = np.prod([{"fsdp": 2, "tensor": 2}.get(a, 1) for a in spec_ if a])
        assert leaf.addressable_shards[0].data.size == leaf.size // n_split
    # Adam moments follow their parameter's sharding
    mu = s8["opt_state"].inner[1][0].mu["blocks"]["mlp"]["w_gate"]["kernel"]
    assert mu.sharding.spec == P(None, "fsdp", "tensor")


def test_grad_accumulation_equals_full_batch(single):
    l1, s1, _ = single
    la, sa, _ = train(["mesh.fsdp=1"], jax.devices()[:1], extra=["train.grad_accum=2"])
    np.testing.assert_allclose(la, l1, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(jax.device_get(sa["params"])),
                    jax.tree.leaves(jax.device_get(s1["params"]))):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
