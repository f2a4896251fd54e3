"""The one module of the pack that talks to ComfyUI internals.

Everything version-sensitive lives here: the node API import, model introspection (latent
format, prediction type, sigma schedules), sampler plumbing, block discovery and attention
patch installation, and the gradient escape from ``torch.inference_mode``. The node modules
call these helpers and never import ``comfy.*`` themselves, so a ComfyUI update that moves an
internal breaks exactly one file, with a clear message.

Tested against ComfyUI 0.3.75 (the oldest supported version, see ``pyproject.toml``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

MIN_COMFYUI = "0.3.75"


class HostAPIError(RuntimeError):
    """A ComfyUI API this pack relies on is missing or changed."""


def _update_hint(what: str) -> str:
    return (
        f"DreamMatcher needs {what}, which this ComfyUI does not provide. "
        f"Please update ComfyUI to {MIN_COMFYUI} or newer (git pull / ComfyUI-Manager 'Update ComfyUI')."
    )


def require(module: str, *attrs: str) -> ModuleType:
    """Import a host module and check that it exposes ``attrs``; raise an actionable error if not."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise HostAPIError(_update_hint(f"the module '{module}'")) from exc
    for attr in attrs:
        if not hasattr(mod, attr):
            raise HostAPIError(_update_hint(f"'{module}.{attr}'"))
    return mod


def require_node_api() -> ModuleType:
    """Return ``comfy_api.latest`` (the V3 node API)."""
    return require("comfy_api.latest", "ComfyExtension", "io", "ui")
