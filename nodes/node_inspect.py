"""``DM_InspectFeatures`` and ``DM_InspectMatch``: the two inspectors as nodes of their own.

They show what DreamMatcher sees, outside sampling: the decoder features as colours (paper
Fig. 6) and the correspondence with its confidence and subject mask (Fig. 7). Each costs a UNet
pass per image, so their seed is a plain number (no "randomize after generate" widget): a
re-queued graph with unchanged inputs reuses the cached result instead of inspecting again.

The functions :func:`feature_views` and :func:`match_views` are also what the all-in-one nodes
``DM_ExtractFeatures`` / ``DM_SemanticMatch`` run when their inspector sockets are connected.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .config import FeatureConfig, MatchConfig
from .host import require_node_api
from .inputs import feature_inspector_inputs, match_inspector_inputs, match_inspector_outputs, noise_inputs
from .inspector import feature_images
from .inspector_match import (
    flow_to_rgb,
    inspect_correspondence,
    inspector_payload,
    resize_map,
    samples_and_view,
    warp_view,
)
from .sockets import CATEGORY, DMFeatures, DMMatch

io = require_node_api().io
log = logging.getLogger("dreammatcher")


def feature_views(cls, model, config: FeatureConfig, latent_a: dict, latent_b: dict | None, conditioning,
                  noise_percent: float, seed: int) -> tuple[tuple, dict]:
    """``((pca_a, pca_b), ui)``: the jointly projected principal components of one or two latents."""
    pca_a, pca_b = feature_images(model, config, latent_a, latent_b, conditioning, noise_percent, seed)
    api = require_node_api()
    previews = [pca_a] if latent_b is None else [pca_a, pca_b]
    ui = {"images": [r for img in previews for r in api.ui.PreviewImage(img, cls=cls).values]}
    return (pca_a, pca_b), ui


def match_views(cls, model, config: MatchConfig, features: FeatureConfig | None, reference, target,
                conditioning, vae, reference_image, target_image, noise_percent: float,
                seed: int) -> tuple[tuple, dict]:
    """``((warped, confidence, foreground, flow, composite), ui)`` for one reference and the targets.

    ``ui`` carries the composite preview, the coverage figures as text and the ``dm_match``
    payload that the web extension draws (hover a target pixel to see its match).
    """
    ref_samples, ref_view = samples_and_view(model, reference, reference_image, vae, "reference")
    tgt_samples, tgt_view = samples_and_view(model, target, target_image, vae, "target")
    insp = inspect_correspondence(model, config, features or FeatureConfig(), ref_samples, tgt_samples,
                                  conditioning, noise_percent, seed)
    hw = tuple(tgt_view.shape[1:3])
    ref_grid = tuple(insp.flow_r2t.shape[-2:])
    warped = torch.cat([warp_view(ref_view[:1], insp.flow_t2r[i:i + 1], ref_grid, hw)
                        for i in range(tgt_view.shape[0])])
    conf = resize_map(insp.confidence, hw)
    fg = resize_map(insp.mask, hw)
    gate = (conf * fg)[..., None]
    composite = tgt_view * (1 - gate) + warped * gate
    flow = F.interpolate(flow_to_rgb(insp.flow_t2r).permute(0, 3, 1, 2), size=hw,
                         mode="nearest").permute(0, 2, 3, 1)
    figures = {
        "confidence_coverage": float(insp.confidence.mean()),
        "mask_area": float(insp.mask.mean()),
        "gate_above_half": float(((insp.confidence * insp.mask) > 0.5).float().mean()),
    }
    log.debug("DreamMatcher match inspector: %s", figures)
    api = require_node_api()
    ref_file = api.ui.PreviewImage(ref_view[:1], cls=cls).values[0]
    tgt_file = api.ui.PreviewImage(tgt_view[:1], cls=cls).values[0]
    ui = {
        "images": api.ui.PreviewImage(composite, cls=cls).values,
        "dm_match": [inspector_payload(insp, ref_file, tgt_file)],
        "text": [", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in figures.items())],
    }
    return (warped, conf, fg, flow, composite), ui


class InspectFeatures(io.ComfyNode):
    """Show the diffusion features DreamMatcher matches on, as colours (paper Fig. 6)."""

    @classmethod
    def define_schema(cls):
        inputs = feature_inspector_inputs("", model_optional=False)
        return io.Schema(
            node_id="DM_InspectFeatures",
            display_name="Inspect Features",
            category=CATEGORY,
            description=(
                "Shows the decoder features DreamMatcher matches on: the first three principal components "
                "of one or two images, projected jointly so that the same colour means the same semantics "
                "in both. Parts of the subject that get the same colour in the reference and the target "
                "are what the correspondence can find. Costs one UNet pass per image."
            ),
            inputs=[
                *inputs[:3],
                DMFeatures.Input("features", optional=True,
                                 tooltip="Feature configuration from Feature Settings (default: the model's "
                                         "default layers, PCA 256)."),
                inputs[3],
                *noise_inputs("", fixed_seed=True),
            ],
            outputs=[
                io.Image.Output("pca_a", tooltip="First 3 principal components of latent_a."),
                io.Image.Output("pca_b", tooltip="The same projection applied to latent_b."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent_a, latent_b=None, features=None, conditioning=None,
                noise_percent: float = 0.25, seed: int = 0) -> io.NodeOutput:
        images, ui = feature_views(cls, model, features or FeatureConfig(), latent_a, latent_b,
                                   conditioning, noise_percent, seed)
        return io.NodeOutput(*images, ui=ui)


class InspectMatch(io.ComfyNode):
    """Show the correspondence, its confidence and the subject mask that gate AMA (paper Fig. 7)."""

    @classmethod
    def define_schema(cls):
        inputs = match_inspector_inputs("", model_optional=False)
        return io.Schema(
            node_id="DM_InspectMatch",
            display_name="Inspect Match",
            category=CATEGORY,
            description=(
                "Computes the correspondence exactly as AMA Model Patch does, for two images outside "
                "sampling, and shows the reference warped onto the target, the cycle-consistency "
                "confidence, the subject's foreground mask, the flow and the gated composite. Hover the "
                "target on the node to see where each pixel matches. Costs one UNet pass per image."
            ),
            inputs=[
                inputs[0],
                DMMatch.Input("match", optional=True,
                              tooltip="Matching settings from Match Settings (subject, λc, mask mode); "
                                      "default: λc 0.4 and no subject, i.e. the whole image counts."),
                *inputs[1:],
                *noise_inputs("", fixed_seed=True),
            ],
            outputs=match_inspector_outputs(),
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, match=None, reference=None, target=None, features=None, conditioning=None,
                vae=None, reference_image=None, target_image=None, noise_percent: float = 0.25,
                seed: int = 0) -> io.NodeOutput:
        images, ui = match_views(cls, model, match or MatchConfig(), features, reference, target,
                                 conditioning, vae, reference_image, target_image, noise_percent, seed)
        return io.NodeOutput(*images, ui=ui)
