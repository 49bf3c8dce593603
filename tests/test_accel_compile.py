"""The train step compiles for accelerators that this CPU machine does not have.

* TPU (needs ``libtpu``, the ``plan`` extra; skipped with that reason otherwise): the full train
  step of the tiny softmax model and of a TNL/softmax hybrid (``LLLS``) is compiled ahead of time
  for a v5e 2x2 topology (:func:`jaxlm.plan.compile.tpu_devices`) with ``attn_impl=auto``, which
  must resolve to splash attention from the mesh's TPU devices; the compiled HLO must hold the
  splash kernels as Mosaic ``tpu_custom_call``s (forward, dq, dkv).
* CUDA: the train step is exported for ``platforms=["cuda"]`` with ``jax.export`` (StableHLO for
  a GPU, no GPU needed) with ``attn_impl=xla``. ``attn_impl=cudnn`` cannot be lowered without
  one: jax's cuDNN lowering asks the installed cuDNN for its version first
  (``check_cudnn_version``: "cuDNN is not detected" without the CUDA plugin), so that test
  skips with the reason here and runs where jax[cuda12] is installed.

Run: ``PYTHONPATH=. .venv-plan/bin/python -m pytest -q -rs tests/test_accel_compile.py``
(CI: the libtpu step).
"""

import importlib.util
import logging
import re

import jax
import pytest

from jaxlm.config import load_config

HAVE_LIBTPU = importlib.util.find_spec("libtpu") is not None
TINY = ["model.vocab_size=256", "data.seq_len=128", "train.batch_size=8", "mesh.fsdp=2",
        "mesh.tensor=2", "model.attn_impl=auto"]
HYBRID = ["model.attention=tnl", "model.layer_pattern=LLLS", "model.n_layers=4",
          "model.n_kv_heads=4"]


@pytest.mark.skipif(not HAVE_LIBTPU, reason="libtpu not installed (pip install -e '.[plan]')")
@pytest.mark.parametrize("extra", [[], HYBRID], ids=["softmax", "tnl_hybrid"])
def test_tpu_train_step_compiles_with_splash_attention(extra, caplog):
    from jaxlm.ops import attention_kernels
    from jaxlm.plan.compile import compile_train_step, tpu_devices

    devices = tpu_devices("v5e:2x2", 1, 4)
    assert len(devices) == 4 and devices[0].platform == "tpu"
    cfg = load_config("tiny", TINY + extra)
    attention_kernels._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="jaxlm"):
        out = compile_train_step(cfg, devices)
    assert out.platform == "tpu"
    assert "model.attn_impl=auto -> splash (TPU" in caplog.text
    hlo = out.compiled.as_text()
    kernels = set(re.findall(r"splash_mqa_(fwd|dq|dkv)_segmented", hlo))
    assert kernels == {"fwd", "dq", "dkv"}, kernels  # forward + both backward kernels, with ids
    assert "tpu_custom_call" in hlo


def _export_train_step_for_cuda(overrides):
    from jax import export

    from jaxlm.plan.compile import abstract_batch, build_spec, resolve_vocab_size
    from jaxlm.train.step import make_train_step

    cfg = resolve_vocab_size(load_config("tiny", ["model.vocab_size=256", "mesh.fsdp=4",
                                                  "mesh.tensor=2", "model.dtype=bfloat16"]
                                         + overrides))
    spec = build_spec(cfg, jax.devices()[:8])
    state, batch = spec.abstract_with_shardings(), abstract_batch(cfg, spec.mesh)
    with jax.set_mesh(spec.mesh):
        return export.export(make_train_step(spec).jitted, platforms=["cuda"])(state, batch)


def test_train_step_lowers_for_cuda_with_xla_attention():
    exp = _export_train_step_for_cuda(["model.attn_impl=xla"])
    assert exp.platforms == ("cuda",) and exp.nr_devices == 8
    text = exp.mlir_module()
    assert "stablehlo.dot_general" in text and "bf16" in text


def test_train_step_lowers_for_cuda_with_cudnn_attention(monkeypatch):
    """Needs cuDNN installed (jax[cuda12]); the lowering itself needs no GPU."""
    from jaxlm.ops import attention_kernels

    # explicit cudnn on this machine's CPU mesh is refused by the resolver: present the mesh as
    # an NVIDIA GPU's so that the lowering is what gets exercised
    monkeypatch.setattr(attention_kernels, "compile_platform", lambda: ("gpu", "NVIDIA H100"))
    try:
        exp = _export_train_step_for_cuda(["model.attn_impl=cudnn"])
    except RuntimeError as e:
        if "cuDNN is not detected" not in str(e):
            raise
        pytest.skip("jax's cuDNN attention lowering needs the installed cuDNN's version "
                    "(jax[cuda12]); this machine has none")
    assert "__cudnn$fmha" in exp.mlir_module()
