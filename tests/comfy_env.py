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


# ---- host differences ------------------------------------------------------------------------------
# Every difference between the ComfyUI versions the tiers run on is handled here, keyed on what the
# host can do rather than on its version string.


def executor_cache_args() -> dict:
    """``cache_args`` for ``execution.PromptExecutor`` that every supported host accepts.

    Newer hosts read ``ram`` and ``ram_inactive`` (RAM-pressure cache headroom, GiB) unconditionally;
    older ones read only the keys of the cache type they build and ignore the rest. Zero headroom
    with the classic cache keeps the in-process runs free of caching between graphs.
    """
    return {"lru": 0, "ram": 0, "ram_inactive": 0}


def sampler_latent_dtype(requested):
    """The dtype in which the host's sampler hands latents to the model for a ``requested`` input.

    Newer ``CFGGuider.outer_sample`` casts noise and latent to float32; older hosts keep the input
    dtype. Read from the guider's own source (the cast is a literal ``float32`` there), not from
    the version string.
    """
    import inspect

    import comfy.samplers
    import torch

    src = inspect.getsource(comfy.samplers.CFGGuider.outer_sample)
    return torch.float32 if "float32" in src else requested


def keep_latent_dtype(model_patcher, dtype):
    """``model_patcher``, or a clone of it on which the sampler sees latents in ``dtype`` again.

    For tests that need float64 end to end (gradient checks against finite differences) on hosts
    whose guider casts latents to float32: a SAMPLER_SAMPLE wrapper, the host's own extension
    point, casts noise and latent back before the sampler function runs, which gives what older
    hosts do unasked. On hosts that keep the dtype the model is returned unchanged.
    """
    if sampler_latent_dtype(dtype) == dtype:
        return model_patcher
    import comfy.patcher_extension as pe

    def wrapper(executor, guider, sigmas, extra_args, callback, noise, latent_image=None, *args, **kwargs):
        latent_image = latent_image.to(dtype) if latent_image is not None else None
        return executor(guider, sigmas, extra_args, callback, noise.to(dtype), latent_image, *args, **kwargs)

    clone = model_patcher.clone()
    clone.add_wrapper_with_key(pe.WrappersMP.SAMPLER_SAMPLE, "dm_test_latent_dtype", wrapper)
    return clone
