"""Hugging Face checkpoints in and out: ``hf_to_jaxlm``, ``jaxlm_to_hf``, ``load_hf_params``.

``hf_to_jaxlm(HF_DIR, OUT_DIR)`` turns a transformers causal-LM directory (config.json +
``model.safetensors`` or ``model-0000k-of-0000n.safetensors`` + index; LLaMA 2/3/3.1,
Mistral, Qwen2, Qwen3, SmolLM — see :mod:`jaxlm.convert.hf_config`) into a jaxlm run directory:
``OUT_DIR/config.yaml`` (the resolved config) and a checkpoint at step 0 that
``jaxlm-sample``, ``jaxlm-eval`` and ``init_from=ckpt:OUT_DIR`` load like a trained run. With a
``tokenizer.json`` in HF_DIR, it and its tokenizer_config.json / special_tokens_map.json /
config.json are copied to ``OUT_DIR/tokenizer/`` and the run uses ``data.tokenizer=hf`` with that
(absolute) path; without one the run keeps ``data.tokenizer=byte`` and a warning says so.

Checkpoint contents: :func:`jaxlm.train.checkpoint.load_trained` restores a whole train state,
so the step-0 checkpoint holds the imported params, a *fresh* optimizer state for the config's
optimizer (AdamW: zero moments, i.e. 2 more copies of the params on disk), step 0 and the rng.
Its data-iterator item is a placeholder: continue training with ``init_from`` (parameters only)
into a new out_dir, not with ``jaxlm-train`` in the converted directory.

``jaxlm_to_hf(OUT_DIR, HF_DIR)`` writes the newest checkpoint of a run as float32
``model-0000k-of-0000n.safetensors`` shards (at most ``max_shard_bytes`` each) +
``model.safetensors.index.json``, ``config.json`` (LlamaForCausalLM; Qwen2ForCausalLM with
``model.attn_bias``; Qwen3ForCausalLM with ``model.qk_norm``), ``generation_config.json`` and,
for a run with ``data.tokenizer=hf``, the tokenizer files, so
``transformers.AutoModelForCausalLM.from_pretrained(HF_DIR)`` loads it. A non-empty HF_DIR is
refused unless ``overwrite`` (then stale shards are removed first). Export runs in one process
(``jaxlm-convert`` restores the checkpoint on the host it runs on, onto that host's devices, and
gathers one tensor at a time from them); run it on one host after a pod run, not inside it.

RoPE layout: **no q/k permutation** either way. HF-format q/k projection weights assume
rotate-half RoPE (head dimension j pairs with j + K/2), which is what jaxlm.ops.rope applies;
only Meta's original (interleaved, (2j, 2j+1)) checkpoints would need a permutation, and HF's own
converter has already applied it to every HF-format checkpoint. The weight mapping (transposes
of torch's [out, in] and the [H*K] -> [H, K] head split) is in :mod:`jaxlm.convert.hf_weights`.

Example::

    from jaxlm.convert.hf import hf_to_jaxlm, jaxlm_to_hf
    cfg = hf_to_jaxlm("SmolLM-135M/", "out/smollm")     # then: jaxlm-sample --ckpt out/smollm
    jaxlm_to_hf("out/smollm", "export/smollm", overwrite=True)
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import grain
import jax
import jax.numpy as jnp

from jaxlm.config import CkptConfig, Config, ConfigError, from_dict, to_yaml
from jaxlm.convert.hf_config import export_architecture, hf_config, model_overrides
from jaxlm.convert.hf_weights import export_tensors, load_hf_params  # noqa: F401 (re-export)
from jaxlm.convert.safetensors_io import INDEX, _read_json, write_sharded

log = logging.getLogger("jaxlm")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "config.json", "generation_config.json")
MAX_SHARD_BYTES = 2 * 1024**3


def _refuse_nonempty(path: str, overwrite: bool, flag: str = "--overwrite") -> None:
    if os.path.isfile(path):
        raise ConfigError(f"{path} is a file; give a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ConfigError(f"{path} is not empty; choose an empty directory or pass {flag} "
                          "(overwrite=True) to replace what the converter writes there")


def _copy_tokenizer(hf_dir: str, out_dir: str) -> str:
    """Copy the tokenizer files to ``out_dir/tokenizer``; returns its absolute path."""
    dest = os.path.abspath(os.path.join(out_dir, "tokenizer"))
    os.makedirs(dest, exist_ok=True)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(hf_dir, name)):
            shutil.copyfile(os.path.join(hf_dir, name), os.path.join(dest, name))
    return dest


def _check_vocab(tok_vocab: int, model_vocab: int, where: str) -> None:
    if tok_vocab > model_vocab:
        raise ConfigError(f"vocab mismatch: the tokenizer in {where} has {tok_vocab} tokens but "
                          f"the checkpoint's embedding has {model_vocab} rows; use the tokenizer "
                          "that belongs to this checkpoint")


def _import_config(hf_dir: str, out_dir: str) -> Config:
    """The jaxlm Config of the HF model in ``hf_dir`` (copies its tokenizer into out_dir)."""
    where = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(where):
        raise ConfigError(f"no config.json in {hf_dir}; point at a Hugging Face model directory")
    model, seq_len, arch = model_overrides(_read_json(where), where)
    data = {"seq_len": seq_len}
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):
        from jaxlm.data.tokenizer import get_tokenizer

        _check_vocab(get_tokenizer("hf", hf_dir).vocab_size, model["vocab_size"], hf_dir)
        data.update(tokenizer="hf", tokenizer_path=_copy_tokenizer(hf_dir, out_dir))
    else:
        log.warning("%s has no tokenizer.json: the run keeps data.tokenizer=byte; set "
                    "data.tokenizer=hf data.tokenizer_path=<its tokenizer.json> to use the "
                    "model's own tokenizer", hf_dir)
    log.info("importing %s (%s) into %s", hf_dir, arch, out_dir)
    return from_dict({"out_dir": out_dir, "model": model, "data": data})


def _fresh_state(spec, params: dict) -> dict:
    """Train state around imported params: a fresh optimizer state, step 0 (all sharded)."""
    from jaxlm.train.state import split_buffers

    sh = spec.shardings
    opt_state = jax.jit(spec.tx.init, out_shardings=sh["opt_state"])(split_buffers(params)[0])
    step = jax.device_put(jnp.zeros((), jnp.int32), sh["step"])
    rng = jax.device_put(jax.random.PRNGKey(spec.cfg.seed), sh["rng"])
    return {"step": step, "params": params, "opt_state": opt_state, "rng": rng}


def hf_to_jaxlm(hf_dir: str, out_dir: str, *, overwrite: bool = False) -> Config:
    """Convert the HF model in ``hf_dir`` into a jaxlm run directory ``out_dir`` (module
    docstring); returns the run's Config. One-line ConfigError for bad input; a conversion that
    fails leaves no half-written run behind in an ``out_dir`` it found empty."""
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"{hf_dir} is not a directory; give a Hugging Face model directory")
    _refuse_nonempty(out_dir, overwrite)
    fresh = not os.path.isdir(out_dir) or not os.listdir(out_dir)
    for name in ("checkpoints", "tokenizer"):  # overwrite: replace what a conversion writes
        shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)
    try:
        return _convert_into(hf_dir, out_dir)
    except BaseException:
        if fresh:  # it was empty (or absent): remove what this attempt wrote
            shutil.rmtree(out_dir, ignore_errors=True)
        raise


def _convert_into(hf_dir: str, out_dir: str) -> Config:
    from jaxlm.distributed import is_primary
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.checkpoint import Checkpointer
    from jaxlm.train.state import StateSpec

    cfg = _import_config(hf_dir, out_dir)
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state = _fresh_state(spec, load_hf_params(hf_dir, cfg, spec))
    ckpt = Checkpointer(out_dir, CkptConfig(every=0, keep=1, async_save=False))
    try:
        placeholder = iter(grain.MapDataset.range(1).to_iter_dataset())  # no data position yet
        ckpt.save(0, state, placeholder, cfg)
    finally:
        ckpt.close()
    if is_primary():
        with open(os.path.join(out_dir, "config.yaml"), "w") as f:
            f.write(to_yaml(cfg))
    log.info("wrote %s: %d parameters at step 0", out_dir, spec.param_count())
    return cfg


def _tokenizer_ids(cfg: Config, out_dir: str) -> tuple[object, int | None, int | None]:
    """(tokenizer, bos id or None, eos id) of a trained run; vocab checked against the model."""
    from jaxlm.train.checkpoint import trained_tokenizer

    tok = trained_tokenizer(cfg, out_dir)
    if cfg.data.tokenizer != "hf":  # no tokenizer files are exported: only its eos id
        fits = tok.vocab_size <= cfg.model.vocab_size
        return tok, None, tok.eos_id if fits else None
    _check_vocab(tok.vocab_size, cfg.model.vocab_size, out_dir)
    path = cfg.data.tokenizer_path
    side = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "config.json")
    bos = _read_json(side).get("bos_token_id") if os.path.isfile(side) else None
    return tok, bos, tok.eos_id


def _write_tokenizer(cfg: Config, tok, hf_dir: str) -> None:
    if cfg.data.tokenizer != "hf":
        log.warning("the run's tokenizer is %s, which has no Hugging Face tokenizer files; "
                    "%s holds the model only", cfg.data.tokenizer, hf_dir)
        return
    path = cfg.data.tokenizer_path
    src = path if os.path.isdir(path) else os.path.dirname(path)
    shutil.copyfile(os.path.join(src, "tokenizer.json") if os.path.isdir(path) else path,
                    os.path.join(hf_dir, "tokenizer.json"))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copyfile(os.path.join(src, name), os.path.join(hf_dir, name))
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer_config.json")):
        eos = tok._tok.id_to_token(tok.eos_id)
        _write_json(os.path.join(hf_dir, "tokenizer_config.json"),
                    {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos})


def _write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")


def _clear_export(hf_dir: str) -> None:
    """Remove a previous export's shards and index (overwrite), so none is left stale."""
    if not os.path.isdir(hf_dir):
        return
    for name in os.listdir(hf_dir):
        if name.endswith(".safetensors") or name == INDEX:
            os.remove(os.path.join(hf_dir, name))


def jaxlm_to_hf(out_dir: str, hf_dir: str, *, overwrite: bool = False,
                max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Export the newest checkpoint of run ``out_dir`` to the HF directory ``hf_dir`` (module
    docstring); returns the shard file names. One-line ConfigError for bad input."""
    from jaxlm.train.checkpoint import load_trained

    _refuse_nonempty(hf_dir, overwrite)
    cfg, _spec, params = load_trained(out_dir)
    arch = export_architecture(cfg)
    tok, bos, eos = _tokenizer_ids(cfg, out_dir)
    fresh = not os.path.isdir(hf_dir) or not os.listdir(hf_dir)
    _clear_export(hf_dir)
    os.makedirs(hf_dir, exist_ok=True)
    m = cfg.model
    zeros = ({f"model.layers.{i}.self_attn.o_proj.bias": (m.d_model,) for i in range(m.n_layers)}
             if arch == "Qwen3ForCausalLM" and m.attn_bias else None)
    shapes, fetch = export_tensors(cfg, params, zeros)
    try:
        files = write_sharded(hf_dir, shapes, fetch, max_shard_bytes)
        _write_json(os.path.join(hf_dir, "config.json"), hf_config(cfg, arch, bos, eos))
        gen = {"_from_model_config": True, "bos_token_id": bos, "eos_token_id": eos}
        _write_json(os.path.join(hf_dir, "generation_config.json"), gen)
        _write_tokenizer(cfg, tok, hf_dir)
    except OSError as e:
        if fresh:  # it was empty (or absent): remove the partial export
            shutil.rmtree(hf_dir, ignore_errors=True)
        raise ConfigError(f"cannot write {hf_dir}: {e.strerror or e}; free disk space or "
                          "choose a writable directory") from None
    log.info("wrote %s (%s, %d shard(s))", hf_dir, arch, len(files))
    return files
