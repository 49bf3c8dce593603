"""Checkpoints with orbax: train state + data-iterator state + resolved config, saved together.

Each checkpoint ``<out_dir>/checkpoints/<step>/`` holds three items:

* ``state``  — the whole train state pytree (params, optimizer state, step, RNG), sharded arrays
  written by every process (``StandardSave``);
* ``data``   — the grain iterator position of every process (grain's orbax handler), so a resumed
  run reads exactly the batches the uninterrupted run would have read;
* ``config`` — the resolved config as JSON (also written as ``<out_dir>/config.yaml``).

Saves are asynchronous (the device->host copy happens before ``save`` returns, the file writes
continue in the background while training goes on); orbax writes into a temporary directory and
renames it when complete, so a crash mid-save never leaves a half checkpoint that looks finished.
Restore takes abstract arrays that carry *target* shardings, so a checkpoint written on one mesh
restores onto another (each device reads only its shard).

Example::

    ckpt = Checkpointer("out/run", CkptConfig(every=100, keep=3))
    ckpt.save(100, state, data_iter, cfg)        # async
    step = ckpt.latest_step()
    state = ckpt.restore(step, spec.abstract_with_shardings(), data_iter)
    ckpt.close()                                 # waits for pending writes
"""

from __future__ import annotations

import dataclasses
import logging
import os

import grain
import jax
import orbax.checkpoint as ocp

from jaxlm.config import CkptConfig, Config, ConfigError, from_dict, to_dict

log = logging.getLogger("jaxlm")


class Checkpointer:
    def __init__(self, out_dir: str, cfg: CkptConfig):
        self.dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.keep, enable_async_checkpointing=cfg.async_save, create=True)
        try:
            self.manager = ocp.CheckpointManager(
                self.dir, options=options, item_names=("state", "data", "config"),
                item_handlers={"data": grain.checkpoint.CheckpointHandler()})
        except OSError as e:
            raise ConfigError(f"cannot create checkpoint directory {self.dir}: {e.strerror}; "
                              "choose a writable out_dir") from None

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def should_save(self, step: int) -> bool:
        return bool(self.cfg.every) and step % self.cfg.every == 0

    def save(self, step: int, state, data_iter, cfg: Config) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iter),
            config=ocp.args.JsonSave(to_dict(cfg))))

    def saved_config(self, step: int) -> Config:
        raw = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return from_dict(raw["config"])

    def restore(self, step: int, abstract_state, data_iter=None):
        """Restore the state onto ``abstract_state``'s shardings (and ``data_iter`` in place)."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def check_compatible(saved: Config, cfg: Config) -> None:
    """A checkpoint can resume only a run of the same model and tokenizer; say what differs."""
    diffs = [f"model.{k}: checkpoint {v!r} vs now {getattr(cfg.model, k)!r}"
             for k, v in to_dict(saved.model).items()
             if k not in ("remat", "scan_layers", "attn_impl", "dtype")
             and v != getattr(cfg.model, k)]
    if saved.data.tokenizer != cfg.data.tokenizer:
        diffs.append(f"data.tokenizer: checkpoint {saved.data.tokenizer!r} vs now "
                     f"{cfg.data.tokenizer!r}")
    if diffs:
        raise ConfigError("out_dir holds a checkpoint of a different model (" + "; ".join(diffs)
                          + "); use a new out_dir or the checkpoint's settings")


def is_primary() -> bool:
    return jax.process_index() == 0


def load_trained(out_dir: str):
    """(cfg, spec, params) of the latest checkpoint in ``out_dir``, on a mesh of all devices.

    Used by ``jaxlm-sample`` and ``jaxlm-eval``. The state is restored onto the current devices
    with fsdp filling the mesh, whatever mesh it was trained on.
    """
    from jaxlm.config import MeshConfig
    from jaxlm.optim import build_optimizer
    from jaxlm.sharding import make_mesh
    from jaxlm.train.state import StateSpec

    ckpt_dir = os.path.join(os.path.abspath(out_dir), "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise ConfigError(f"no checkpoints in {out_dir} (expected {ckpt_dir}); "
                          "train first with `jaxlm-train out_dir=...`")
    ckpt = Checkpointer(out_dir, CkptConfig())
    step = ckpt.latest_step()
    if step is None:
        raise ConfigError(f"no finished checkpoint in {ckpt_dir}; train first")
    cfg = dataclasses.replace(ckpt.saved_config(step), mesh=MeshConfig(data=1, fsdp=-1, tensor=1))
    spec = StateSpec.build(cfg, make_mesh(cfg.mesh), build_optimizer(cfg))
    state = ckpt.restore(step, spec.abstract_with_shardings())
    ckpt.close()
    return cfg, spec, state["params"]
