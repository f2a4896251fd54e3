"""DreamMatcher for ComfyUI.

ComfyUI imports this file when it scans ``custom_nodes``. It deliberately imports nothing
heavy: the node classes (and torch, and the ComfyUI internals they need) are only imported
when ComfyUI calls :func:`comfy_entrypoint`, i.e. when the host is already up. The nodes use
the V3 schema (``comfy_api.latest``); ComfyUI 0.3.75 loads V3 packs through
``comfy_entrypoint`` as long as no ``NODE_CLASS_MAPPINGS`` is defined here.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    """Return the pack's ``ComfyExtension`` (called by ComfyUI at start-up)."""
    from .nodes.extension import make_extension

    return make_extension()
