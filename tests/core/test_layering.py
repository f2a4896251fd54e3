"""The pack's layers, read from the source with ``ast`` (no import of the pack or of ComfyUI).

Layers, each importing only its own and lower ones:

0. ``dreammatcher_core`` (pure torch/einops/numpy maths)
1. plain data and policy: ``nodes.layout``, ``nodes.config``, ``nodes.subject``; the charts drawn with
   Pillow, ``nodes.plot`` (it imports nothing from the pack)
2. the host layer ``nodes.host`` (the only code importing ComfyUI)
3. runtimes: inversion, reference files, capture, the AMA package, guidance, inspectors
4. node declarations: ``nodes.node_*``, ``nodes.sockets``, ``nodes.inputs``, ``nodes.extension``
5. the pack's ``__init__`` (ComfyUI's entry point)

and there is no import cycle anywhere. Function-level imports count like module-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACK = "pack"  # the repository root as a package (ComfyUI loads it under its folder name)

#: Top-level modules that belong to ComfyUI (or are only present inside it).
HOST_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "latent_preview",
                "node_helpers", "execution", "server", "nodes", "comfy_aimdo", "comfy_kitchen"}
DATA = {"nodes.layout", "nodes.config", "nodes.subject", "nodes.plot"}
RUNTIMES = {"nodes.inversion", "nodes.reference", "nodes.capture", "nodes.guidance", "nodes.guidance_run",
            "nodes.inspector", "nodes.inspector_match"}
DECLARATIONS = {"nodes.sockets", "nodes.inputs", "nodes.extension"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted([*REPO.glob("nodes/**/*.py"), *REPO.glob("dreammatcher_core/**/*.py")]):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    out[""] = REPO / "__init__.py"
    return out


def _level(name: str) -> int:
    if name.startswith("dreammatcher_core"):
        return 0
    if name in DATA:
        return 1
    if name == "nodes.host" or name.startswith("nodes.host."):
        return 2
    if name in RUNTIMES or name == "nodes.ama" or name.startswith("nodes.ama."):
        return 3
    if name in DECLARATIONS or name.startswith("nodes.node_") or name == "nodes":
        return 4
    if name == "":
        return 5
    raise AssertionError(f"module {name!r} has no layer: add it to tests/core/test_layering.py")


def _imports(name: str, path: Path) -> tuple[set[str], set[str]]:
    """(pack modules imported, top-level external modules imported) by one module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    package = name.split(".") if is_pkg else name.split(".")[:-1]
    if name == "":
        package = []
    internal, external = set(), set()
    known = _modules()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                external.add((node.module or "").split(".")[0])
                continue
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else list(package)
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                internal.add(sub if sub in known else target)
    return internal, external


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: _imports(name, path)[0] for name, path in _modules().items()}


def test_only_the_host_layer_imports_comfyui():
    offenders = {}
    for name, path in _modules().items():
        if name == "nodes.host" or name.startswith("nodes.host."):
            continue
        bad = _imports(name, path)[1] & HOST_MODULES
        if bad:
            offenders[name] = sorted(bad)
    assert not offenders, f"only nodes/host/ may import ComfyUI: {offenders}"


def test_each_layer_imports_only_lower_layers(graph):
    up = {(a, b) for a, deps in graph.items() for b in deps if _level(b) > _level(a)}
    assert not up, f"imports of a higher layer: {sorted(up)}"
    assert _level("nodes.host.model") == 2 and _level("nodes.ama.run") == 3  # the rule is in force


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                cycle = stack[stack.index(m):] + [m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(m) is None:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if state.get(n) is None:
            visit(n)


def test_node_modules_are_short_or_say_why():
    long = []
    for name, path in _modules().items():
        if not name.startswith("nodes"):
            continue
        lines = path.read_text(encoding="utf-8").count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if lines > MAX_LINES and "longer than" not in doc.lower():
            long.append((name, lines))
    assert not long, f"node-layer modules over {MAX_LINES} lines without a reason in their docstring: {long}"


def test_the_checker_sees_a_violation(tmp_path):
    """The import reader finds comfy imports inside functions and resolves relative imports."""
    src = tmp_path / "x.py"
    src.write_text("def f():\n    import comfy.samplers\n    from .host import model\n")
    internal, external = _imports("nodes.x", src)
    assert "comfy" in external and "nodes.host.model" in internal
    deeper = tmp_path / "run.py"
    deeper.write_text("from ..host import hooks\nfrom . import keys\nfrom ...dreammatcher_core import ama\n")
    internal, _ = _imports("nodes.ama.run", deeper)
    assert internal == {"nodes.host.hooks", "nodes.ama.keys", "dreammatcher_core.ama"}
