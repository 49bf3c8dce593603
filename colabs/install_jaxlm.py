# Install jaxlm into this kernel without downgrading the runtime's accelerator.
# Colab: run this cell. Locally, with jaxlm installed (`pip install -e ".[notebooks]"`), it
# does nothing. It installs `jaxlm[notebooks]` from JAXLM_SOURCE, adding `tpu` / `cuda12` to
# the extras when the runtime has that accelerator but no compatible jax for it, so a
# preinstalled GPU/TPU jax is kept or upgraded, never replaced by a CPU-only one.
# (Written once in colabs/install_jaxlm.py; colabs/sync.py copies it into every notebook. It
# imports neither jaxlm, not installed yet, nor jax, which 02 configures before importing.)
import glob
import importlib
import importlib.metadata
import os
import re
import subprocess
import sys

# Where jaxlm comes from: a git URL, a local checkout or a wheel (CI sets the checkout).
JAXLM_SOURCE = os.environ.get("JAXLM_SOURCE", "git+https://github.com/jaxlm/jaxlm")
JAX_RANGE = ("0.10.2", "0.13")  # pyproject.toml: jax>=0.10.2,<0.13
EXTRA = {"tpu": "tpu", "gpu": "cuda12"}  # runtime -> jaxlm extra that installs its jax
PLUGINS = {"tpu": ("libtpu",), "gpu": ("jax-cuda12-plugin", "jax-cuda13-plugin")}


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _key(version):
    return tuple(int(x) for x in re.match(r"\d+(?:\.\d+)*", version).group().split("."))


def detect_runtime(env=os.environ):
    """'gpu', 'tpu' or 'cpu' (JAX_PLATFORMS=cpu means cpu), without importing jax."""
    if env.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
        return "cpu"
    if glob.glob("/dev/nvidia[0-9]*"):  # an NVIDIA GPU (Colab T4, ...)
        return "gpu"
    if (env.get("COLAB_TPU_ADDR") or env.get("TPU_ACCELERATOR_TYPE") or glob.glob("/dev/accel*")
            or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"
    return "cpu"


def plan(source, runtime, jax_version, plugin_version):
    """(pip requirement, reason): keep a compatible jax; else install the runtime's jax."""
    lo, hi = JAX_RANGE
    fits = jax_version is not None and _key(lo) <= _key(jax_version) < _key(hi)
    have = f"jax {jax_version}" if jax_version else "no jax"
    extras = ["notebooks"]
    if runtime not in EXTRA:
        why = f"{have}; {'kept' if fits else f'pip installs jax >={lo},<{hi}'} (CPU)"
    elif fits and plugin_version:
        why = f"{have} for {runtime} is in range >={lo},<{hi}: kept"
    else:
        extras.insert(0, EXTRA[runtime])
        why = (f"{have}{'' if plugin_version else f' without {runtime} support'}: installs "
               f"jax[{EXTRA[runtime]}] >={lo},<{hi}")
    if "://" in source or source.startswith("git+"):
        return f"jaxlm[{','.join(extras)}] @ {source}", why
    return f"{source}[{','.join(extras)}]", why  # a local checkout or a wheel


def install_jaxlm(source=JAXLM_SOURCE):
    if _version("jaxlm") and "JAXLM_SOURCE" not in os.environ:
        print(f"jaxlm {_version('jaxlm')} is installed: nothing to do")
        return
    runtime = detect_runtime()
    plugin = next(filter(None, map(_version, PLUGINS.get(runtime, ()))), None)
    requirement, why = plan(source, runtime, _version("jax"), plugin)
    print(f"{runtime} runtime, {why}\npip install {requirement!r}")
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", requirement])
    importlib.invalidate_caches()  # let this kernel import what pip just installed
