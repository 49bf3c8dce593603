"""The train step compiled ahead of time, once per batch shape, and checked against memory first.

``jax.jit`` compiles on the first call; here the loop compiles explicitly
(``jitted.lower(state, batch).compile()``, the same program a first call would build) so that,
before a single step runs, XLA's own memory analysis of the compiled program can be compared
with what a device has. A configuration that cannot fit (``data.seq_len=100000`` asks for about
a terabyte of attention scores) is then one line naming the estimate and the fix, instead of an
allocation failure deep inside the first step. Per device::

    needed = arguments + outputs − aliased (donated state) + temporaries + generated code

against ``device.memory_stats()["bytes_limit"]`` on GPU/TPU, or, on CPU where every local device
shares the host's RAM, the host's total memory divided by the local devices. The check is
deliberately loose (100% of the limit): it catches what can never run, not what is tight.

Variable-length batches (``data.mode=dd``) compile once per bucket shape; each is checked.

Example::

    steps = CompiledSteps(make_train_step(spec), spec.mesh)
    steps.is_new(batch)                             # True: the next get() compiles
    state, metrics = steps.get(state, batch)(state, batch)   # batch: global arrays
"""

from __future__ import annotations

import os

import jax

from jaxlm.config import ConfigError
from jaxlm.utils.flops import format_bytes


def host_memory_bytes() -> int:
    """Total physical memory of this host (Linux /proc/meminfo, else sysconf; 0 if unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory_bytes(device=None) -> tuple[int, str]:
    """(bytes one device may use, where that figure comes from); 0 if unknown."""
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    if stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    n = len(jax.local_devices())
    return host_memory_bytes() // n, f"host RAM / {n} local device{'s' * (n > 1)}"


def step_memory_bytes(compiled) -> dict:
    """Per-device bytes of a compiled program from XLA's memory analysis ({} if unavailable)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend/version reports it
        return {}
    if m is None:
        return {}
    args, out = m.argument_size_in_bytes, m.output_size_in_bytes
    temp = m.temp_size_in_bytes + m.generated_code_size_in_bytes
    return {"arguments": args, "outputs": out, "temp": temp,
            "total": args + out - m.alias_size_in_bytes + temp}


def check_fits(compiled, shape: tuple[int, int]) -> None:
    """ConfigError if the compiled step needs more memory per device than a device has."""
    need = step_memory_bytes(compiled)
    limit, where = device_memory_bytes()
    if not need or not limit or need["total"] <= limit:
        return
    raise ConfigError(
        f"the train step for batch shape {list(shape)} needs {format_bytes(need['total'])} per "
        f"device (temporaries {format_bytes(need['temp'])}, state and batch "
        f"{format_bytes(need['arguments'])}) but a device has {format_bytes(limit)} ({where}); "
        "lower train.batch_size or data.seq_len, raise train.grad_accum, or set model.remat=full")


class CompiledSteps:
    """Ahead-of-time compiled train steps keyed by batch shape (see the module docstring)."""

    def __init__(self, step_fn, mesh, on_compile=None):
        self.jitted, self.mesh = step_fn.jitted, mesh  # from jaxlm.train.step.make_train_step
        self.cache: dict = {}
        self.on_compile = on_compile  # (compiled, shape) -> None, e.g. the HLO dump

    def is_new(self, batch) -> bool:
        return tuple(batch["inputs"].shape) not in self.cache

    def get(self, state, batch):
        """The compiled step for this batch's shape (compiled and memory-checked on first use)."""
        shape = tuple(batch["inputs"].shape)
        if shape not in self.cache:
            with jax.set_mesh(self.mesh):
                compiled = self.jitted.lower(state, batch).compile()
            check_fits(compiled, shape)
            if self.on_compile is not None:
                self.on_compile(compiled, shape)
            self.cache[shape] = compiled
        return self.cache[shape]
