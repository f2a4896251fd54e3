"""dreammatcher_core must import and work without ComfyUI (it is the pure-torch tier)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution")

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name}")
            return None

    sys.meta_path.insert(0, Block())
    try:
        import comfy  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the import blocker does not work")

    import dreammatcher_core
    names = sorted(m.name for m in pkgutil.iter_modules(dreammatcher_core.__path__))
    for name in names:
        importlib.import_module(f"dreammatcher_core.{name}")
        assert getattr(dreammatcher_core, name).__name__ == f"dreammatcher_core.{name}"
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked

    import torch
    from dreammatcher_core import matching
    f = torch.randn(1, 8, 3, 3)
    t2r, r2t = matching.argmax_flows(f, f)
    assert torch.all(t2r == 0) and torch.all(r2t == 0)
    print("OK", ",".join(names))
    """
)


def test_core_imports_and_runs_without_comfy():
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("OK ")
    for name in ("ama", "features", "guidance", "masks", "matching", "viz"):
        assert name in last.split(" ", 1)[1].split(",")


def test_package_import_is_lazy():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys, dreammatcher_core; print('torch' in sys.modules)"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
