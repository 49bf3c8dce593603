"""YAML without silently dropped settings: a key repeated in one mapping is an error.

PyYAML's ``safe_load`` keeps the *last* of two equal keys, so a config with the same section
twice (``train:`` … ``train:``) or a key twice inside a section silently loses the first one. The
loader here refuses that with one line naming the key and both lines. ``jaxlm.config.read_yaml``
reads every config file through it; read a saved ``<out_dir>/config.yaml`` with ``read_yaml``
too (resume itself restores the config saved as JSON inside the checkpoint).

Example::

    yaml_load("train: {steps: 5}\ntrain: {lr: 1.0}\n", "run.yaml")
    # ConfigError: run.yaml: duplicate key 'train' at line 2 (first at line 1); YAML would ...
"""

from __future__ import annotations

import re

import yaml

from jaxlm.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key repeated in one mapping (PyYAML keeps the last one and
    silently drops the first: a second ``train:`` section would erase the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}  # key -> line of its first occurrence
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` merges are fine
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: PyYAML reports it below
                continue
            if first is not None:
                raise ConfigError(
                    f"{self.name}: duplicate key {key!r} at line {line} (first at line {first}); "
                    "YAML would silently drop the first one — merge them into one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads "3:4" as the base-60 integer 184 (and "1:30.5" as a float), which no config
# value means: a step range (train.profile=5:7) must stay the string it is. Drop the implicit
# int/float resolvers and re-add them without their sexagesimal forms.
_UniqueKeyLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag not in ("tag:yaml.org,2002:int",
                                                     "tag:yaml.org,2002:float")]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"""^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""", re.X), list("-+0123456789"))
_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text, source: str = "<string>"):
    """``yaml.safe_load`` that raises ConfigError for duplicate keys (see _UniqueKeyLoader)."""
    loader = _UniqueKeyLoader(text)
    loader.name = source
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()
