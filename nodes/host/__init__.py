"""The host layer: the only code of the pack that imports ComfyUI (``comfy.*``, ``comfy_api``,
``folder_paths``, ``latent_preview``).

Everything version-sensitive lives in this package, and it hands the rest of the pack plain values
(tensors, tuples, dicts) instead of ComfyUI objects wherever it can, so a ComfyUI update that moves an
internal breaks one file here, with a clear message. Tested against ComfyUI 0.3.75 (the oldest
supported version, see ``pyproject.toml``) and 0.28.2 (the newest tested one); where the two differ,
the helpers read what the host provides (an option in ``extra_options``, a marker in
``model_options``) instead of its version number. ``docs/host.md`` lists the host facts relied on.

Modules: ``model`` (introspection of a MODEL: latent format, prediction type, UNet layout, sigmas at
a percent), ``sampling`` (schedules, guiders, sampler objects, calls into the sampling loop,
progress, interruption, refusals), ``hooks`` (attention replaces, output-block patches, keyed
wrappers, parsing of hook arguments, the attention kernel), ``autograd`` (the gradient escape from
inference mode) and ``folders`` (ComfyUI's input/output folders).
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
