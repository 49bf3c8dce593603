"""Hugging Face checkpoints in and out (``jaxlm-convert``, jaxlm/convert/) and the model options
HF architectures need (``model.attn_bias``, ``model.qk_norm``, ``model.rope_scaling=llama3``).

Independent references: the golden fixtures in tests/fixtures/hf/<arch>/ — tiny random-init
models built and run by transformers itself (tests/fixtures/hf/make_fixtures.py, torch in the
separate .venv-torch), with the logits transformers computed; the Llama-3.1 frequency remapping
re-derived piecewise in numpy from its published equation; and, when .venv-torch exists, the
slow test loads jaxlm's exports back into transformers in a subprocess.
"""

import json
import math
import os
import shutil
import struct
import subprocess

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from jaxlm.config import ConfigError, ModelConfig, from_dict
from jaxlm.convert import hf
from jaxlm.convert.cli import main as convert_main
from jaxlm.convert.hf_config import hf_config, model_overrides
from jaxlm.convert.hf_weights import export_tensors, load_hf_params
from jaxlm.convert.safetensors_io import Reader, write_sharded
from jaxlm.model import Transformer
from jaxlm.ops.rope import apply_rope, rope_inv_freq
from jaxlm.optim import build_optimizer
from jaxlm.sharding import make_mesh
from jaxlm.train.checkpoint import load_trained
from jaxlm.train.state import StateSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
ARCHS = ("llama", "llama3", "mistral", "qwen2", "qwen3", "smollm")
TORCH_PY = os.path.join(ROOT, ".venv-torch", "bin", "python")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """arch -> (run dir, cfg, spec, params): each fixture converted once (hf_to_jaxlm) and loaded
    back the way jaxlm-sample does (load_trained)."""
    cache = {}

    def get(arch):
        if arch not in cache:
            out = str(tmp_path_factory.mktemp(arch) / "run")
            hf.hf_to_jaxlm(os.path.join(FIXTURES, arch), out)
            cache[arch] = (out, *load_trained(out))
        return cache[arch]

    return get


def _expected(arch):
    return np.load(os.path.join(FIXTURES, arch, "expected.npz"))


def _logits(spec, params, ids):
    return np.asarray(jax.jit(lambda p, x: spec.model(p)(x)[0])(params, jnp.asarray(ids)))


@pytest.mark.parametrize("arch", ARCHS)
def test_imported_model_gives_transformers_logits(imported, arch):
    """The acceptance check: max |jaxlm - transformers| <= 1e-4 in float32, every architecture."""
    _, cfg, spec, params = imported(arch)
    exp = _expected(arch)
    diff = np.abs(_logits(spec, params, exp["input_ids"]) - exp["logits"]).max()
    assert diff <= 1e-4, f"{arch}: max abs logit difference {diff}"
    assert np.abs(exp["logits"]).max() > 1.0  # O(1) logits: a wrong mapping cannot hide in 1e-4


def test_each_option_matters(imported):
    """The parity above can fail: drop the q/k/v biases, the q/k norm gains or the llama3
    remapping and the logits leave the tolerance by orders of magnitude."""
    for arch, edit in (("qwen2", lambda p: _set_all(p, "bias", 0.0)),
                       ("qwen3", lambda p: _set_all(p, "scale", 1.0, under="attn"))):
        _, cfg, spec, params = imported(arch)
        diff = np.abs(_logits(spec, edit(params), _expected(arch)["input_ids"])
                      - _expected(arch)["logits"]).max()
        assert diff > 1e-2, arch
    _, cfg, spec, params = imported("llama3")
    plain = from_dict({**_cfg_dict(cfg), "model": {**_cfg_dict(cfg)["model"], "rope_scaling": ""}})
    spec2 = StateSpec.build(plain, spec.mesh, build_optimizer(plain))
    diff = np.abs(_logits(spec2, params, _expected("llama3")["input_ids"])
                  - _expected("llama3")["logits"]).max()
    assert diff > 1e-3


def _cfg_dict(cfg):
    from jaxlm.config import to_dict
    return to_dict(cfg)


def _set_all(tree, key, value, under=None, inside=False):
    if not isinstance(tree, dict):
        return tree
    out = {}
    for k, v in tree.items():
        here = inside or under is None or k == under
        out[k] = (jnp.full_like(v, value) if k == key and here and not isinstance(v, dict)
                  else _set_all(v, key, value, under, here))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_export_of_an_import_reproduces_the_original_tensors(imported, arch, tmp_path):
    out, cfg, _, _ = imported(arch)
    dest = str(tmp_path / "hf")
    files = hf.jaxlm_to_hf(out, dest)
    assert files == ["model-00001-of-00001.safetensors"]
    with Reader(os.path.join(FIXTURES, arch)) as a, Reader(dest) as b:
        assert sorted(a.names()) == sorted(b.names())
        for name in a.names():
            np.testing.assert_array_equal(a.get(name), b.get(name), err_msg=name)
    index = json.load(open(os.path.join(dest, "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(files)
    written = json.load(open(os.path.join(dest, "config.json")))
    model, _, _ = model_overrides(written)  # the exported config describes the same model
    assert {k: getattr(cfg.model, k) for k in model} == model
    assert os.path.isfile(os.path.join(dest, "generation_config.json"))
    has_tok = arch in ("llama", "smollm")
    assert os.path.isfile(os.path.join(dest, "tokenizer.json")) == has_tok
    if has_tok:
        assert cfg.data.tokenizer == "hf" and written["eos_token_id"] == 2


def _random_spec(model_kw):
    cfg = from_dict({"model": {"vocab_size": 96, "d_model": 32, "n_layers": 2, "n_heads": 4,
                               "n_kv_heads": 2, "d_ff": 48, **model_kw}})
    return cfg, StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))


@pytest.mark.parametrize("model_kw", [
    {}, {"tie_embeddings": True}, {"attn_bias": True}, {"qk_norm": True, "head_dim": 12},
    {"qk_norm": True, "attn_bias": True},
    {"rope_scaling": "llama3", "rope_original_max_pos": 64, "rope_scaling_factor": 2.0}],
    ids=["llama", "tied", "qwen2", "qwen3", "qwen3_bias", "llama3"])
def test_round_trip_of_a_jaxlm_model(model_kw, tmp_path):
    """import(export(x)) == x for random jaxlm params of every exportable option set, through
    sharded files (a tiny shard limit forces several) and the exported config.json."""
    cfg, spec = _random_spec(model_kw)
    params = spec.init()["params"]
    params = _set_all(params, "bias", 0.5)  # biases start at zero: make them non-trivial
    arch = hf.export_architecture(cfg)
    zeros = ({f"model.layers.{i}.self_attn.o_proj.bias": (32,) for i in range(2)}
             if model_kw.get("qk_norm") and model_kw.get("attn_bias") else None)
    shapes, fetch = export_tensors(cfg, params, zeros)
    files = write_sharded(str(tmp_path), shapes, fetch, max_shard_bytes=16 * 1024)
    assert len(files) > 1 and files[-1].endswith(f"-of-{len(files):05d}.safetensors")
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_config(cfg, arch, None, None), f)
    model, _, got_arch = model_overrides(json.load(open(tmp_path / "config.json")))
    assert got_arch == arch and {k: getattr(cfg.model, k) for k in model} == model
    back = load_hf_params(str(tmp_path), cfg, spec)
    want_sh = jax.tree.leaves(spec.shardings["params"])
    for (path, a), b, sh in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(back), want_sh):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
        assert b.sharding == sh, path  # placed straight onto the run's shardings


def test_cli_round_trip_and_refusals(tmp_path, capsys):
    run, out = str(tmp_path / "run"), str(tmp_path / "hf")
    assert convert_main(["hf-to-jaxlm", os.path.join(FIXTURES, "smollm"), run]) == 0
    assert "converted" in capsys.readouterr().out
    assert convert_main(["jaxlm-to-hf", run, out]) == 0
    capsys.readouterr()
    for argv in (["jaxlm-to-hf", run, out], ["hf-to-jaxlm", os.path.join(FIXTURES, "smollm"), run]):
        assert convert_main(argv) == 2  # non-empty destination
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "not empty" in err and "--overwrite" in err
    assert convert_main(["jaxlm-to-hf", run, out, "--overwrite"]) == 0
    assert convert_main(["hf-to-jaxlm", os.path.join(FIXTURES, "smollm"), run, "--overwrite"]) == 0
    assert convert_main(["frobnicate"]) == 2


def _copy_fixture(arch, tmp_path):
    dest = tmp_path / arch
    shutil.copytree(os.path.join(FIXTURES, arch), dest)
    return dest


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_unsupported_architecture_is_named(tmp_path):
    src = _copy_fixture("llama", tmp_path)
    cfg = json.load(open(src / "config.json"))
    json.dump({**cfg, "architectures": ["GPT2LMHeadModel"]}, open(src / "config.json", "w"))
    msg = _one_line_error(hf.hf_to_jaxlm, str(src), str(tmp_path / "out"))
    assert "GPT2LMHeadModel" in msg and "Qwen3ForCausalLM" in msg and "LlamaForCausalLM" in msg


def test_missing_shard_is_named(tmp_path):
    src = _copy_fixture("llama", tmp_path)
    names = Reader(str(src)).names()
    os.rename(src / "model.safetensors", src / "model-00001-of-00002.safetensors")
    wmap = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
    json.dump({"weight_map": wmap}, open(src / "model.safetensors.index.json", "w"))
    msg = _one_line_error(hf.hf_to_jaxlm, str(src), str(tmp_path / "out"))
    assert "missing shard model-00002-of-00002.safetensors" in msg


def test_vocab_mismatch_between_tokenizer_and_checkpoint(tmp_path):
    from tokenizers import Tokenizer, models

    src = _copy_fixture("llama", tmp_path)
    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 200)}}  # 200 > 128 rows
    Tokenizer(models.WordLevel(vocab, unk_token="<unk>")).save(str(src / "tokenizer.json"))
    msg = _one_line_error(hf.hf_to_jaxlm, str(src), str(tmp_path / "out"))
    assert "vocab mismatch" in msg and "200" in msg and "128" in msg


def test_shape_mismatch_and_unknown_tensor_are_refused(tmp_path):
    src = _copy_fixture("llama", tmp_path)
    cfg = json.load(open(src / "config.json"))
    json.dump({**cfg, "intermediate_size": 96}, open(src / "config.json", "w"))
    msg = _one_line_error(hf.hf_to_jaxlm, str(src), str(tmp_path / "a"))
    assert "mlp.gate_proj.weight" in msg and "[96, 32]" in msg
    assert not os.path.exists(tmp_path / "a")  # nothing half-written left behind
    json.dump({**cfg, "tie_word_embeddings": True}, open(src / "config.json", "w"))
    hf.hf_to_jaxlm(str(src), str(tmp_path / "b"))  # a tied model may still carry lm_head.weight
    json.dump({**cfg, "architectures": ["Qwen3ForCausalLM"]}, open(src / "config.json", "w"))
    msg = _one_line_error(hf.hf_to_jaxlm, str(src), str(tmp_path / "c"))
    assert "q_norm" in msg  # Qwen3 needs q/k norms this checkpoint lacks


def _write_raw(path, tensors):
    """A safetensors file from (name, dtype tag, numpy array) — independent of jaxlm's writer."""
    header, blobs, offset = {}, [], 0
    for name, tag, arr in tensors:
        raw = arr.tobytes()
        header[name] = {"dtype": tag, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def test_bf16_tensors_are_read_as_float32_and_integers_are_refused(tmp_path):
    x = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    bf = x.astype(ml_dtypes.bfloat16)
    _write_raw(tmp_path / "model.safetensors",
               [("a", "BF16", bf), ("h", "F16", x.astype(np.float16)), ("i", "I64", np.arange(4))])
    with Reader(str(tmp_path)) as r:
        got = r.get("a")
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, bf.astype(np.float32))
        np.testing.assert_array_equal(r.get("h"), x.astype(np.float16).astype(np.float32))
        msg = _one_line_error(r.get, "i")
        assert "I64" in msg and "BF16" in msg


def test_export_refuses_models_without_hf_equivalent(tmp_path):
    cfg = from_dict({"model": {"attention": "tnl", "vocab_size": 64}})
    msg = _one_line_error(hf.export_architecture, cfg)
    assert "LLaMA-style" in msg


# -- model options ---------------------------------------------------------------------------

def _llama3_reference(head_dim, theta, factor, low, high, l0):
    """Llama-3.1's remapping, piecewise per frequency, in float64 numpy."""
    out = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        lam = 2 * math.pi / f
        if lam < l0 / high:
            out.append(f)
        elif lam > l0 / low:
            out.append(f / factor)
        else:
            g = (l0 / lam - low) / (high - low)
            out.append((1 - g) * f / factor + g * f)
    return np.array(out)


def test_llama3_inv_freq_matches_the_equation():
    args = (64, 500000.0, 8.0, 1.0, 4.0, 8192)  # Llama 3.1 8B's values
    got = np.asarray(rope_inv_freq(args[0], args[1], ("llama3",) + args[2:]))
    ref = _llama3_reference(*args)
    np.testing.assert_allclose(got, ref, rtol=2e-6)
    plain = _llama3_reference(64, 500000.0, 1.0, 1.0, 4.0, 8192)  # factor 1: unchanged
    regions = (ref == plain).sum(), (np.isclose(ref, plain / 8.0)).sum()
    assert regions[0] > 0 and regions[1] > 0 and sum(regions) < 32  # all three regions hit


def test_options_off_are_bit_identical_and_zero_bias_changes_nothing():
    x = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    pos = jnp.arange(5)[None]
    np.testing.assert_array_equal(np.asarray(apply_rope(x, pos, 1e4)),
                                  np.asarray(apply_rope(x, pos, 1e4, None)))
    kw = dict(vocab_size=50, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    tokens = jax.random.randint(jax.random.key(1), (2, 7), 0, 50)
    run = nnx.jit(lambda model, t: model(t)[0])
    base = run(Transformer(ModelConfig(**kw), rngs=nnx.Rngs(0)), tokens)
    biased = Transformer(ModelConfig(**kw, attn_bias=True), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(base), np.asarray(run(biased, tokens)))
    normed = Transformer(ModelConfig(**kw, qk_norm=True), rngs=nnx.Rngs(0))
    state = nnx.to_pure_dict(nnx.state(normed))
    assert state["blocks"]["attn"]["q_norm"]["scale"].shape == (2, 8)  # [L, K]
    assert not np.allclose(np.asarray(base), np.asarray(run(normed, tokens)))


def test_bad_rope_scaling_settings_are_one_line():
    for bad in ({"rope_scaling": "yarn"},
                {"rope_scaling": "llama3", "rope_low_freq_factor": 4.0,
                 "rope_high_freq_factor": 1.0}):
        msg = _one_line_error(from_dict, {"model": bad})
        assert "model.rope_scaling" in msg


# -- transformers itself (slow; needs the git-ignored .venv-torch) ---------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(TORCH_PY), reason="no .venv-torch (see make_fixtures.py)")
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_the_export_with_equal_logits(imported, arch, tmp_path):
    out, cfg, spec, params = imported(arch)
    dest = str(tmp_path / "hf")
    hf.jaxlm_to_hf(out, dest)
    ids = _expected(arch)["input_ids"]
    np.save(tmp_path / "ids.npy", ids)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([TORCH_PY, os.path.join(FIXTURES, "check_export.py"), dest,
                           str(tmp_path / "ids.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.split("loading_info=")[1].splitlines()[0])
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    assert "missing" not in proc.stderr.lower() and "unexpected" not in proc.stderr.lower()
    theirs = np.load(tmp_path / "out.npz")["logits"]
    assert np.abs(theirs - _logits(spec, params, ids)).max() <= 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isfile(TORCH_PY), reason="no .venv-torch (see make_fixtures.py)")
@pytest.mark.parametrize("model_kw", [
    {"qk_norm": True, "attn_bias": True, "head_dim": 12},  # Qwen3 attention_bias (zero o bias)
    {"head_dim": 12, "tie_embeddings": True},  # LLaMA with H*K != D
    {"attn_bias": True, "rope_scaling": "llama3", "rope_original_max_pos": 64}],  # Qwen2 + llama3
    ids=["qwen3_bias", "llama_head_dim", "qwen2_llama3"])
def test_transformers_runs_random_jaxlm_exports(model_kw, tmp_path):
    """Option sets no fixture covers: a random jaxlm model, exported, gives jaxlm's logits in
    transformers."""
    cfg, spec = _random_spec({**model_kw, "init_std": 0.4})  # O(1) logits: every weight shows
    params = _set_all(spec.init()["params"], "bias", 0.3)
    arch = hf.export_architecture(cfg)
    zeros = ({f"model.layers.{i}.self_attn.o_proj.bias": (32,) for i in range(2)}
             if model_kw.get("qk_norm") and model_kw.get("attn_bias") else None)
    shapes, fetch = export_tensors(cfg, params, zeros)
    write_sharded(str(tmp_path), shapes, fetch, max_shard_bytes=2**30)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(hf_config(cfg, arch, None, None), f)
    ids = np.random.default_rng(0).integers(0, 96, (2, 12)).astype(np.int32)
    np.save(tmp_path / "ids.npy", ids)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    proc = subprocess.run([TORCH_PY, os.path.join(FIXTURES, "check_export.py"), str(tmp_path),
                           str(tmp_path / "ids.npy"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"class={arch}" in proc.stdout
    info = json.loads(proc.stdout.split("loading_info=")[1].splitlines()[0])
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
    mine = _logits(spec, params, ids)
    assert np.abs(mine).max() > 1.0
    assert np.abs(np.load(tmp_path / "out.npz")["logits"] - mine).max() <= 1e-4
