"""FLOPs / parameter counts against hand computations, the matmul probe, memory, MetricWriter."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxlm.config import ModelConfig
from jaxlm.utils.flops import (estimate_state_bytes, flops_per_token, format_bytes,
                               measure_peak_flops, mfu, param_count)
from jaxlm.utils.metrics import MetricWriter

# D=8, H=2 (hd=4), KV=1 (GQA), F=16, L=2, V=11
SMALL = ModelConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16)


# ---------------------------------------------------------------------------- params / flops
def test_param_count_by_hand():
    # per layer: wq 8*8=64, wk 8*4=32, wv 32, wo 64, SwiGLU 3*8*16=384, 2 norms 16 -> 592
    # total: embed 11*8=88 + 2*592 + final norm 8 + head 8*11=88
    assert param_count(SMALL, 11) == 88 + 2 * 592 + 8 + 88 == 1368
    tied = ModelConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16,
                       tie_embeddings=True)
    assert param_count(tied, 11) == 1368 - 88


def test_flops_per_token_by_hand():
    # N_matmul = 2 layers * (64+32+32+64+384) + head 88 = 1240 (no embedding gather, no norms)
    # attention = 12 * L * H * hd * T = 12 * 2 * 2 * 4 * 16 = 3072
    assert flops_per_token(SMALL, 11, seq_len=16) == 6 * 1240 + 3072 == 10512
    tied = ModelConfig(d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16,
                       tie_embeddings=True)
    assert flops_per_token(tied, 11, seq_len=16) == 10512  # the tied head still does a matmul


def test_flops_gpt2_small_scale():
    # GPT-2-small-like LLaMA (d=768, 12 layers, F=4*768 SwiGLU): 6N dominates, attention ~ 12LDT.
    m = ModelConfig(d_model=768, n_layers=12, n_heads=12, d_ff=3072)
    per_layer = 4 * 768 * 768 + 3 * 768 * 3072
    expected = 6 * (12 * per_layer + 768 * 50304) + 12 * 12 * 768 * 1024
    assert flops_per_token(m, 50304, 1024) == expected
    assert mfu(expected, tokens_per_second=1e5, peak_flops=1e15, n_devices=2) == pytest.approx(
        expected * 1e5 / 2e15)


def test_peak_flops_probe_is_positive_and_finite():
    flops = measure_peak_flops(n=256, repeats=2)
    assert math.isfinite(flops) and flops > 0


# ------------------------------------------------------------------------------------ memory
def test_state_bytes_on_sharded_arrays():
    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    sharded = jax.device_put(np.zeros((16, 4), np.float32), NamedSharding(mesh, P("x")))
    replicated = jax.device_put(np.zeros((4,), np.float32), NamedSharding(mesh, P()))
    params = {"w": sharded, "g": replicated}  # 256 B sharded 8 ways + 16 B on every device
    opt_state = (jax.ShapeDtypeStruct((16, 4), jnp.bfloat16, sharding=NamedSharding(mesh, P("x"))),
                 jax.ShapeDtypeStruct((), jnp.int32),  # no sharding: counted as replicated
                 None)
    est = estimate_state_bytes(params, opt_state)
    assert est.params == 256 + 16
    assert est.opt_state == 128 + 4
    assert est.total == 272 + 132
    assert est.per_device == (256 // 8 + 16) + (128 // 8 + 4)
    # an explicit shard-count function overrides the shardings
    est = estimate_state_bytes(params, opt_state, n_shards_fn=lambda leaf: 2)
    assert est.per_device == (128 + 8) + (64 + 2)
    assert format_bytes(1536) == "1.50 KiB" and format_bytes(10) == "10 B"


# ----------------------------------------------------------------------------------- metrics
def _rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_metric_writer_jsonl_appends_and_tensorboard(tmp_path):
    out = str(tmp_path / "run")
    with MetricWriter(out, total_steps=20) as w:
        w.write(1, {"loss": np.float32(3.5), "lr": 1e-3, "tokens": np.int64(64)})
        w.write(2, {"loss": np.array(3.25), "nan_loss": float("nan"), "note": "ok"})
        w.progress(2, {"loss": 3.25})
    with MetricWriter(out, total_steps=20, initial_step=2, tensorboard=False) as w:  # resume
        w.write(3, {"loss": 3.0})
    rows = _rows(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0] == {"step": 1, "loss": 3.5, "lr": 1e-3, "tokens": 64}
    assert type(rows[0]["tokens"]) is int and type(rows[0]["loss"]) is float
    assert rows[1] == {"step": 2, "loss": 3.25, "nan_loss": None, "note": "ok"}  # strict JSON
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(out, "tb")))


def test_disabled_metric_writer_is_a_noop(tmp_path):
    out = str(tmp_path / "rank1")
    w = MetricWriter(out, enabled=False, total_steps=5)
    w.write(1, {"loss": 1.0})
    w.progress(1, {"loss": 1.0})
    w.close()
    assert not os.path.exists(out)


def test_metric_writer_rejects_non_scalars(tmp_path):
    with MetricWriter(str(tmp_path), tensorboard=False) as w:
        with pytest.raises(TypeError, match="not a scalar"):
            w.write(1, {"hist": np.zeros(3)})
