"""The one place module names are made safe for tags and paths."""

from __future__ import annotations

import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]")


def safe_name(name: str) -> str:
    """A module name as a tag or path component: letters, digits, ``_``, ``-`` and single dots only.

    Every dot-separated part is cleaned on its own, so no result can contain a path separator or a
    ``..`` component; the root module (``""``) becomes ``"root"``.

    Example::

        >>> safe_name("encoder.layers.0.self_attn"), safe_name(""), safe_name("../../etc/passwd")
        ('encoder.layers.0.self_attn', 'root', '_._._._._etc_passwd')
    """
    if not name:
        return "root"
    parts = [_UNSAFE.sub("_", part) or "_" for part in name.split(".")]
    return ".".join(parts)


# The explorer's data in TensorBoard: summaries of our own plugin (tab ``rnnviz``), one tag per source of a
# probe set, ``rnnviz/probe_set/train`` and ``rnnviz/probe_set/val``; each value a blob of
# :mod:`lightning_rnnviz.payload`'s format.
PLUGIN_NAME = "rnnviz"
PROBE_SET_TAG = "rnnviz/probe_set"
