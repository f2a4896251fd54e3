"""The miniature world's ComfyUI nodes (loaded only by ``make demo``, the tests and the benchmark).

They give the unmodified ComfyUI server everything it needs to run DreamMatcher on the world's model:
a loader (a real ``ModelPatcher`` in the SD1.5 block layout plus a CLIP-compatible word encoder), a
renderer that "photographs" a subject, and latent <-> image conversion through the world's fixed map.
The pack's own nodes and the stock KSampler and CLIPTextEncode run unchanged on their outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from . import world

WEIGHTS = Path(__file__).resolve().parent / "weights"
CATEGORY = "DreamMatcher/miniworld"


class WordCLIP:
    """A CLIP stand-in: ``tokenize`` and ``encode_from_tokens(_scheduled)`` over the world's vocabulary.

    Its token lists have ComfyUI's shape (``{"l": [[(id, weight, word_id), ...]]}``), so the stock
    CLIPTextEncode encodes with it and DreamMatcher's subject lookup finds subject words in it.
    """

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.encoder = encoder

    def tokenize(self, text: str, return_word_ids: bool = False, **_: object) -> dict:
        ids = world.tokenize_words(world.split_prompt(text))
        chunk = []
        for pos in range(world.MAX_TOKENS):
            tok = ids[pos] if pos < len(ids) else 0
            word_id = pos + 1 if pos < len(ids) else 0
            chunk.append((tok, 1.0, word_id) if return_word_ids else (tok, 1.0))
        return {"l": [chunk]}

    def encode_from_tokens(self, tokens: dict, return_pooled: bool | str = False, return_dict: bool = False):
        ids = torch.tensor([[int(t[0]) for t in tokens["l"][0]]], dtype=torch.long)
        with torch.no_grad():
            cond = self.encoder(ids).float()
        if return_dict:
            return {"cond": cond}
        return (cond, None) if return_pooled else cond

    def encode_from_tokens_scheduled(
        self, tokens: dict, unprojected: bool = False, add_dict: dict | None = None, show_pbar: bool = True
    ) -> list:
        return [[self.encode_from_tokens(tokens), dict(add_dict or {})]]


def weight_files() -> list[str]:
    return sorted(p.name for p in WEIGHTS.glob("*.safetensors")) or ["(no weights: run make train-miniworld)"]


def _weights_path(name: str) -> Path:
    path = WEIGHTS / name
    if not path.is_file() or path.parent != WEIGHTS:
        raise ValueError(
            f"No miniworld weights '{name}' in {WEIGHTS}; run `make train-miniworld` or pick "
            f"one of {weight_files()}."
        )
    return path


def palette_of(name: str) -> str:
    """The palette a weights file was trained with (its metadata; files written before palettes: v1).

    WHY it matters: the benchmark renders references and reads colours in this palette, so that a
    model is always shown and scored in the colours it learned.
    """
    from safetensors import safe_open

    with safe_open(str(_weights_path(name)), framework="pt") as f:
        palette = (f.metadata() or {}).get("palette", world.DEFAULT_PALETTE)
    world.palette_colours(palette)  # an unknown name fails here, clearly
    return palette


#: The pack's ``model_options`` key for a declared inversion error, and this model's declaration.
INVERSION_ERROR_KEY = "dreammatcher_inversion_error"
INVERSION_ERROR_LEVEL = 0.5
INVERSION_ERROR_WHY = "the miniature world's small model: 6-46% at 30 steps, median 16%"


def load(name: str):
    """``(ModelPatcher, WordCLIP)`` from a trained weights file in ``weights/``."""
    import comfy.model_management as mm
    import comfy.model_patcher
    from safetensors.torch import load_file

    from . import model as mw_model

    sd = load_file(str(_weights_path(name)))
    base = mw_model.build_base_model("cpu")
    unet_sd = {k[5:]: v.float() for k, v in sd.items() if k.startswith("unet.")}
    base.diffusion_model.load_state_dict(unet_sd)
    base.diffusion_model.eval()
    text = mw_model.WordEncoder()
    text.load_state_dict({k[5:]: v.float() for k, v in sd.items() if k.startswith("text.")})
    text.eval()
    patcher = comfy.model_patcher.ModelPatcher(base, mm.get_torch_device(), mm.unet_offload_device())
    # DDIM Invert Reference warns above 5% reconstruction error, an SD checkpoint's level. This small
    # model is far above it at the demo's own settings (30 ddim_uniform steps, cfg 1: 6% to 46% over
    # 12 rendered references, median 16%), so it declares its level (docs/host.md, "Declared
    # inversion error") and the node warns only beyond it.
    patcher.model_options[INVERSION_ERROR_KEY] = {"level": INVERSION_ERROR_LEVEL, "why": INVERSION_ERROR_WHY}
    return patcher, WordCLIP(text)


class LoadModel:
    """Miniworld Load Model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"weights": (weight_files(), {"tooltip": "A trained miniworld model in weights/."})}
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    RETURN_NAMES = ("model", "clip")
    OUTPUT_TOOLTIPS = (
        "The world's UNet (SD1.5 block layout) as a ModelPatcher.",
        "Its word encoder; use it with the stock CLIP Text Encode. Prompts are word lists.",
    )
    FUNCTION = "run"
    CATEGORY = CATEGORY
    DESCRIPTION = (
        "Loads the miniature world's trained model: a narrow SD1.5-layout UNet and a word encoder "
        "for the vocabulary " + ", ".join(world.VOCAB) + "."
    )

    def run(self, weights):
        return load(weights)


class RenderSubject:
    """Miniworld Render Subject: a "photo" of a subject (the reference)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "shape": (list(world.SHAPES), {"default": "circle"}),
                "texture": (list(world.TEXTURES), {"default": "stripes"}),
                "colour_1": (
                    list(world.COLOUR_NAMES),
                    {"default": "red", "tooltip": "The colour (solid) or the pattern's ink."},
                ),
                "colour_2": (
                    ["none", *world.COLOUR_NAMES],
                    {"default": "blue", "tooltip": "The base under the pattern (not for solid)."},
                ),
                "position": (list(world.POSITIONS), {"default": "left"}),
                "seed": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 2**31 - 1,
                        "control_after_generate": False,
                        "tooltip": "Jitter, size and background tint of the scene.",
                    },
                ),
            },
            "optional": {
                "palette": (
                    sorted(world.PALETTES),
                    {
                        "default": world.SHIPPED_PALETTE,
                        "tooltip": "The colour words' RGB values. Use the palette the model was trained "
                        f"with: the shipped model's is {world.SHIPPED_PALETTE}.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("IMAGE", "LATENT", "STRING")
    RETURN_NAMES = ("image", "latent", "prompt")
    OUTPUT_TOOLTIPS = (
        "The rendered scene (32x32).",
        "Its latent (the world's fixed map).",
        "The scene's full prompt, e.g. 'red blue stripes circle left'.",
    )
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, shape, texture, colour_1, colour_2, position, seed, palette=world.SHIPPED_PALETTE):
        colours = (colour_1,) if texture == "solid" else (colour_1, colour_2)
        if texture != "solid" and colour_2 == "none":
            raise ValueError(f"A {texture} subject needs colour_2 (the base under the pattern).")
        subject = world.Subject(shape, texture, colours)
        scene = world.random_scene(torch.Generator().manual_seed(int(seed)), subject, position)
        rgb = world.render(scene, palette=palette)[None]
        return (
            rgb.permute(0, 2, 3, 1).contiguous(),
            {"samples": world.rgb_to_latent(rgb)},
            " ".join(scene.prompt()),
        )


class LatentToImage:
    """Miniworld Latent to Image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "samples": ("LATENT",),
                "scale": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": 32,
                        "tooltip": "Nearest-neighbour enlargement for viewing.",
                    },
                ),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, samples, scale):
        rgb = world.latent_to_rgb(samples["samples"].float().cpu())
        if scale > 1:
            rgb = torch.nn.functional.interpolate(rgb, scale_factor=scale, mode="nearest")
        return (rgb.permute(0, 2, 3, 1).contiguous(),)


class ImageToLatent:
    """Miniworld Image to Latent (resizes to 32x32 by area averaging first)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "run"
    CATEGORY = CATEGORY

    def run(self, image):
        rgb = image[..., :3].permute(0, 3, 1, 2).float()
        if rgb.shape[-2:] != (world.SIZE, world.SIZE):
            rgb = torch.nn.functional.interpolate(rgb, size=(world.SIZE, world.SIZE), mode="area")
        return ({"samples": world.rgb_to_latent(rgb)},)


NODE_CLASS_MAPPINGS = {
    "MW_LoadModel": LoadModel,
    "MW_RenderSubject": RenderSubject,
    "MW_LatentToImage": LatentToImage,
    "MW_ImageToLatent": ImageToLatent,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "MW_LoadModel": "Miniworld Load Model",
    "MW_RenderSubject": "Miniworld Render Subject",
    "MW_LatentToImage": "Miniworld Latent to Image",
    "MW_ImageToLatent": "Miniworld Image to Latent",
}
