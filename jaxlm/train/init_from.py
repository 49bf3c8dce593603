"""``init_from``: start a run from another run's parameters, or from a Hugging Face model.

Continual pretraining (Ibrahim et al. 2024) starts from a trained model's *parameters only*:
the optimizer state, the data iterator, the step counter and the learning-rate schedule start
fresh in the new run's ``out_dir`` (re-warming + re-decaying is then what ``train.schedule=cosine``
or ``wsd`` do on that fresh schedule; an infinite schedule continues without re-warming with
``train.schedule_offset``, see jaxlm/optim/schedules.py). Replay of the old data is a
``data.sources`` mixture (jaxlm/data/mixture.py).

``init_from`` values (top-level config key, "" = off):

* ``ckpt:OUT_DIR``       the newest finished checkpoint of another jaxlm run;
* ``ckpt:OUT_DIR@STEP``  that step of it (one of its kept checkpoints);
* ``hf:HF_DIR``          a Hugging Face model directory, read by
  ``jaxlm.convert.hf.load_hf_params(hf_dir, cfg, spec)`` (the importer of issue #16, part 1).

The parameters are restored with orbax straight onto this run's shardings (only the ``params``
subtree of the checkpoint's ``state`` item is read; each device reads its own shards) and checked
against the checksums saved with them. The source's saved config must describe the same model
(shapes, vocabulary, tokenizer: :func:`jaxlm.train.compat.incompatible_changes`), else one
ConfigError line names every differing setting. An ``out_dir`` that already holds a checkpoint
resumes that run and ignores ``init_from`` (the loop logs it), so a restarted continual run
continues where it stopped instead of starting over from the source.

Example::

    jaxlm-train tiny out_dir=out/base data.path=A.txt
    jaxlm-train tiny out_dir=out/cont init_from=ckpt:out/base data.path=B.txt   # no replay
    jaxlm-train tiny out_dir=out/replay init_from=ckpt:out/base \\
        "data.sources=[{name: new, path: B.txt, weight: 0.95},
                       {name: replay, path: A.txt, weight: 0.05}]"
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jaxlm.config import CkptConfig, Config, ConfigError, parse_init_from
from jaxlm.train.checkpoint import Checkpointer, _checksums, reason
from jaxlm.train.compat import incompatible_changes
from jaxlm.train.state import StateSpec, split_buffers

log = logging.getLogger("jaxlm")


def init_state(cfg: Config, spec: StateSpec) -> dict:
    """A fresh train state (step 0, new optimizer state, RNG from ``cfg.seed``) whose params are
    those named by ``cfg.init_from``, on the run's shardings."""
    kind, path, step = parse_init_from(cfg.init_from)
    if kind == "ckpt":
        params, where = _ckpt_params(cfg, spec, path, step)
    else:
        params, where = _hf_params(cfg, spec, path)
    log.info("init_from: parameters from %s; fresh optimizer state, data order and schedule",
             where)
    return fresh_state(spec, params)


def fresh_state(spec: StateSpec, params) -> dict:
    """``spec.init()`` with ``params`` in place of the random ones (jitted onto the shardings)."""
    tx, seed = spec.tx, spec.cfg.seed

    def build(params):
        return {"step": jnp.zeros((), jnp.int32), "params": params,
                "opt_state": tx.init(split_buffers(params)[0]), "rng": jax.random.PRNGKey(seed)}

    with jax.set_mesh(spec.mesh):
        return jax.jit(build, in_shardings=(spec.shardings["params"],),
                       out_shardings=spec.shardings)(params)


def _open_source(value: str, path: str) -> Checkpointer:
    if not os.path.isdir(path):
        raise ConfigError(f"init_from={value}: no such directory {path}; give the out_dir of a "
                          "trained jaxlm run")
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ConfigError(f"init_from={value}: {path} holds no checkpoints/ directory; give the "
                          "out_dir of a trained jaxlm run (or hf:DIR for a Hugging Face model)")
    return Checkpointer(path, CkptConfig(), writable=False)


def _ckpt_params(cfg: Config, spec: StateSpec, path: str, step: int | None):
    value = cfg.init_from
    src = _open_source(value, path)
    try:
        steps = sorted(src.finalized_steps())
        if not steps:
            raise ConfigError(f"init_from={value}: {path} has no finished checkpoint; train it "
                              "first (or let its run finish a save)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ConfigError(f"init_from={value}: {path} has no checkpoint at step {step} "
                              f"(it keeps steps {', '.join(map(str, steps))})")
        try:
            saved = src.saved_config(step)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - unreadable config item: say so in one line
            raise ConfigError(f"init_from={value}: cannot read the config of step {step} in "
                              f"{path} ({reason(e)})") from None
        model, _ = incompatible_changes(saved, cfg)  # optimizer / data settings may differ
        if model:
            raise ConfigError(f"init_from={value}: step {step} of {path} is a different model ("
                              + "; ".join(model) + "); set these as in "
                              f"{os.path.join(path, 'config.yaml')}")
        params = _restore_params(src, step, spec, value)
    finally:
        src.close()
    return params, f"{path} step {step}"


def _restore_params(src: Checkpointer, step: int, spec: StateSpec, value: str):
    """Only ``state/params`` of ``step``, onto this run's param shardings, checksum-verified."""
    target = {"params": spec.abstract_with_shardings()["params"]}
    args = ocp.args.PyTreeRestore(item=target, partial_restore=True,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(target))
    try:
        restored = src.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
    except Exception as e:  # noqa: BLE001 - shapes or files that do not fit: one line
        raise ConfigError(f"init_from={value}: cannot restore the parameters of step {step} "
                          f"({reason(e)}); the model settings must match the source run's"
                          ) from None
    expected = (src.manager.metadata(step).custom_metadata or {}).get("checksums") or {}
    got = _checksums(restored)
    bad = sorted(k for k in got if expected.get(k) != got[k])
    if bad:
        raise ConfigError(f"init_from={value}: step {step} is damaged (checksum mismatch in "
                          f"{bad[0]}); use another step (@STEP) of that run")
    return restored["params"]


def _hf_params(cfg: Config, spec: StateSpec, path: str):
    if not os.path.isdir(path):
        raise ConfigError(f"init_from=hf:{path}: no such directory; give a Hugging Face model "
                          "directory (config.json + *.safetensors)")
    try:
        from jaxlm.convert.hf import load_hf_params
    except ImportError as e:
        raise ConfigError(f"init_from=hf:{path}: the Hugging Face importer (jaxlm.convert.hf) "
                          f"is not available ({reason(e)})") from None
    try:
        params = load_hf_params(path, cfg, spec)
    except ConfigError as e:  # e.g. a vocab or width mismatch: say which setting it came from
        why = str(e).removeprefix(f"{path}: ")
        raise ConfigError(f"init_from=hf:{path}: {why}") from None
    return jax.device_put(params, spec.shardings["params"]), f"Hugging Face model {path}"
