"""The registry of data modes (``data.mode``), the one place where every mode is known.

``concat`` (:class:`jaxlm.data.pipeline.ConcatDataSource`: concat-and-chunk, nanoGPT style),
``pack`` (:class:`jaxlm.data.packing.PackDataSource`: whole documents first-fit packed with
document masks) and ``dd`` (:class:`jaxlm.data.bucketing.DDDataSource`: Dataset Decomposition).
``data.sources`` mixes several sources in one mode (:class:`jaxlm.data.mixture.MixtureDataSource`).
A plug-in adds its own with :func:`register_data_mode`; a builder maps a :class:`DataConfig` to
any object that follows the :class:`jaxlm.data.pipeline.DataSource` protocol.

Example::

    from jaxlm.config import DataConfig
    from jaxlm.data.modes import make_data_source
    src = make_data_source(DataConfig(seq_len=64, mode="pack"))
"""

from __future__ import annotations

from typing import Callable

from jaxlm.config import ConfigError, DataConfig, register_choice
from jaxlm.data.bucketing import DDDataSource
from jaxlm.data.mixture import MixtureDataSource
from jaxlm.data.packing import PackDataSource
from jaxlm.data.pipeline import ConcatDataSource, DataSource

MODES: dict[str, Callable[[DataConfig], DataSource]] = {
    "concat": ConcatDataSource, "pack": PackDataSource, "dd": DDDataSource}


def register_data_mode(name: str, builder: Callable[[DataConfig], DataSource]) -> None:
    """Add a data mode ``builder(cfg) -> DataSource`` and allow ``data.mode=name`` in configs."""
    MODES[name] = builder
    register_choice("data.mode", name)


def make_data_source(cfg: DataConfig) -> DataSource:
    """Build the data source for ``cfg.mode`` (tokenizes the corpus now). Raises ConfigError."""
    if cfg.mode not in MODES:
        raise ConfigError(f"data.mode={cfg.mode!r} is not one of: {', '.join(sorted(MODES))}")
    if cfg.sources:  # a weighted mixture of sources, each read in this mode
        return MixtureDataSource(cfg, MODES[cfg.mode])
    return MODES[cfg.mode](cfg)
