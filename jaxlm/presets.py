"""Where configs and corpora come from: the bundled presets and corpora by name, YAML files.

The presets ship inside the package (``jaxlm/configs`` links to the repository's top-level
``configs/``), so an installed jaxlm finds them by name — ``load_config("shakespeare")`` is
``configs/shakespeare.yaml`` from any working directory — and the bundled corpora likewise
(``data.path=shakespeare``, ``jaxlm-eval --data wikitext2``). A missing preset or corpus name is a
one-line :class:`~jaxlm.errors.ConfigError`, never a silent fallback. YAML is read with a loader
that refuses duplicate keys (:mod:`jaxlm.utils.strict_yaml`).

Example::

    from jaxlm.presets import preset_names, resolve_config_path, read_yaml
    preset_names()                                   # ['bench_tiny_llama', ..., 'tiny', ...]
    read_yaml(resolve_config_path("tiny"))["model"]  # {'d_model': 64, ...}
"""

from __future__ import annotations

import os
import re

import yaml

from jaxlm.errors import ConfigError, suggest as _suggest
from jaxlm.utils.files import not_regular_file
from jaxlm.utils.strict_yaml import yaml_load

_HERE = os.path.dirname(os.path.abspath(__file__))
ASSETS = os.path.join(_HERE, "assets")
DEFAULT_CORPUS = os.path.join(ASSETS, "tinyshakespeare", "input.txt")
PRESETS = os.path.join(_HERE, "configs")
DEFAULT_PRESET = "shakespeare"


def read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a directory; pass a YAML file "
                          "(e.g. configs/tiny.yaml)")
    if not_regular_file(path):
        raise ConfigError(f"config file {path} is {not_regular_file(path)}, not a regular file; "
                          "pass a YAML file (e.g. configs/tiny.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file or a "
                          f"preset name ({', '.join(preset_names())})")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f, path) or {}
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}; fix the syntax there"
                          ) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (bad byte at offset {e.start}); "
                          "pass a YAML file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got "
                          f"{type(data).__name__} (write e.g. 'train: {{steps: 100}}')")
    return data


def preset_names() -> list[str]:
    """The bundled presets, loadable by name (``shakespeare``, ``tiny``, ``llama_1b``, ...)."""
    if not os.path.isdir(PRESETS):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml"))


def resolve_config_path(name_or_path: str) -> str:
    """A YAML file path as given, or the bundled preset of that name (``shakespeare``).

    A bare name (no ``/``, no ``.yaml``) that is not an existing file is looked up among the
    presets; anything else is a path. A missing preset is a ConfigError, never a fallback."""
    looks_like_path = (os.sep in name_or_path or "/" in name_or_path
                       or name_or_path.endswith((".yaml", ".yml")))
    if looks_like_path or os.path.exists(name_or_path):
        return name_or_path
    path = os.path.join(PRESETS, name_or_path + ".yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"no preset named {name_or_path!r}"
                          f"{_suggest(name_or_path, preset_names())} (presets: "
                          f"{', '.join(preset_names()) or 'none installed'}); pass a preset name "
                          "or the path of a YAML file")
    return path


# Bundled corpora by name, so data.path / data.val_path / jaxlm-eval --data work from any directory.
CORPORA = {"shakespeare": DEFAULT_CORPUS,
           "wikitext2": os.path.join(ASSETS, "wikitext-2", "valid.txt")}


_REMOTE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_LOCAL = "and pass the local path (a text file or a jaxlm-prepare directory)"
_MOUNT_HINT = {
    "gs": f"mount the bucket with gcsfuse (or copy it locally with gcloud storage cp) {_LOCAL}",
    "s3": f"mount the bucket with a FUSE mount (mountpoint-s3, s3fs) or copy it locally {_LOCAL}",
    "hf": "for a Hugging Face dataset run jaxlm-prepare with an hf: input (jaxlm-prepare "
          "hf:NAME --out DIR) and pass DIR",
    "http": f"download it (curl -O) {_LOCAL}",
    "https": f"download it (curl -O) {_LOCAL}",
    "": f"mount it with a FUSE filesystem or copy it locally {_LOCAL}",
}


def resolve_data_path(name_or_path: str, what: str = "data.path") -> str:
    """A file path as given, or the bundled corpus of that name (``shakespeare``, ``wikitext2``).

    An existing file wins over a name; a bare word (no ``/``, no ``.``) that is neither is a
    ConfigError listing the names. A remote URL (``gs://``, ``s3://``, ``hf://``, ``https://``,
    any ``scheme://``) is a ConfigError: jaxlm reads local paths only. Other paths are returned
    for the reader to report."""
    remote = _REMOTE.match(name_or_path or "")
    if remote and not os.path.exists(name_or_path):
        raise ConfigError(f"{what}: {name_or_path} is a remote URL, which jaxlm does not read "
                          f"directly; {_MOUNT_HINT.get(remote.group(1).lower(), _MOUNT_HINT[''])}")
    if (not name_or_path or os.path.exists(name_or_path)
            or any(c in name_or_path for c in ("/", ".", os.sep))):
        return name_or_path
    if name_or_path in CORPORA:
        return CORPORA[name_or_path]
    raise ConfigError(f"{what}: {name_or_path!r} is neither a file nor a bundled corpus"
                      f"{_suggest(name_or_path, CORPORA)} (bundled: {', '.join(CORPORA)}); pass "
                      "the path of a text file or a bundled name")
