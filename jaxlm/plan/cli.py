"""``jaxlm-plan``: will this config fit, and how fast will it run, on a pod you have not rented?

    jaxlm-plan CONFIG [section.key=value ...] --target TARGET [--mesh data=1,fsdp=-1,tensor=1]
               [--json] [--sweep-mesh [--top K]] [--analytic]

TARGET: ``v4-N``, ``v5e-N``, ``v5p-N``, ``v6e-N`` (N chips), ``2x v5e-256`` (slices),
``h100xN``, ``h200xN``, ``a100xN``, or ``cpu`` (this machine, its peak FLOP/s and memory
bandwidth measured). Prints a table (or one JSON object with ``--json``; a JSON list with
``--sweep-mesh``). See docs/scaling.md for the arithmetic and jaxlm/plan/ for the modules.

Fake devices. Compiling for N GPUs (or for a TPU without ``libtpu``) needs N CPU devices, and
``--xla_force_host_platform_device_count`` is read once, when jax initialises. So the CLI sets
``XLA_FLAGS`` (and ``JAX_PLATFORMS=cpu``) *before* importing jax; when jax is already imported
with too few devices (called from a notebook, a test), it re-runs itself in a subprocess
(``python -m jaxlm.plan.cli ...``) with the flag — the result is the same, one process later.

Example::

    jaxlm-plan llama_1b --target v5e-256 --mesh fsdp=256
    jaxlm-plan llama_1b --target h100x8 --json
    jaxlm-plan tiny model.vocab_size=256 --target cpu
    jaxlm-plan llama_1b --target v5e-256 --sweep-mesh --top 3

or ``from jaxlm.plan.cli import run; run(cfg, "v5e-16")`` -> the plan dict.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

from jaxlm.config import ConfigError

_FLAG = "--xla_force_host_platform_device_count"


def _args(argv):
    from jaxlm.cli import _Parser

    p = _Parser(prog="jaxlm-plan", description="Plan a run on a TPU pod or GPU cluster.")
    p.add_argument("args", nargs="*", metavar="CONFIG [section.key=value ...]")
    p.add_argument("--target", required=True, help="v5e-256, v5p-64, h100x64, cpu, ...")
    p.add_argument("--mesh", default="", help="e.g. data=1,fsdp=-1,tensor=2 (mesh.* overrides)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--sweep-mesh", action="store_true",
                   help="rank meshes, remat policies and micro-batch counts that fit")
    p.add_argument("--top", type=int, default=3, help="--sweep-mesh: compile the best K")
    p.add_argument("--analytic", action="store_true", help="formulas only, compile nothing")
    return p.parse_intermixed_args(argv)


def mesh_overrides(text: str) -> list[str]:
    """``"fsdp=4,tensor=2"`` -> ``["mesh.fsdp=4", "mesh.tensor=2"]``."""
    out = []
    for part in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"(data|fsdp|tensor)\s*=\s*(-?\d+)", part)
        if not m:
            raise ConfigError(f"--mesh {text!r}: expected axis=size pairs over data, fsdp, "
                              "tensor (e.g. --mesh fsdp=4,tensor=2)")
        out.append(f"mesh.{m.group(1)}={m.group(2)}")
    return out


def _devices_needed(target, analytic: bool) -> int:
    if analytic:
        return 0
    if target.chip.kind == "tpu" and importlib.util.find_spec("libtpu") is not None:
        return 0
    return target.n_chips


def _env_with_devices(n: int) -> dict:
    env = dict(os.environ)
    flags = re.sub(rf"{_FLAG}=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = f"{flags} {_FLAG}={max(n, 1)}".strip()
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def _ensure_devices(n: int) -> bool:
    """Make ``n`` CPU devices available in this process if jax is not yet initialised;
    False when it is and has fewer (the caller re-runs in a subprocess)."""
    if "jax" not in sys.modules:
        os.environ.update(_env_with_devices(n))
        return True
    import jax

    return len(jax.devices("cpu")) >= n


def cpu_chip(dtype: str, n_devices: int):
    """This machine as a target: measured matmul FLOP/s and memory bandwidth (per device);
    :func:`jaxlm.plan.probe.cpu_chip` (medians of interleaved samples)."""
    from jaxlm.plan.probe import cpu_chip as probe

    return probe(dtype, n_devices)


def run(cfg, target_name: str, sweep: bool = False, top: int = 3, analytic: bool = False,
        devices=None, chip=None):
    """The plan (a dict) of ``cfg`` on a target, or the ranked sweep (a list of plans).
    ``chip``: for the ``cpu`` target, rates measured by the caller (:mod:`jaxlm.plan.probe`)."""
    from jaxlm.plan import planner
    from jaxlm.plan.targets import parse_target

    target = parse_target(target_name)
    if target.chip.kind == "cpu":
        target = parse_target(target_name, chip or cpu_chip(cfg.model.dtype, target.n_chips))
    if sweep:
        return planner.sweep(cfg, target, top=top, compile=not analytic, devices=devices)
    return planner.plan(cfg, target, devices=devices, compile=not analytic)


def _plan(argv) -> int:
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    a = _args(argv)
    from jaxlm.cli import split_train_args
    from jaxlm.config import load_config
    from jaxlm.plan.targets import parse_target

    if not a.args:
        raise ConfigError("jaxlm-plan: give a config (a preset name or a YAML path) first, e.g. "
                          "jaxlm-plan llama_1b --target v5e-256")
    if a.top < 1:
        raise ConfigError(f"jaxlm-plan: --top {a.top} must be >= 1")
    path, overrides = split_train_args(a.args)
    target = parse_target(a.target)
    need = _devices_needed(target, a.analytic)
    if need and not _ensure_devices(need):
        env = _env_with_devices(need)
        return subprocess.run([sys.executable, "-m", "jaxlm.plan.cli", *argv], env=env).returncode
    cfg = load_config(path, overrides + mesh_overrides(a.mesh))
    result = run(cfg, a.target, sweep=a.sweep_mesh, top=a.top, analytic=a.analytic)
    if a.sweep_mesh and not result:
        raise ConfigError(f"no mesh, remat policy or micro-batch count fits {a.target}; use more "
                          "chips or a smaller model / batch")
    from jaxlm.plan.report import format_plan, format_sweep

    if a.json:
        print(json.dumps(result, indent=1, sort_keys=False))
    else:
        print(format_sweep(result) if a.sweep_mesh else format_plan(result))
    return 0


def main(argv=None) -> int:
    from jaxlm.cli import _guard

    return _guard(_plan, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
