"""Test setup, applied before jax is imported anywhere in the test session.

* 8 fake CPU devices, so every sharding test runs on any machine.
* Cheaper XLA CPU compilation (backend optimisation level 0, no expensive LLVM passes): the suite
  is dominated by compile time, not run time. This changes how code is compiled, not the math;
  tolerances in the tests allow for the different float rounding order.
Subprocesses started by tests inherit these settings through the environment.
"""

import os

_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_current] + [f for f in _FLAGS if f.split("=")[0] not in _current]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
