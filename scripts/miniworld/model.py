"""The miniature world's model: ComfyUI's own ``UNetModel`` in the SD1.5 block layout and a word encoder.

WHY ComfyUI's classes: the demo must exercise the pack exactly as a real SD1.5 checkpoint does (block
ids, transformer keys, the discrete SD1.x schedule, ``ModelPatcher``). Only the widths are small and
the text side is a learned table of word vectors instead of CLIP. Imports ComfyUI lazily, so the
renderer and metrics stay usable without a host.
"""

from __future__ import annotations

import torch

from . import world

CONTEXT_DIM = 64

UNET_CONFIG = dict(
    use_checkpoint=False,
    image_size=world.SIZE,
    use_spatial_transformer=True,
    legacy=False,
    adm_in_channels=None,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    num_res_blocks=[2, 2, 2, 2],
    transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    channel_mult=[1, 2, 4, 4],
    transformer_depth_middle=1,
    use_linear_in_transformer=False,
    context_dim=CONTEXT_DIM,
    use_temporal_resblock=False,
    use_temporal_attention=False,
)
NUM_HEAD_CHANNELS = 32


class WordEncoder(torch.nn.Module):
    """Token ids [B, T] -> context [B, T, 64]: a word vector plus a slot vector, layer-normed.

    Padding (id 0) has its own vector, so the empty prompt is the unconditional context CFG needs.
    """

    def __init__(self) -> None:
        super().__init__()
        self.words = torch.nn.Embedding(len(world.VOCAB) + 1, CONTEXT_DIM)
        self.slots = torch.nn.Parameter(torch.zeros(world.MAX_TOKENS, CONTEXT_DIM))
        self.norm = torch.nn.LayerNorm(CONTEXT_DIM)
        torch.nn.init.normal_(self.words.weight, std=1.0)
        torch.nn.init.normal_(self.slots, std=0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.words(ids) + self.slots[: ids.shape[1]])


def pad_ids(batch: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(len(batch), world.MAX_TOKENS, dtype=torch.long)
    for i, ids in enumerate(batch):
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def model_config():
    """An SD1.5 ``model_config`` with the narrow widths and this world's latent format."""
    import comfy.latent_formats
    import comfy.supported_models

    class MiniworldLatent(comfy.latent_formats.LatentFormat):
        """The world's latent is already standardised: no scaling, and an RGB preview from the map."""

        scale_factor = 1.0
        latent_channels = 4
        # One row per latent channel, one column per RGB channel: channel c < 3 is standardised c.
        latent_rgb_factors = [[world.LATENT_STD[c] if j == c else 0.0 for j in range(3)] for c in range(4)]
        latent_rgb_factors_bias = list(world.LATENT_MEAN[:3])

    class MiniworldSD15(comfy.supported_models.SD15):
        unet_extra_config = {"num_heads": -1, "num_head_channels": NUM_HEAD_CHANNELS}
        latent_format = MiniworldLatent

    return MiniworldSD15(dict(UNET_CONFIG))


def build_base_model(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A ComfyUI ``BaseModel`` (eps, SD1.x discrete schedule) around an uninitialised narrow UNet."""
    mc = model_config()
    mc.set_inference_dtype(dtype, None)
    return mc.get_model({}, "", device=torch.device(device))


def init_unet(unet: torch.nn.Module, seed: int) -> None:
    """comfy's ops leave weights ``torch.empty``: a seeded standard init (zeroed output convs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(unet.named_parameters()):
            if p.ndim == 1:
                p.zero_()
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        # Every normalisation layer starts as the identity transform (GroupNorm in ResBlocks and the
        # output head, LayerNorm in the transformers): a zero scale would cut the network off.
        for m in unet.modules():
            if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
        # Residual branches start near identity: zero the last conv of every ResBlock and the output
        # projection of every transformer, as diffusion UNets are usually initialised.
        for name, m in unet.named_modules():
            if name.endswith("out_layers.3") or name.endswith("proj_out"):
                for p in m.parameters():
                    p.zero_()
        for p in unet.out[-1].parameters():
            p.zero_()
