"""Locating and booting the ComfyUI host for the host, e2e and browser tiers.

``COMFYUI_PATH`` points at any ComfyUI checkout; otherwise the pinned 0.3.75 tree that
``scripts/setup_host.sh`` copies to ``.host/comfyui`` is used.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def comfy_root() -> Path:
    root = Path(os.environ.get("COMFYUI_PATH") or REPO / ".host" / "comfyui").resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        raise RuntimeError(
            f"No ComfyUI found at {root}. Run `make test` (it installs the pinned host) "
            "or set COMFYUI_PATH to a ComfyUI checkout."
        )
    return root


def put_comfy_first_on_path() -> Path:
    """Make ``import nodes`` resolve to ComfyUI's ``nodes.py``, not this pack's ``nodes/``."""
    root = comfy_root()
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))
    mod = sys.modules.get("nodes")
    if mod is not None and not str(getattr(mod, "__file__", "")).startswith(str(root)):
        del sys.modules["nodes"]
    return root
