"""Weighted mixtures of data sources (``data.sources``): grain's mixing over each source's batches.

A mixture is a list of sources ``{name, path, weight}`` (a prepared corpus or a text file each,
all read in the run's ``data.mode`` with the run's tokenizer). Training draws **whole batches**
from the sources with ``grain.IterDataset.mix``:

    p_s = w_s / Σ_t w_t          (the normalised weights)
    after n batches, source s has supplied round(n · p_s) ± 1 of them

grain's selection is deterministic (it does not depend on the seed, so every process picks the
same source for global batch b, and the global batches are the same for any process count), and
exact in expectation and in every prefix up to one batch. Within a source everything is as in
its mode (shuffle by ``seed``, exact resume, document masks, Dataset Decomposition's curriculum).

**Why whole batches, not rows.** One rule for all three modes: a Dataset Decomposition batch has
one sequence length per bucket and a packed batch is filled from one source's documents, so rows
of different sources cannot share a batch there. Every mode's batch holds the same number of
tokens (``train.batch_size × data.seq_len``; DD trades rows for length), so a batch-level weight is
a token-level weight. The cost is a noisier gradient step when weights are small and batches few;
with hundreds of steps the expected update is the same as row-level mixing.

**Checkpoints.** The iterator state is grain's: the position of the selection and, by source name,
each source's own iterator state. Resume with the same sources is exact. If a later run changes
the weights (a new curriculum phase, a continual-pretraining replay ratio), resuming from the
same ``out_dir`` keeps every source's position and continues the selection with the new weights;
a source that is new starts at its beginning and a source that was removed is dropped. (A change
of ``data.sources`` is reported as a config change on resume, like any other.)

**Evaluation.** Each source keeps its own held-out split; :meth:`MixtureDataSource.eval_groups`
gives ``{name: batches}`` so the loop logs ``eval_bpb/<name>`` (and ``eval_loss/<name>``) for every
source, and the overall ``eval_bpb`` pools all of them (Σ nll over Σ bytes of every held-out token).

Example::

    from jaxlm.config import load_config
    from jaxlm.data.modes import make_data_source
    cfg = load_config(None, ["data.sources=[{name: shakespeare, path: shakespeare, weight: 3},"
                             " {name: wiki, path: wikitext2, weight: 1}]", "data.seq_len=64"])
    src = make_data_source(cfg.data)          # a MixtureDataSource
    it = src.train_iterator(batch_size=8)     # 3 of every 4 batches from shakespeare
    src.eval_groups(batch_size=8, num_batches=2).keys()   # dict_keys(['shakespeare', 'wiki'])
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import grain

from jaxlm.config import ConfigError, DataConfig
from jaxlm.data.pipeline import HeldOut


class MixtureDataSource(HeldOut):
    """The sources of ``cfg.sources``, each built by ``build`` (a mode's constructor) from
    ``cfg`` with that source's ``path`` / ``val_path``; follows the DataSource protocol
    (``train_iterator`` from :class:`HeldOut`; ``eval_batches`` pools the sources' sets)."""

    def __init__(self, cfg: DataConfig, build: Callable[[DataConfig], object]):
        self.cfg = cfg
        self.sources = {}
        for s in cfg.sources:
            try:
                self.sources[s.name] = build(dataclasses.replace(cfg, sources=(), path=s.path,
                                                                 val_path=s.val_path))
            except ConfigError as e:  # name the source: "data.path: file is empty" is ambiguous
                raise ConfigError(f"data.sources '{s.name}': {e}") from None
        total = sum(s.weight for s in cfg.sources)
        self.weights = {s.name: s.weight / total for s in cfg.sources}  # p_s
        self.tokenizer = next(iter(self.sources.values())).tokenizer
        self.wants_total_steps = any(getattr(s, "wants_total_steps", False)
                                     for s in self.sources.values())

    def batch_shapes(self, batch_size: int):
        """The union of the sources' batch shapes (DD), or None when all have one shape."""
        shapes = {tuple(x) for s in self.sources.values() if hasattr(s, "batch_shapes")
                  for x in s.batch_shapes(batch_size)}
        return sorted(shapes) or None

    def train_dataset(self, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                      seed: int = 0, total_steps: int = 0) -> grain.IterDataset:
        """``grain.IterDataset.mix`` of the sources' batch datasets, keyed by source name."""
        parts = {}
        for name, src in self.sources.items():
            kw = dict(batch_size=batch_size, process_index=process_index,
                      process_count=process_count, seed=seed)
            if getattr(src, "wants_total_steps", False):
                kw["total_steps"] = total_steps  # dd: each source's cycles span the run
            parts[name] = src.train_dataset(**kw)
        return grain.IterDataset.mix(parts, dict(self.weights))

    def eval_groups(self, *, batch_size: int, num_batches: int, process_index: int = 0,
                    process_count: int = 1) -> dict[str, list[dict]]:
        """{source name: its first ``num_batches`` held-out batches}."""
        return {name: src.eval_batches(batch_size=batch_size, num_batches=num_batches,
                                       process_index=process_index, process_count=process_count)
                for name, src in self.sources.items()}

    def eval_batches(self, *, batch_size: int, num_batches: int, process_index: int = 0,
                     process_count: int = 1) -> list[dict]:
        """Every source's held-out batches, one after another (the pooled eval set)."""
        groups = self.eval_groups(batch_size=batch_size, num_batches=num_batches,
                                  process_index=process_index, process_count=process_count)
        return [b for batches in groups.values() for b in batches]
