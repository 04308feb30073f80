"""The explorer as one self-contained HTML file: the views, the probe sets and nothing to fetch.

The page inlines ``static/explorer.js`` (the module TensorBoard's tab loads) as a ``<script type="module">``
and embeds the data as ``<script type="application/json" id="rnnviz-data">``: ``{"runs": <the /runs JSON>,
"blobs": {"run\\u0000tag\\u0000step": "<the blob in base64>"}}``. It opens from a file path without a server
(W&B's ``wandb.Html``, an MLflow artifact, a mail). Standard library only.

Example::

    >>> runs = {"runs": [{"run": "r", "tags": {"rnnviz/probe_set/val": {"steps": [5], "sizes": [3]}}}]}
    >>> html = page(runs, {("r", "rnnviz/probe_set/val", 5): b"abc"})
    >>> html.startswith("<!DOCTYPE html>"), '"r\\\\u0000rnnviz/probe_set/val\\\\u00005": "YWJj"' in html
    (True, True)
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping
from importlib import resources
from typing import Any

_MOUNT = """
const data = JSON.parse(document.getElementById('rnnviz-data').textContent);
mount(document.getElementById('rnnviz'), embeddedSource(data));
"""


def explorer_js() -> str:
    """The explorer's JavaScript module, as the package ships it."""
    return resources.files("lightning_rnnviz.explorer").joinpath("static/explorer.js").read_text(encoding="utf-8")


def page(runs_json: Mapping[str, Any], blobs: Mapping[Any, bytes], title: str = "rnnviz explorer") -> str:
    """One HTML page that shows the explorer over ``blobs``.

    Args:
        runs_json: what the plugin's ``/runs`` route answers: ``{"runs": [{"run", "tags": {tag: {"steps",
            "sizes"}}}]}``.
        blobs: the probe sets, by ``(run, tag, step)`` or by the page's own key ``"run\\0tag\\0step"``.
        title: the page's title.
    """
    embedded = {}
    for key, blob in blobs.items():
        if not isinstance(key, str):
            run, tag, step = key
            key = f"{run}\0{tag}\0{int(step)}"
        embedded[key] = base64.b64encode(bytes(blob)).decode("ascii")
    data = json.dumps({"runs": runs_json, "blobs": embedded}, ensure_ascii=True)
    data = data.replace("<", "\\u003c").replace(">", "\\u003e")  # never "</script>" inside the element
    script = explorer_js()
    if "</script" in script.lower():
        raise ValueError("explorer.js holds '</script', which would end the inlined module early")
    name = html.escape(title)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{name}</title>\n</head>\n<body>\n<div id=\"rnnviz\"></div>\n"
        f"<script type=\"application/json\" id=\"rnnviz-data\">{data}</script>\n"
        f"<script type=\"module\">\n{script}\n{_MOUNT}</script>\n</body>\n</html>\n"
    )
