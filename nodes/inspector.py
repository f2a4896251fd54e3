"""The inspectors' UNet pass and the feature views (paper Fig. 6).

One UNet call on a noised latent, outside sampling, capturing decoder features (``capture.FeatureTap``)
and the subject's cross-attention (:class:`TokenAttnTap`), through ComfyUI's own ``sample_custom`` so
model loading, LoRAs, patches, wrappers and SDXL's extra conds all apply. The correspondence views
(paper Fig. 7) are in :mod:`.inspector_match`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dreammatcher_core import features as core_features
from ..dreammatcher_core import masks as core_masks
from ..dreammatcher_core import viz as core_viz
from . import layout
from .capture import FeatureTap, subject_token_map
from .config import FeatureConfig
from .host import hooks, sampling
from .host import model as host_model


class TokenAttnTap:
    """attn2 replace that records the cross-attention probability of chosen context tokens.

    It delegates the actual attention to the replace another pack installed on that key (or to
    ComfyUI's kernel), so the pass is otherwise unchanged. ``maps`` holds one ``[B, 1, H, W]``
    map (summed over tokens, averaged over heads) per call, for the cond branch only.
    """

    def __init__(self, tokens: tuple[int, ...], previous) -> None:
        self.tokens = tuple(tokens)
        self.previous = previous
        self.maps: list[torch.Tensor] = []

    def __call__(self, q, k, v, extra_options, **kwargs):
        hw = hooks.attention_grid(extra_options, q)
        labels = hooks.chunk_labels(extra_options)
        keep = [t for t in self.tokens if k is not None and t < k.shape[1]]
        if hw is not None and keep and 0 in labels:
            c = labels.index(0)  # the first cond chunk
            qc, kc = hooks.chunks(q, labels)[c][2], hooks.chunks(k, labels)[c][2]
            m = subject_token_map(qc, kc, hooks.heads(extra_options), keep)
            self.maps.append(m.view(qc.shape[0], 1, *hw).detach().cpu())
        if self.previous is not None:
            return self.previous(q, k, v, extra_options, **kwargs)
        return hooks.call_attention(q, k, v, extra_options)

    def __deepcopy__(self, memo: dict) -> TokenAttnTap:
        return self


def inspector_pass(model_patcher, samples: torch.Tensor, conditioning: list | None, *,
                   layers: tuple[int, ...], noise_percent: float, seed: int, tokens: tuple[int, ...] = (),
                   mask_blocks=()) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """One UNet call (cond only, cfg 1) on ``samples`` (VAE-space LATENT samples) noised to
    ``noise_percent`` with seeded noise.

    Returns ``(features, token_map)``: ``features[k]`` is the output of output block ``k`` as
    float32 ``[B, C, h, w]`` on the CPU; ``token_map`` is the head-mean cross-attention of ``tokens``
    (summed over tokens) averaged over every transformer of ``mask_blocks`` (``AttnBlock``s, the
    AMA patch's choice), ``[B, 1, h, w]`` (``None`` without tokens).
    The input MODEL is not modified (patches go on a clone).
    """
    model = model_patcher.clone()
    tap = FeatureTap(tuple(layers))
    hooks.add_output_block_patch(model, tap)
    token_taps: list[TokenAttnTap] = []
    if tokens:
        for blk in mask_blocks:
            for index in range(blk.depth):
                key3 = (blk.name, blk.id, index)
                t = TokenAttnTap(tokens, hooks.existing_attn_replace(model.model_options, "attn2", key3))
                hooks.set_attn_replace(model, "attn2", key3, t)
                token_taps.append(t)

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return x

    sigmas = torch.tensor([host_model.sigma_at_percent(model, noise_percent), 0.0])
    positive = conditioning if conditioning else host_model.zero_prompt(model)
    sampling.sample_custom(model, sampling.ksampler(one_call), sigmas, positive, positive,
                           {"samples": samples}, seed=int(seed), cfg=1.0, disable_pbar=True)
    got = tap.feats.get(0, {})
    missing = [k for k in layers if k not in got]
    if missing:
        raise ValueError(f"The feature pass produced no output for decoder blocks {missing}.")
    feats = {k: got[k].float().cpu() for k in layers}
    maps = [t_map for t in token_taps for t_map in t.maps]
    return feats, (core_masks.mean_token_map(maps) if maps else None)


def blank_image(size: int = 64) -> torch.Tensor:
    """A black IMAGE for inspector outputs when the node is used for configuration only."""
    return torch.zeros(1, size, size, 3)


# ---------------------------------------------------------------------------- inspector helpers
#: Latent -> pixel factor of SD-family VAEs; inspector views of latents are upscaled by it.
PIXELS_PER_LATENT = 8


def feature_layers(model, config: FeatureConfig) -> tuple[int, ...]:
    """The configured decoder blocks, or the layout's default, validated against this model."""
    return layout.feature_layers(host_model.unet_layout(model), config.layers)


def _joint_pca(groups: list[torch.Tensor], dim: int, solver: str = "exact") -> list[torch.Tensor]:
    """One PCA fitted on the pixels of every ``[B, C, h, w]`` group together (sizes may differ).

    WHY joint: projecting all images on the same basis gives the same semantics the same
    coordinates, so colours (or matches) are comparable across images (the co-PCA idea).
    """
    flat = [g.float().permute(1, 0, 2, 3).reshape(g.shape[1], 1, -1) for g in groups]
    a = flat[0]
    b = torch.cat(flat[1:], -1) if len(flat) > 1 else flat[0]
    pa, pb = core_features.co_pca(a, b, dim, solver=solver)
    parts = [pa]
    if len(flat) > 1:
        parts.extend(torch.split(pb, [f.shape[-1] for f in flat[1:]], dim=-1))
    return [p.reshape(p.shape[0], g.shape[0], g.shape[2], g.shape[3]).permute(1, 0, 2, 3)
            for p, g in zip(parts, groups, strict=True)]


def joint_descriptors(groups: list[dict[int, torch.Tensor]], layers: tuple[int, ...],
                      pca_dim: int, pca_solver: str = "exact") -> list[torch.Tensor]:
    """A descriptor of several images at once, for showing features (Extract Diffusion Features):
    per-layer joint PCA over all images, then bilinear resize (align_corners=True) to each image's
    finest layer grid, finest layer first, L2 per pixel.

    It differs from the matching descriptor (``ama.correspond.descriptor``, the core's
    ``features.describe``) in two ways, both for display: the PCA is fitted on N images instead of
    one pair, and it runs on each layer's own grid before resizing (the matching descriptor resizes
    first). Colours are therefore comparable across the N images, not bit-equal to what AMA matches."""
    per_layer = {k: _joint_pca([g[k] for g in groups], pca_dim, pca_solver) for k in layers}
    out = []
    for i, g in enumerate(groups):
        hw = max((tuple(g[k].shape[-2:]) for k in layers), key=lambda s: s[0] * s[1])
        order = sorted(layers, key=lambda k: -g[k].shape[-2] * g[k].shape[-1])
        maps = [F.interpolate(per_layer[k][i], size=hw, mode="bilinear", align_corners=True) for k in order]
        out.append(F.normalize(torch.cat(maps, 1), dim=1))
    return out


def pca_rgb(descs: list[torch.Tensor]) -> list[torch.Tensor]:
    """First three principal components of descriptors ``[B, D, H, W]`` as IMAGEs ``[B, H, W, 3]``,
    jointly projected and scaled (the core's ``viz.features_to_rgb``): equal colours, equal semantics."""
    return core_viz.features_to_rgb(descs)


def upscale_view(img: torch.Tensor, factor: int = PIXELS_PER_LATENT) -> torch.Tensor:
    """Nearest-neighbour upscaling of an IMAGE ``[B, H, W, C]`` (latent grid -> pixel grid)."""
    return F.interpolate(img.permute(0, 3, 1, 2), scale_factor=factor, mode="nearest").permute(0, 2, 3, 1)


def feature_images(model, config: FeatureConfig, latent_a: dict, latent_b: dict | None, conditioning,
                   noise_percent: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inspector: ``(pca_a, pca_b)`` IMAGEs of the descriptors of one or two latents (Fig. 6)."""
    layers = feature_layers(model, config)
    groups = []
    for lat in (latent_a, latent_b):
        if lat is None:
            continue
        sampling.throw_if_interrupted()
        feats, _ = inspector_pass(model, lat["samples"], conditioning, layers=layers,
                                       noise_percent=noise_percent, seed=seed)
        groups.append(feats)
    descs = joint_descriptors(groups, layers, config.pca_dim, config.pca_solver)
    images = [upscale_view(x) for x in pca_rgb(descs)]
    return images[0], images[-1]
