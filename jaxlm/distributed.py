"""Join a multi-process JAX job: ``initialize(cfg)`` before any JAX computation.

JAX is multi-controller: the same program runs once per host (or per GPU), and every process must
call ``jax.distributed.initialize`` so the processes find each other; after that ``jax.devices()``
lists the devices of all processes and one jitted step runs on a mesh spanning them. Each process
needs three coordinates: the coordinator (``host:port`` of process 0), the process count and its
own index. Where they come from:

* **auto-detected** by ``jax.distributed.initialize()`` on Cloud TPU, under Slurm (``srun``) and
  Open MPI (``mpirun``): set only ``distributed=true``;
* **explicit** (any other cluster, or several processes on one machine): ``coordinator_address``,
  ``num_processes``, ``process_id`` from the config (e.g. ``process_id=$RANK`` on the command
  line). jax itself also reads ``JAX_COORDINATOR_ADDRESS`` and ``JAX_LOCAL_DEVICE_IDS`` from the
  environment. Values that are set win over auto-detection.

On CPU, cross-process collectives need an implementation; gloo ships with jaxlib and is jax's
default (``jax_cpu_collectives_implementation``); we set it explicitly unless one was chosen (e.g.
``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``). The setting only affects the CPU backend, so it is
harmless on GPU and TPU hosts. See docs/multihost.md for TPU pods, Slurm and localhost recipes.

Example (two processes on this machine, 4 fake CPU devices each; run each line in its own shell)::

    export XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu
    jaxlm-train configs/tiny.yaml distributed=true coordinator_address=127.0.0.1:12345 \\
        num_processes=2 process_id=0 mesh.data=2 mesh.fsdp=4 out_dir=/tmp/mh
    jaxlm-train configs/tiny.yaml distributed=true coordinator_address=127.0.0.1:12345 \\
        num_processes=2 process_id=1 mesh.data=2 mesh.fsdp=4 out_dir=/tmp/mh
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from jaxlm.config import Config, ConfigError

log = logging.getLogger("jaxlm")


def is_primary() -> bool:
    """The process that writes shared files (metrics, config, the out_dir lock) and logs INFO."""
    return jax.process_index() == 0


def cluster_args(cfg: Config) -> dict:
    """The explicitly configured ``jax.distributed.initialize`` arguments (unset ones omitted, so
    jax auto-detects them or reads its environment variables)."""
    args = {"coordinator_address": cfg.coordinator_address or None,
            "num_processes": cfg.num_processes or None,
            "process_id": cfg.process_id if cfg.process_id >= 0 else None}
    return {k: v for k, v in args.items() if v is not None}


def initialize(cfg: Config) -> None:
    """Join the job if ``cfg.distributed`` (no-op otherwise, or if already joined).

    Raises ConfigError when neither a known cluster nor explicit coordinates are found.
    """
    if not cfg.distributed or jax.distributed.is_initialized():
        return
    if jax.config.jax_cpu_collectives_implementation is None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**cluster_args(cfg))
    except ValueError as e:  # jax: "coordinator_address should be defined." and the like
        reason = str(e).rstrip(".")
        raise ConfigError(
            f"distributed=true but {reason[:1].lower() + reason[1:]}: outside Cloud TPU, Slurm "
            "and Open MPI set coordinator_address=HOST:PORT num_processes=N process_id=I") from None
    log.info("distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())


ERROR_BYTES = 2048  # room for one error line (longer ones are cut)


def primary_outcome(error: str) -> str:
    """Process 0's ``error`` ("" = success) on every process of the job; ``error`` itself when
    there is one process.

    For a step only the primary process does (e.g. take the out_dir lock): everyone calls this
    right after it, and all of them then stop with the primary's one-line error instead of the
    others running on into a collective that the primary never joins (a gloo/coordination-service
    timeout, a traceback, long after the real error). The text travels as a fixed-size uint8
    array through :func:`jax.experimental.multihost_utils.broadcast_one_to_all`."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    raw = error.encode()[:ERROR_BYTES].ljust(ERROR_BYTES, b"\0")
    got = multihost_utils.broadcast_one_to_all(np.frombuffer(raw, np.uint8))
    return bytes(np.asarray(got, np.uint8)).rstrip(b"\0").decode(errors="replace")
