"""The package's import graph, every import read (inside functions and under ``TYPE_CHECKING`` too): no
circle, and imports only go down the layers names -> probe -> render -> sinks -> pipeline -> callbacks; the
stages' packages stay apart: sinks speak logger APIs only and know neither a record nor a picture's drawing."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_rnnviz"
# lower first; a module may import its own layer and those below. The package root (lazy names) and
# `__main__` stand above everything and are not imported by anything of ours but the command line's.
LAYERS = ["names", "payload", "probe", "render", "sinks", "pipeline", "explorer", "cli", "callbacks"]
# what each stage package may import of ours besides itself (the pipeline and the callbacks join them)
STAGE_IMPORTS = {"names": set(), "payload": set(), "probe": set(), "render": {"probe", "names", "payload"},
                 "sinks": {"names"}}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub`: the submodule where there is one, else the package itself
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("lightning_rnnviz") and target != name:
                    edges[name].add(target)
    return edges


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_goes_up_a_layer():
    modules = _modules()
    up = [(a, b) for a, targets in _edges(modules).items() for b in targets
          if _layer(a) is not None and (_layer(b) is None or _layer(b) > _layer(a))]
    assert up == []


def test_the_import_graph_has_no_circle():
    edges = _edges(_modules())
    # a package importing its own submodules (its public names) and a submodule importing its package's
    # name for a sibling is one circle Python resolves, but a circle all the same: none is allowed
    circles = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(path[path.index(target):] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_the_stage_packages_import_only_what_their_stage_needs():
    """The probe knows torch, render reads records, sinks take encoded pictures and numbers: none of them
    hands work to another (that is the pipeline's), and a sink never imports the drawing or a record."""
    strays = []
    for a, targets in _edges(_modules()).items():
        layer = a.split(".")[1] if "." in a else None
        if layer not in STAGE_IMPORTS:
            continue
        for b in targets:
            other = b.split(".")[1] if "." in b else None
            if other != layer and other not in STAGE_IMPORTS[layer]:
                strays.append((a, b))
    assert strays == []


def test_the_callbacks_set_no_field_of_the_recorder():
    """One owner: the recorder changes its own state through its methods; a Lightning callback asks it to,
    and never assigns to it (``recorder.x = ...``, ``self._recorder.x = ...``)."""
    writes = []
    for path in (PACKAGE / "callbacks").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            targets = node.targets if isinstance(node, ast.Assign) else (
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
            for target in targets:
                for item in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(item, ast.Attribute) and "recorder" in ast.unparse(item.value):
                        writes.append(f"{path.name}:{node.lineno}: {ast.unparse(item)}")
    assert writes == []
