"""Test-only node for the soak test: reports DreamMatcher state left on models in the server.

Linked into the soak server's ``custom_nodes`` only (never into a user's ComfyUI). The node takes
the MODEL that stock graphs use and walks it, and every model ComfyUI currently holds loaded, for
traces of a DreamMatcher *run*: per-run keys in ``transformer_options``, the gradient escape left
in a layer's weight functions, or any DreamMatcher key, attachment, wrapper or replace on the stock
model. The AMA patch attached to a patched clone is by design (a patched MODEL is a reusable object)
and not reported.
"""

from __future__ import annotations

import json

#: transformer_options keys that exist only while a DreamMatcher sampling run is in flight.
RUN_ONLY_KEYS = ("dreammatcher_ama_run", "dreammatcher_ama_call")


def _findings(patcher, *, stock: bool) -> list[str]:
    out = []
    topts = patcher.model_options.get("transformer_options", {})
    for key in topts:
        if key in RUN_ONLY_KEYS or (stock and "dreammatcher" in str(key)):
            out.append(f"transformer_options[{key!r}]")
    wrappers = topts.get("wrappers", {})
    for kind, keyed in wrappers.items():
        for key in keyed:
            if stock and "dreammatcher" in str(key):
                out.append(f"wrapper {kind}/{key}")
    for table in topts.get("patches_replace", {}).values():
        for key, fn in table.items():
            if stock and getattr(fn, "_dm_patch", None) is not None:
                out.append(f"replace {key}")
    for key in getattr(patcher, "attachments", {}):
        if stock and "dreammatcher" in str(key):
            out.append(f"attachment {key}")
    model = getattr(patcher, "model", None)
    diffusion = getattr(model, "diffusion_model", None)
    if diffusion is not None:
        for name, module in diffusion.named_modules():
            for attr in ("weight_function", "bias_function"):
                for fn in module.__dict__.get(attr, []):
                    if "dreammatcher" in str(getattr(fn, "__module__", "")).lower() or \
                            str(getattr(fn, "__qualname__", "")) == "_constant_copy":
                        out.append(f"{name}.{attr}")
    return out


class DMSoak_ModelStateProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "tag": ("STRING", {"default": ""})}}

    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def run(self, model, tag):
        import comfy.model_management as mm

        loaded = []
        for entry in list(mm.current_loaded_models):
            patcher = entry.model
            if patcher is not None:
                loaded.extend(_findings(patcher, stock=False))
        report = {"tag": tag, "stock": _findings(model, stock=True), "loaded": loaded,
                  "loaded_count": len(mm.current_loaded_models)}
        return {"ui": {"text": [json.dumps(report)]}}


NODE_CLASS_MAPPINGS = {"DMSoak_ModelStateProbe": DMSoak_ModelStateProbe}
