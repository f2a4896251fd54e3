"""``DM_SemanticMatch`` ("Semantic Match").

Two roles in one node, so saved workflows never need a second node type:

* **configuration** (always): output 0 is a ``DM_MATCH`` :class:`~.config.MatchConfig` for
  ``DM_AMAPatch``: the cycle-consistency λc, the mask mode and the subject, resolved to token
  positions of the *target* prompt through the CLIP tokenizer (:mod:`.subject`), plus an optional
  user MASK that overrides the automatic foreground mask;
* **inspector** (when ``model``, ``reference`` and ``target`` are connected): computes the
  correspondence exactly as the AMA patch does and returns the warped reference, the confidence,
  the foreground mask, a flow colour wheel and the gated composite (paper Fig. 7), and sends the
  correspondence to the web extension through the node's ``ui`` payload.

The widget order (lambda_c, mask_mode, subject, target_prompt, noise_percent, seed) is a public
contract; inspector sockets come after the configuration inputs.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .config import MASK_MODES, FeatureConfig, match_config
from .host import require_node_api
from .inspector import blank_image
from .inspector_match import (
    flow_to_rgb,
    inspect_correspondence,
    inspector_payload,
    resize_map,
    samples_and_view,
    warp_view,
)
from .sockets import CATEGORY, DMFeatures, DMMatch, inspector_noise_inputs

io = require_node_api().io
log = logging.getLogger("dreammatcher")


class SemanticMatch(io.ComfyNode):
    """Configure (and optionally inspect) the semantic correspondence that drives AMA."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_SemanticMatch",
            display_name="Semantic Match",
            category=CATEGORY,
            description=(
                "How DreamMatcher trusts its correspondence: the cycle-consistency threshold, the subject "
                "whose cross-attention forms the foreground mask, and the mask mode. Connect 'match' to "
                "DM_AMAPatch. Optionally connect a model and two latents to SEE the correspondence: the "
                "warped reference, confidence, foreground mask, flow and gated composite."
            ),
            inputs=[
                io.Float.Input(
                    "lambda_c", default=0.4, min=0.0, max=4.0, step=0.01,
                    tooltip=("Cycle-consistency tolerance (paper λc, official 0.4): a match is trusted when "
                             "going target→reference→target lands within λc × mask share × width pixels. "
                             "Higher trusts more matches."),
                ),
                io.Combo.Input(
                    "mask_mode", options=MASK_MODES, default="soft",
                    tooltip=("Foreground mask from the subject's cross-attention: 'soft' (official, "
                             "min-max normalised), 'binary' (soft > 0.5) or 'none' (whole image)."),
                ),
                io.String.Input(
                    "subject", default="",
                    tooltip=("The subject's words as they appear in the TARGET prompt, e.g. 'sks dog' or "
                             "'dog' (official: the class word), or 'embedding:my_cat' for a textual "
                             "inversion. Needs 'clip' and 'target_prompt'."),
                ),
                io.Clip.Input(
                    "clip", optional=True,
                    tooltip="The CLIP that encodes the target prompt; used to find the subject's tokens.",
                ),
                io.String.Input(
                    "target_prompt", default="", multiline=True, optional=True,
                    tooltip=("The target's positive prompt text, exactly as given to CLIPTextEncode (link "
                             "the same String node to both to keep them in sync)."),
                ),
                io.Mask.Input(
                    "subject_mask", optional=True,
                    tooltip="Optional MASK of the subject in the target; overrides the automatic "
                            "cross-attention mask.",
                ),
                io.Model.Input("model", optional=True, tooltip="Inspector only: the model to match with."),
                io.Latent.Input(
                    "reference", optional=True,
                    tooltip="Inspector only: the reference image as a LATENT (or use reference_image + vae).",
                ),
                io.Latent.Input(
                    "target", optional=True,
                    tooltip="Inspector only: the target image as a LATENT (or use target_image + vae).",
                ),
                DMFeatures.Input(
                    "features", optional=True,
                    tooltip="Inspector only: feature configuration from DM_ExtractFeatures (default: the "
                            "model's default layers, PCA 256).",
                ),
                io.Conditioning.Input(
                    "conditioning", optional=True,
                    tooltip="Inspector only: the target's positive conditioning, needed for the automatic "
                            "foreground mask (default: an all-zero prompt, no mask).",
                ),
                io.Vae.Input(
                    "vae", optional=True,
                    tooltip="Inspector only: decodes latents (or encodes images) for full-resolution views; "
                            "without it the views use a fast latent colour preview.",
                ),
                io.Image.Input(
                    "reference_image", optional=True,
                    tooltip="Inspector only: the reference as an IMAGE (encoded with 'vae' if 'reference' "
                            "is not connected).",
                ),
                io.Image.Input(
                    "target_image", optional=True,
                    tooltip="Inspector only: the target as an IMAGE (encoded with 'vae' if 'target' is not "
                            "connected).",
                ),
                *inspector_noise_inputs(),
            ],
            outputs=[
                DMMatch.Output("match", tooltip="Matching configuration for DM_AMAPatch."),
                io.Image.Output("warped_reference", tooltip="Inspector: reference warped onto the target."),
                io.Mask.Output("confidence", tooltip="Inspector: 1 where the match is cycle-consistent."),
                io.Mask.Output("foreground", tooltip="Inspector: the subject's soft foreground mask."),
                io.Image.Output("flow", tooltip="Inspector: target→reference flow as a colour wheel "
                                                "(hue = direction, saturation = length; white = no motion)."),
                io.Image.Output("composite", tooltip="Inspector: warped reference where the gate "
                                                     "(mask × confidence) is high, target elsewhere."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lambda_c: float = 0.4, mask_mode: str = "soft", subject: str = "", clip=None,
                target_prompt: str = "", subject_mask=None, model=None, reference=None, target=None,
                features=None, conditioning=None, vae=None, reference_image=None, target_image=None,
                noise_percent: float = 0.25, seed: int = 0) -> io.NodeOutput:
        config = match_config(lambda_c, mask_mode, subject, clip, target_prompt, subject_mask)
        inspector_inputs = (model, reference, target, reference_image, target_image)
        wants_inspector = any(x is not None for x in inspector_inputs)
        if not wants_inspector:
            blank = blank_image()
            empty = blank[..., 0]
            return io.NodeOutput(config, blank, empty, empty, blank, blank)
        if model is None:
            raise ValueError("To inspect a match, connect 'model' (and 'reference' / 'target'); for "
                             "configuration only, disconnect the inspector inputs.")
        ref_samples, ref_view = samples_and_view(model, reference, reference_image, vae, "reference")
        tgt_samples, tgt_view = samples_and_view(model, target, target_image, vae, "target")
        insp = inspect_correspondence(model, config, features or FeatureConfig(), ref_samples, tgt_samples,
                                      conditioning, noise_percent, seed)
        hw = tuple(tgt_view.shape[1:3])
        b = tgt_view.shape[0]
        ref_grid = tuple(insp.flow_r2t.shape[-2:])
        warped = torch.cat([warp_view(ref_view[:1], insp.flow_t2r[i:i + 1], ref_grid, hw) for i in range(b)])
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
        log.debug("DreamMatcher Semantic Match inspector: %s", figures)
        api = require_node_api()
        ref_file = api.ui.PreviewImage(ref_view[:1], cls=cls).values[0]
        tgt_file = api.ui.PreviewImage(tgt_view[:1], cls=cls).values[0]
        ui = {
            "images": api.ui.PreviewImage(composite, cls=cls).values,
            "dm_match": [inspector_payload(insp, ref_file, tgt_file)],
            "text": [", ".join(f"{k.replace('_', ' ')} {v:.1%}" for k, v in figures.items())],
        }
        return io.NodeOutput(config, warped, conf, fg, flow, composite, ui=ui)
