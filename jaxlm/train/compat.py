"""Can a checkpoint continue under a changed config? What differs, and what to tell the user.

A run resumes from ``<out_dir>/checkpoints`` whatever changed, as long as the saved arrays and
iterator state still fit: a different batch size, sequence length, learning rate, schedule or
step count resumes (and :func:`describe_changes` lists those changes for the log). What cannot
continue is refused by :func:`check_compatible` with the exact settings that differ — a different
model or tokenizer (other arrays), another optimizer or optimizer-state layout, another data mode
or a switch between one ``data.path`` and a ``data.sources`` mixture (another iterator state) — and says plainly that the checkpoint is intact: the fix is the saved
settings (``<out_dir>/config.yaml``) or a new out_dir, never moving good checkpoints away.

Example::

    check_compatible(saved_cfg, cfg)        # ConfigError: ... (optim.name: checkpoint 'adamw' vs
                                            #   now 'galore') ...
    for line in describe_changes(saved_cfg, cfg):
        log.info("resuming with a changed setting: %s", line)
"""

from __future__ import annotations

import os

from jaxlm.config import Config, ConfigError, to_dict

_RUNTIME_MODEL = ("remat", "scan_layers", "attn_impl", "dtype")  # how it runs, not the arrays


def _changed(saved, now, section: str, keys=None) -> list[str]:
    a, b = to_dict(getattr(saved, section)), to_dict(getattr(now, section))
    return [f"{section}.{k}: checkpoint {a[k]!r} vs now {b[k]!r}" for k in (keys or a)
            if a[k] != b[k]]


def incompatible_changes(saved: Config, cfg: Config) -> tuple[list[str], list[str]]:
    """(model changes, setup changes) that a checkpoint cannot continue under: a different model
    (its arrays), tokenizer, optimizer state layout or data-iterator kind. Anything else — batch
    size, sequence length, lr, schedule, steps… — resumes (see :func:`describe_changes`)."""
    model = [d for d in _changed(saved, cfg, "model") if d.split(":")[0][6:] not in _RUNTIME_MODEL]
    model += _changed(saved, cfg, "data", ("tokenizer",))
    so, co = saved.optim, cfg.optim
    setup = _changed(saved, cfg, "optim", ("name",))
    if so.name == co.name and so.name in ("galore", "fira"):
        setup += _changed(saved, cfg, "optim", ("rank", "proj_side"))
    for key in ("reset_every", "refactor_every", "grad_clip"):  # 0 <-> >0 adds/removes state
        if bool(getattr(so, key)) != bool(getattr(co, key)):
            setup += _changed(saved, cfg, "optim", (key,))
    setup += _changed(saved, cfg, "data", ("mode",))
    if bool(saved.data.sources) != bool(cfg.data.sources):  # one iterator vs a mixture of them
        setup += _changed(saved, cfg, "data", ("sources",))
    return model, setup


def check_compatible(saved: Config, cfg: Config) -> None:
    """Resume only what can continue: same model and tokenizer, same optimizer-state layout, same
    data mode. Says exactly what differs, and that the checkpoint itself is fine."""
    model, setup = incompatible_changes(saved, cfg)
    if model:
        raise ConfigError("out_dir holds a checkpoint of a different model (" + "; ".join(model)
                          + "); use a new out_dir or the checkpoint's settings")
    if setup:
        parts = [p for p, hit in (("optimizer state", any(d.startswith("optim.") for d in setup)),
                                  ("data position", any(d.startswith("data.") for d in setup)))
                 if hit]
        raise ConfigError(
            f"out_dir {cfg.out_dir} holds an intact checkpoint of a run with other training "
            f"settings ({'; '.join(setup)}): its {' and '.join(parts)} cannot continue under the "
            f"new ones; rerun with the checkpoint's settings (saved in "
            f"{os.path.join(cfg.out_dir, 'config.yaml')}), or use a new out_dir to start fresh")


_NOTES = {"train.batch_size": "the data position is counted in batches, so resumed rows shift",
          "data.seq_len": "the data position is counted in batches, so resumed rows shift",
          "train.steps": "the lr schedule is recomputed for the new length",
          "seed": "the data order already drawn is kept; the new seed affects nothing resumed",
          "data.sources": "each source keeps its position, the new weights apply from the next "
                          "batch, a new source starts at its beginning"}


def describe_changes(saved: Config, cfg: Config) -> list[str]:
    """One line per setting that differs from the checkpoint's but resumes fine (batch size,
    sequence length, lr, steps, eval/logging…), for the loop to log; [] when nothing changed.
    ``out_dir`` and the incompatible settings (:func:`check_compatible`) are not listed."""
    model, setup = incompatible_changes(saved, cfg)
    blocked = {d.split(":")[0] for d in model + setup}
    a, b = to_dict(saved), to_dict(cfg)
    lines = []
    for name in a:
        pairs = (a[name].items() if isinstance(a[name], dict) else [(None, a[name])])
        for key, old in pairs:
            dotted = f"{name}.{key}" if key else name
            new = b[name][key] if key else b[name]
            if old != new and dotted not in blocked and dotted != "out_dir":
                note = _NOTES.get(dotted)
                lines.append(f"{dotted}: checkpoint {old!r} -> now {new!r}"
                             + (f" ({note})" if note else ""))
    return lines
