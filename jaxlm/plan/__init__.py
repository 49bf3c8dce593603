"""``jaxlm-plan``: plan a pod-scale run before paying for it (issue #17).

Compile the real train step ahead of time for a target — a TPU topology through
``jax.experimental.topologies`` and ``libtpu`` (no TPU needed), or fake CPU devices with the
target's mesh for GPU clusters — and read what the compiler says: memory per chip
(``memory_analysis()``), FLOPs, HBM bytes and the collectives in the optimized HLO with their
sizes and mesh axes. Then a roofline (the JAX scaling book's) turns them into a step time,
tokens/s and MFU, labelled as estimates.

Modules: :mod:`~jaxlm.plan.targets` (chip table, with sources), :mod:`~jaxlm.plan.compile`
(ahead-of-time compile), :mod:`~jaxlm.plan.hlo` (FLOPs / bytes / collectives from HLO text),
:mod:`~jaxlm.plan.estimate` (memory and roofline arithmetic), :mod:`~jaxlm.plan.planner`
(plan, sweep), :mod:`~jaxlm.plan.report` (tables), :mod:`~jaxlm.plan.cli` (``jaxlm-plan``).
docs/scaling.md works one example through by hand beside the compiled numbers.

Example (a process with 8 fake CPU devices)::

    from jaxlm.config import load_config
    from jaxlm.plan.cli import run
    p = run(load_config("tiny", ["model.vocab_size=256"]), "h100x8")
    p["fits"], p["memory_per_chip_bytes"]["total"], p["step_time_s_estimate"]
"""
