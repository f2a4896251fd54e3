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


def boot_in_process(base: Path, *, cpu: bool, extras: bool = True) -> tuple[Path, dict[str, Path], str]:
    """Start ComfyUI in this process with its folders under ``base`` and load this pack.

    The pack is linked as ``base/custom_nodes/dreammatcher`` (the folder name a git clone gives) and
    loaded through ComfyUI's own ``load_custom_node``. ``extras=False`` skips ComfyUI's
    ``comfy_extras`` node files (the pack needs none; their optional dependencies may be missing on a
    bare GPU image). Returns ``(ComfyUI root, {input|output|temp|custom_nodes: folder}, pack module)``.
    Shared by the host tier and the benchmarks.
    """
    import asyncio

    root = put_comfy_first_on_path()
    from comfy.cli_args import args

    args.cpu = cpu
    dirs = {k: base / k for k in ("input", "output", "temp", "custom_nodes")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    import folder_paths

    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    import nodes  # ComfyUI's nodes.py

    if not str(getattr(nodes, "__file__", "")).startswith(str(root)):
        raise RuntimeError(f"'import nodes' found {nodes.__file__}, not ComfyUI's nodes.py under {root}")
    if extras:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    else:
        asyncio.run(nodes.init_public_apis())
    link = dirs["custom_nodes"] / "dreammatcher"
    link.symlink_to(REPO, target_is_directory=True)
    if not asyncio.run(nodes.load_custom_node(str(link), ignore=set(nodes.NODE_CLASS_MAPPINGS))):
        raise RuntimeError("the pack failed to load (see the log above)")
    return root, dirs, str(link).replace(".", "_x_")
