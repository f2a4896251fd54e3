"""``DM_ExtractFeatures`` ("Extract Diffusion Features").

Two roles in one node, so saved workflows never need a second node type:

* **configuration** (always): output 0 is a ``DM_FEATURES`` :class:`~.config.FeatureConfig`
  (decoder layers, PCA dim, descriptor grid) for ``DM_AMAPatch``;
* **inspector** (when ``model`` and ``latent_a`` are connected): runs the UNet once on each
  noised latent, builds the co-PCA descriptor exactly like the matching does, and shows its
  first three principal components as colours, jointly projected so that the same semantics get
  the same colours in both images (paper Fig. 6).

The widget order (layers, pca_dim, grid, noise_percent, seed) is a public contract.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .config import FeatureConfig
from .host import require_node_api
from .types import CATEGORY, DMFeatures, inspector_noise_inputs

io = require_node_api().io
log = logging.getLogger("dreammatcher")

#: Accepted descriptor grids (FeatureConfig.grid). Only the official behaviour for now.
GRIDS = ["finest"]


def parse_layers(text: str) -> tuple[int, ...] | None:
    """Parse "5,8" / "5 8" into output-block ids; empty means "the layout's default".

    Raises ``ValueError`` with the expected syntax when the text is not a list of block ids.
    """
    parts = [p for p in text.replace(";", ",").replace(" ", ",").split(",") if p.strip()]
    if not parts:
        return None
    try:
        layers = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"layers must be decoder output-block ids separated by commas, e.g. '5,8' (SD1.5 default), "
            f"or empty for the model's default; got '{text}'."
        ) from None
    bad = [x for x in layers if not 0 <= x <= 10]
    if bad:
        raise ValueError(
            f"layers {bad} are out of range: use output-block ids 0-10 (block 11's output is the UNet's "
            f"last feature map and is not available); got '{text}'."
        )
    return tuple(sorted(set(layers)))


def feature_config(layers: str = "", pca_dim: int = 256, grid: str = "finest") -> FeatureConfig:
    """The ``DM_FEATURES`` object for these widget values."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}; got '{grid}'.")
    return FeatureConfig(layers=parse_layers(layers), pca_dim=int(pca_dim), grid=grid)


def blank_image(size: int = 64) -> torch.Tensor:
    """A black IMAGE for inspector outputs when the node is used for configuration only."""
    return torch.zeros(1, size, size, 3)


# ---------------------------------------------------------------------------- inspector helpers
#: Latent -> pixel factor of SD-family VAEs; inspector views of latents are upscaled by it.
PIXELS_PER_LATENT = 8


def feature_layers(model, config: FeatureConfig) -> tuple[int, ...]:
    """The configured decoder blocks, or the AMA patch's default for this model's layout."""
    from . import ama_runtime, host

    return tuple(config.layers or ama_runtime.default_feature_layers(host.unet_layout(model)))


def _joint_pca(groups: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    """One PCA fitted on the pixels of every ``[B, C, h, w]`` group together (sizes may differ).

    WHY joint: projecting all images on the same basis gives the same semantics the same
    coordinates, so colours (or matches) are comparable across images (method.md §2.2 co-PCA).
    """
    from ..dreammatcher_core import features as core_features

    flat = [g.float().permute(1, 0, 2, 3).reshape(g.shape[1], 1, -1) for g in groups]
    a = flat[0]
    b = torch.cat(flat[1:], -1) if len(flat) > 1 else flat[0]
    pa, pb = core_features.co_pca(a, b, dim)
    parts = [pa]
    if len(flat) > 1:
        parts.extend(torch.split(pb, [f.shape[-1] for f in flat[1:]], dim=-1))
    return [p.reshape(p.shape[0], g.shape[0], g.shape[2], g.shape[3]).permute(1, 0, 2, 3)
            for p, g in zip(parts, groups, strict=True)]


def joint_descriptors(groups: list[dict[int, torch.Tensor]], layers: tuple[int, ...],
                      pca_dim: int) -> list[torch.Tensor]:
    """The matching descriptor of several images at once: per-layer joint PCA, bilinear resize
    (align_corners=True) to each image's finest layer grid, finest layer first, L2 per pixel.
    Same recipe as the AMA descriptor (``ama_runtime.describe``), generalised to N images."""
    per_layer = {k: _joint_pca([g[k] for g in groups], pca_dim) for k in layers}
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
    from ..dreammatcher_core import viz

    return viz.features_to_rgb(descs)


def upscale_view(img: torch.Tensor, factor: int = PIXELS_PER_LATENT) -> torch.Tensor:
    """Nearest-neighbour upscaling of an IMAGE ``[B, H, W, C]`` (latent grid -> pixel grid)."""
    return F.interpolate(img.permute(0, 3, 1, 2), scale_factor=factor, mode="nearest").permute(0, 2, 3, 1)


def feature_images(model, config: FeatureConfig, latent_a: dict, latent_b: dict | None, conditioning,
                   noise_percent: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inspector: ``(pca_a, pca_b)`` IMAGEs of the descriptors of one or two latents (Fig. 6)."""
    from . import host

    layers = feature_layers(model, config)
    groups = []
    for lat in (latent_a, latent_b):
        if lat is None:
            continue
        host.throw_if_interrupted()
        feats, _ = host.inspector_pass(model, lat["samples"], conditioning, layers=layers,
                                       noise_percent=noise_percent, seed=seed)
        groups.append(feats)
    descs = joint_descriptors(groups, layers, config.pca_dim)
    images = [upscale_view(x) for x in pca_rgb(descs)]
    return images[0], images[-1]


class ExtractFeatures(io.ComfyNode):
    """Configure (and optionally visualise) the diffusion features used for semantic matching."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_ExtractFeatures",
            display_name="Extract Diffusion Features",
            category=CATEGORY,
            description=(
                "Chooses the UNet decoder features DreamMatcher matches on. Connect 'features' to "
                "DM_AMAPatch / DM_SemanticMatch. Optionally connect a model and one or two latents to SEE "
                "the features: the first three principal components, coloured consistently across both "
                "images (same colour = same semantics)."
            ),
            inputs=[
                io.String.Input(
                    "layers", default="",
                    tooltip=("Decoder output blocks whose outputs build the descriptor, e.g. '5,8' (SD1.5 "
                             "official: 32x32 and 64x64 at 512px). Empty = the model's default "
                             "(SD1.5: 5,8)."),
                ),
                io.Int.Input(
                    "pca_dim", default=256, min=3, max=2048, step=1,
                    tooltip=("Dimensions kept per layer by the joint (reference+target) PCA. Official: 256 "
                             "per layer, 512 in total. Lower is faster and smoother, higher is sharper."),
                ),
                io.Combo.Input(
                    "grid", options=GRIDS, default="finest",
                    tooltip="Resolution of the descriptor: 'finest' resizes all layers to the finest chosen "
                            "layer's grid (official).",
                ),
                io.Model.Input(
                    "model", optional=True,
                    tooltip="Inspector only: the model whose features to show.",
                ),
                io.Latent.Input(
                    "latent_a", optional=True,
                    tooltip="Inspector only: first image (e.g. the reference), as a LATENT (VAEEncode).",
                ),
                io.Latent.Input(
                    "latent_b", optional=True,
                    tooltip="Inspector only: optional second image (e.g. a generated target); its colours "
                            "are comparable with latent_a's.",
                ),
                io.Conditioning.Input(
                    "conditioning", optional=True,
                    tooltip="Inspector only: prompt for the feature pass (default: an all-zero prompt).",
                ),
                *inspector_noise_inputs(),
            ],
            outputs=[
                DMFeatures.Output("features",
                                  tooltip="Feature configuration for DM_AMAPatch / DM_SemanticMatch."),
                io.Image.Output("pca_a", tooltip="Inspector: first 3 principal components of latent_a."),
                io.Image.Output("pca_b", tooltip="Inspector: the same projection applied to latent_b."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, layers: str = "", pca_dim: int = 256, grid: str = "finest", model=None,
                latent_a=None, latent_b=None, conditioning=None, noise_percent: float = 0.25,
                seed: int = 0) -> io.NodeOutput:
        config = feature_config(layers, pca_dim, grid)
        if model is None or latent_a is None:
            if model is not None or latent_a is not None or latent_b is not None:
                raise ValueError(
                    "To inspect features, connect both 'model' and 'latent_a' (latent_b is optional); "
                    "for configuration only, disconnect them."
                )
            blank = blank_image()
            return io.NodeOutput(config, blank, blank)
        pca_a, pca_b = feature_images(
            model, config, latent_a, latent_b, conditioning, noise_percent, seed
        )
        api = require_node_api()
        previews = [pca_a] if latent_b is None else [pca_a, pca_b]
        ui = {"images": [r for img in previews for r in api.ui.PreviewImage(img, cls=cls).values]}
        return io.NodeOutput(config, pca_a, pca_b, ui=ui)


NODES = [ExtractFeatures]
