"""jaxlm.utils.inspect: metrics reader, sharding/memory views, collective counts, decay matrix."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.utils.inspect import (bytes_per_device, compile_step, compiled_text, count_collectives,
                                 linear_attention_matrix, read_metrics, sharding_table,
                                 time_call, tree_bytes)


def test_read_metrics_splits_train_eval_and_last_line_wins(tmp_path):
    lines = [{"step": 10, "loss": 3.0, "lr": 1e-3}, {"step": 20, "loss": 2.5, "lr": 2e-3},
             {"step": 20, "eval_loss": 2.6, "eval_bpb": 3.7},
             {"step": 20, "loss": 2.4, "lr": 2e-3, "grad_norm": None},  # resumed: wins
             {"step": 30, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    m = read_metrics(str(tmp_path))
    np.testing.assert_array_equal(m["train"]["step"], [10, 20, 30])
    np.testing.assert_allclose(m["train"]["loss"], [3.0, 2.4, 2.0])
    assert np.isnan(m["train"]["grad_norm"][:2]).all() and m["train"]["grad_norm"][2] == 0.5
    np.testing.assert_array_equal(m["eval"]["step"], [20])
    np.testing.assert_allclose(m["eval"]["eval_bpb"], [3.7])
    assert read_metrics(str(tmp_path / "metrics.jsonl"))["train"]["lr"][1] == 2e-3


def test_count_collectives_on_hlo_text():
    text = """
  %all-gather.1 = f32[8,4]{1,0} all-gather(f32[1,4]{1,0} %p), channel_id=1, dimensions={0}
  %ag-start = (f32[1,4], f32[8,4]) all-gather-start(f32[1,4]{1,0} %p), dimensions={0}
  %ag-done = f32[8,4]{1,0} all-gather-done((f32[1,4], f32[8,4]) %ag-start)
  %rs = f32[1,4]{1,0} reduce-scatter(f32[8,4]{1,0} %x), to_apply=%add
  all-reduce.7 = (f32[], f32[4]) all-reduce(f32[] %a, f32[4] %b), to_apply=%add.clone
  %fusion = f32[4] fusion(f32[4] %all-reduce.7), calls=%fused_computation
"""
    c = count_collectives(text)
    assert c == {"all-gather": 2, "reduce-scatter": 1, "all-reduce": 1, "all-to-all": 0,
                 "collective-permute": 0}


def test_sharded_step_collectives_and_bytes_per_device():
    mesh = jax.make_mesh((8,), ("x",))
    sh = NamedSharding(mesh, P("x", None))
    w = jax.device_put(jnp.ones((16, 4), jnp.float32), sh)
    b = jax.device_put(jnp.ones((4,), jnp.float32), NamedSharding(mesh, P()))
    per_dev = bytes_per_device({"w": w, "b": b})
    assert len(per_dev) == 8 and set(per_dev.values()) == {2 * 4 * 4 + 4 * 4}
    assert tree_bytes({"w": w, "b": b}) == 16 * 4 * 4 + 4 * 4
    assert tree_bytes(jax.ShapeDtypeStruct((3, 5), jnp.bfloat16)) == 30

    f = jax.jit(lambda w: w.sum(0), in_shardings=sh, out_shardings=NamedSharding(mesh, P()))
    c = count_collectives(compiled_text(f, w))
    assert sum(c.values()) >= 1 and c["all-reduce"] + c["reduce-scatter"] >= 1
    g = jax.jit(lambda w: w * 2, in_shardings=sh, out_shardings=NamedSharding(mesh, P()))
    assert count_collectives(compiled_text(g, w, mesh=mesh))["all-gather"] >= 1
    exe = compile_step(g, w)  # a callable Compiled
    np.testing.assert_array_equal(np.asarray(exe(w)), 2 * np.ones((16, 4)))

    table = sharding_table({"w": w, "b": b})
    assert "('x', None)" in table and "(2, 4)" in table and "\nb  " in table
    assert "more" in sharding_table({"w": w, "b": b, "c": b}, max_rows=1)


@pytest.mark.parametrize("form", ["chunked", "recurrent", "naive"])
def test_linear_attention_matrix_is_the_decay_matrix(form):
    g = np.log(np.array([0.5, 0.9, 1.0], np.float32))  # [H]
    t = 11
    m = linear_attention_matrix(g, t, form=form, chunk_size=4)  # T not a multiple of C
    idx = np.arange(t)
    expect = np.where(idx[:, None] >= idx[None, :],
                      np.exp((idx[:, None] - idx[None, :])[None] * g[:, None, None]), 0.0)
    assert m.shape == (3, t, t)
    np.testing.assert_allclose(m, expect, rtol=1e-5, atol=1e-6)


def test_time_call_positive():
    f = jax.jit(lambda x: x @ x)
    assert time_call(f, jnp.ones((8, 8)), reps=2) > 0
