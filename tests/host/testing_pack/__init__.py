"""Test-only node pack: tiny models, conditionings and latents as graph nodes.

Loaded by ``tests/host/conftest.py`` next to the real pack so that API-format graphs run
through ComfyUI's executor can use in-process tiny models (no checkpoint file exists).
"""

from .tiny_models import build, cond, latent


class DMTest_TinyModel:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"layout": (["sd15", "sdxl"],), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, layout, seed):
        return (build(layout, seed),)


class DMTest_Cond:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "tokens": ("INT", {"default": 77})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, tokens):
        return (cond(seed, tokens),)


class DMTest_Latent:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0}), "height": ("INT", {"default": 16}),
                             "width": ("INT", {"default": 16}), "batch": ("INT", {"default": 1})}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = "testing"

    def run(self, seed, height, width, batch):
        return (latent(seed, height, width, batch),)


NODE_CLASS_MAPPINGS = {
    "DMTest_TinyModel": DMTest_TinyModel,
    "DMTest_Cond": DMTest_Cond,
    "DMTest_Latent": DMTest_Latent,
}
