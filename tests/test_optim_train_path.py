"""The GaLore / Fira golden fixtures (galore-torch 1.0 / fira 1.0.2, tests/fixtures/optim) through
the path training uses: ``build_optimizer(cfg)`` (clipping, partition into GaLore/AdamW, restarts
wrapper, update count) inside the jitted, sharded train step of jaxlm/train/step.py.

The model's loss is replaced by a linear one, ⟨W, G_k⟩ on layer 0 of one kernel, so the gradient
the optimizer receives at step k is exactly the fixture's G_k (zero for every other parameter);
layer 0 of that kernel starts at the fixture's W_0, and W_k - W_0 must match the torch optimizer
after every one of the 9 steps (3 projector refreshes). Torch stores W as [out, in], jaxlm
kernels as [in, out]. The fixtures with weight decay are left out: the train path decays the
pre-update weights (optax), galore-torch the post-update ones (see galore.decay_after_update).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxlm.train.step as step_mod
from jaxlm.config import load_config
from jaxlm.optim import build_optimizer
from jaxlm.sharding import make_mesh
from jaxlm.train.state import StateSpec
from jaxlm.utils.trees import path_names

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "optim")
CASES = {  # fixture: (kernel, d_model, d_ff); the kernel's [in, out] = the fixture's W.T
    "galore_tall": ("w_up", 32, 64),
    "galore_square": ("w_up", 48, 48),
    "galore_reverse_wide": ("w_down", 32, 64),
    "fira_tall": ("w_up", 32, 64),
}


def _is_target(path, kernel):
    return tuple(path_names(path))[-3:] == ("mlp", kernel, "kernel")


def _target(params, kernel):
    return [x for p, x in jax.tree_util.tree_leaves_with_path(params) if _is_target(p, kernel)][0]


@pytest.mark.parametrize("name", list(CASES))
def test_fixture_through_build_optimizer_and_train_step(name, monkeypatch):
    z = np.load(os.path.join(FIX, name + ".npz"))
    assert float(z["wd"]) == 0.0
    kernel, d_model, d_ff = CASES[name]
    cfg = load_config(None, [
        "model.vocab_size=257", f"model.d_model={d_model}", "model.n_layers=2",
        "model.n_heads=4", "model.n_kv_heads=4", f"model.d_ff={d_ff}", "data.seq_len=8",
        "train.batch_size=8", "train.schedule=constant", "train.warmup_steps=0",
        f"train.lr={float(z['lr'])}", f"optim.name={z['method']}", f"optim.rank={int(z['rank'])}",
        f"optim.proj_gap={int(z['gap'])}", f"optim.galore_scale={float(z['alpha'])}",
        f"optim.proj_side={z['proj_type']}", "optim.b1=0.9", "optim.b2=0.999",
        "optim.eps=1e-6", "optim.weight_decay=0", "optim.grad_clip=0"])

    def linear_loss(spec, params, batch, denom, z_loss=0.0, dropout_key=None):
        w = _target(params, kernel)[0]  # layer 0, [in, out]
        loss = (w * batch["g"][0]).sum()
        return loss, loss

    monkeypatch.setattr(step_mod, "loss_fn", linear_loss)
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state = spec.init()
    w0 = jnp.asarray(z["w0"].T)
    state["params"] = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[0].set(w0) if _is_target(p, kernel) else x, state["params"])
    state = jax.device_put(state, spec.shardings)
    step = step_mod.make_train_step(spec)
    ones = np.ones((8, 8), np.int32)
    for k, (g, ref) in enumerate(zip(z["grads"], z["deltas"])):
        batch = {"inputs": ones, "targets": ones, "positions": ones, "segment_ids": ones,
                 "target_bytes": ones, "loss_mask": ones,
                 "g": np.broadcast_to(g.T, (8,) + g.T.shape).copy()}
        state, metrics = step(state, batch)
        assert int(metrics["nonfinite"]) == 0
        delta = np.asarray(_target(state["params"], kernel)[0]) - np.asarray(w0)
        np.testing.assert_allclose(delta.T, ref, atol=5e-7 + 1e-4 * np.abs(ref).max(), rtol=0,
                                   err_msg=f"{name} step {k}")
    assert step._cache_size() == 1 if hasattr(step, "_cache_size") else True
