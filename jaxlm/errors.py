"""The one exception type for user mistakes, and the "did you mean" helper its messages use.

A :class:`ConfigError` is a user error (bad config, missing file, impossible mesh, ...): the CLI
prints it as one ``error: ...`` line and exits 2 (jaxlm/cli.py), never a traceback.

Example::

    from jaxlm.errors import ConfigError, suggest
    suggest("shakespear", ["shakespeare", "tiny"])   # "; did you mean 'shakespeare'?"
"""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A user error in the configuration; the CLI prints it as one ``error: ...`` line."""


def suggest(word: str, options, prefix: str = "") -> str:
    """'; did you mean 'train.lr'?' for the closest option to a typo, else ''."""
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""
