"""Tiny random-weight UNets with the SD1.5 and SDXL *block layouts* (docs/host.md).

They keep every block id, transformer position and downsampling step of the real models,
so block discovery, attention keys and cond/uncond batching behave exactly as with the real
ones, while a 10-step sample at 16x16 takes well under a second on a CPU.
"""

from __future__ import annotations

import torch

CONTEXT_DIM = 32

SD15_TINY = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 2, 4, 4],
    transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=CONTEXT_DIM,
    use_temporal_resblock=False, use_temporal_attention=False,
)

# SDXL layout: 3 levels, attention only at levels 1 and 2, several transformer blocks per
# SpatialTransformer (real SDXL: 2 and 10; here 2 and 3 to stay fast).
SDXL_TINY = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4, model_channels=32,
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 3, 3],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 3, 3, 3], channel_mult=[1, 2, 4],
    transformer_depth_middle=3, use_linear_in_transformer=True, context_dim=CONTEXT_DIM,
    use_temporal_resblock=False, use_temporal_attention=False,
)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """comfy's ops leave weights as ``torch.empty``: initialise every parameter, seeded."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.ndim == 1:
                if "norm" in name and name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def build(layout: str = "sd15", seed: int = 0, dtype: torch.dtype = torch.float32):
    """Return a ``ModelPatcher`` around a tiny seeded UNet of the given layout."""
    import comfy.latent_formats
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.supported_models_base

    if layout == "sd15":
        mc = comfy.supported_models.SD15(dict(SD15_TINY))
    elif layout == "sdxl":

        class TinySDXL(comfy.supported_models_base.BASE):
            unet_config: dict = {}
            unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
            latent_format = comfy.latent_formats.SDXL

        mc = TinySDXL(dict(SDXL_TINY))
    else:
        raise ValueError(layout)
    mc.set_inference_dtype(dtype, None)
    model = mc.get_model({}, "", device=torch.device("cpu"))
    init_weights(model, seed)
    model.to(dtype)
    return comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))


def cond(seed: int, tokens: int = 77, batch: int = 1) -> list:
    """A CONDITIONING made without CLIP: ``[[tensor, {}]]``."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, tokens, CONTEXT_DIM, generator=gen), {}]]


def latent(seed: int, h: int = 16, w: int = 16, batch: int = 1) -> dict:
    """A LATENT dict holding a seeded random VAE-space latent."""
    gen = torch.Generator().manual_seed(seed)
    return {"samples": torch.randn(batch, 4, h, w, generator=gen)}
