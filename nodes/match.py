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
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from .config import FeatureConfig, MatchConfig
from .features import blank_image, feature_layers, upscale_view
from .host import require_node_api
from .subject import resolve_subject
from .types import CATEGORY, DMFeatures, DMMatch, inspector_noise_inputs

io = require_node_api().io
log = logging.getLogger("dreammatcher")

MASK_MODES = ["soft", "binary", "none"]


class MaskOverride:
    """A user MASK carried inside a ``MatchConfig``.

    ``__deepcopy__`` returns ``self`` so that ``ModelPatcher.clone()`` (which deep-copies
    ``model_options``) never copies the tensor; equality is identity.
    """

    def __init__(self, mask) -> None:
        #: ``[B, H, W]`` float in 0..1 (ComfyUI MASK), on the CPU.
        self.tensor = mask.detach().float().cpu()
        if self.tensor.ndim == 2:
            self.tensor = self.tensor[None]

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"MaskOverride({tuple(self.tensor.shape)})"


def match_config(lambda_c: float = 0.4, mask_mode: str = "soft", subject: str = "", clip=None,
                 target_prompt: str = "", subject_mask=None) -> MatchConfig:
    """The ``DM_MATCH`` object for these inputs; resolves the subject through ``clip``."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode must be one of {MASK_MODES}; got '{mask_mode}'.")
    tokens: tuple[int, ...] = ()
    # With mask_mode "none" and no CLIP there is nothing to resolve; do not make users connect one.
    if subject.strip() and (mask_mode != "none" or clip is not None):
        if subject_mask is None or clip is not None:
            tokens = resolve_subject(clip, target_prompt, subject)
    config = MatchConfig(lambda_c=float(lambda_c), mask_mode=mask_mode, subject=subject.strip(),
                         subject_tokens=tokens)
    extra = {"target_prompt": target_prompt}
    if subject_mask is not None:
        extra["mask"] = MaskOverride(subject_mask)
    return replace(config, **extra)


# ---------------------------------------------------------------------------- inspector helpers
def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """Colour wheel of a flow ``[B, 2, H, W]`` -> IMAGE ``[B, H, W, 3]`` (the core's ``viz.flow_to_rgb``).

    Hue is the direction, saturation the length relative to half the larger grid side (fixed, so
    colours are comparable between runs); zero flow is white.
    """
    from ..dreammatcher_core import viz

    return viz.flow_to_rgb(flow, max_magnitude=max(flow.shape[-2:]) / 2)


def warp_view(ref_view: torch.Tensor, flow: torch.Tensor, ref_grid: tuple[int, int],
              out_hw: tuple[int, int]) -> torch.Tensor:
    """Warp a reference IMAGE ``[1, Hr, Wr, 3]`` onto a target of ``out_hw`` pixels along a
    cell-level flow ``[1, 2, ht, wt]`` (target grid -> reference grid ``ref_grid``).

    Each target pixel keeps its offset inside its cell, so every target cell shows the matched
    reference *patch* rather than one colour.
    """
    _, _, ht, wt = flow.shape
    hr, wr = ref_grid
    big_h, big_w = out_hw
    py = (torch.arange(big_h, dtype=torch.float32) + 0.5) * ht / big_h
    px = (torch.arange(big_w, dtype=torch.float32) + 0.5) * wt / big_w
    cy, cx = py.floor().long().clamp(0, ht - 1), px.floor().long().clamp(0, wt - 1)
    fy, fx = py - cy, px - cx
    f = flow[0].float()
    u = (cx[None, :] + f[0][cy][:, cx]) + fx[None, :]
    v = (cy[:, None] + f[1][cy][:, cx]) + fy[:, None]
    grid = torch.stack([u / wr * 2 - 1, v / hr * 2 - 1], -1)[None]
    out = F.grid_sample(ref_view.permute(0, 3, 1, 2).float(), grid, mode="bilinear",
                        padding_mode="border", align_corners=False)
    return out.permute(0, 2, 3, 1)


def _resize_map(m: torch.Tensor, hw: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """``[B, 1, h, w]`` -> ``[B, H, W]`` (MASK) at ``hw``."""
    if mode == "nearest":
        return F.interpolate(m.float(), size=hw, mode="nearest")[:, 0]
    return F.interpolate(m.float(), size=hw, mode=mode, align_corners=False)[:, 0]


def _samples_and_view(model, latent, image, vae, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE-space latent samples and an IMAGE to show for one side of the match."""
    from . import host

    if latent is None and image is None:
        raise ValueError(f"To inspect a match, connect '{what}' (a LATENT) or '{what}_image' (with 'vae').")
    if latent is not None:
        samples = latent["samples"]
    elif vae is None:
        raise ValueError(f"'{what}_image' needs a VAE to be encoded: connect 'vae', or connect a LATENT to "
                         f"'{what}'.")
    else:
        samples = vae.encode(image[..., :3])
    if image is not None:
        view = image[..., :3].float().cpu()
    elif vae is not None:
        view = vae.decode(samples)[..., :3].float().cpu()
    else:
        view = upscale_view(host.latent_rgb_preview(model, samples.cpu()))
    return samples, view


@dataclass(eq=False)
class Inspection:
    """Everything the standalone Semantic Match computes, at the descriptor grid (row 0 of the
    reference; one entry per target row)."""

    flow_t2r: torch.Tensor  # [B, 2, ht, wt]
    flow_r2t: torch.Tensor  # [B, 2, hr, wr]
    cycle_err: torch.Tensor  # [B, 1, ht, wt]
    mask: torch.Tensor  # [B, 1, ht, wt]
    confidence: torch.Tensor  # [B, 1, ht, wt]


def inspect_match(model, config: MatchConfig, features: FeatureConfig, ref_samples: torch.Tensor,
                  tgt_samples: torch.Tensor, conditioning, noise_percent: float, seed: int) -> Inspection:
    """The correspondence the AMA patch would compute for these two images, outside sampling.

    Same descriptor (``ama_runtime.describe``), flows, cycle error, mask rule and confidence as
    ``ama_runtime``; the features come from one UNet pass per image at ``noise_percent``.
    """
    from ..dreammatcher_core import masks as core_masks
    from ..dreammatcher_core import matching as core
    from . import ama_runtime, host

    layers = feature_layers(model, features)
    layout = host.unet_layout(model)
    auto = config.mask is None and config.mask_mode != "none" and bool(config.subject_tokens)
    if auto and not conditioning:
        raise ValueError(
            f"The foreground mask of subject '{config.subject}' comes from the target prompt's "
            "cross-attention: connect the target's positive CONDITIONING to 'conditioning' (or set "
            "mask_mode to 'none', or connect a subject_mask)."
        )
    blocks = ()
    if auto:
        ama = ama_runtime.ama_blocks(layout, ama_runtime.PRESETS[0], "")
        blocks = ama_runtime.mask_blocks(layout, ama)
    host.throw_if_interrupted()
    ref_feats, _ = host.inspector_pass(model, ref_samples[:1], conditioning, layers=layers,
                                       noise_percent=noise_percent, seed=seed)
    host.throw_if_interrupted()
    tgt_feats, token_map = host.inspector_pass(model, tgt_samples, conditioning, layers=layers,
                                               noise_percent=noise_percent, seed=seed,
                                               tokens=config.subject_tokens if auto else (),
                                               mask_blocks=blocks)
    flows_t, flows_r, errs, masks, confs = [], [], [], [], []
    for r in range(tgt_samples.shape[0]):
        host.throw_if_interrupted()
        dt, dr = ama_runtime.describe([tgt_feats[k][r:r + 1] for k in layers], [ref_feats[k] for k in layers],
                                      features.pca_dim)
        f_t2r, f_r2t = core.argmax_flows(dt.float(), dr.float())
        err = core.cycle_error(f_t2r, f_r2t)
        hw = tuple(dt.shape[-2:])
        if config.mask is not None:
            um = config.mask.tensor[r % config.mask.tensor.shape[0]][None, None].float()
            mask = F.interpolate(um, size=hw, mode="bilinear", align_corners=False).clamp(0, 1)
        elif auto and token_map is not None:
            mask = core_masks.minmax_normalise(token_map[r:r + 1])
            if config.mask_mode == "binary":
                mask = (mask > 0.5).float()
            mask = F.interpolate(mask, size=hw, mode="nearest")
        else:
            mask = torch.ones(1, 1, *hw)
        conf = core.confidence(err, mask.to(err.dtype), config.lambda_c)
        flows_t.append(f_t2r)
        flows_r.append(f_r2t)
        errs.append(err)
        masks.append(mask)
        confs.append(conf.float())
    return Inspection(torch.cat(flows_t), torch.cat(flows_r), torch.cat(errs), torch.cat(masks),
                      torch.cat(confs))


def inspector_payload(insp: Inspection, ref_file: dict, tgt_file: dict) -> dict:
    """The ``ui["dm_match"]`` entry the web extension draws (target row 0): file refs of both views
    and, per target cell (row-major), the matched reference cell index, confidence and mask."""
    f = insp.flow_t2r[0]
    ht, wt = f.shape[-2:]
    hr, wr = insp.flow_r2t.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij")
    mx = (xs + f[0].round().long()).clamp(0, wr - 1)
    my = (ys + f[1].round().long()).clamp(0, hr - 1)
    return {
        "reference": ref_file, "target": tgt_file,
        "grid": [int(ht), int(wt)], "ref_grid": [int(hr), int(wr)],
        "match": (my * wr + mx).flatten().tolist(),
        "confidence": insp.confidence[0, 0].flatten().round().int().tolist(),
        "mask": [round(float(x), 3) for x in insp.mask[0, 0].flatten()],
    }


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
        ref_samples, ref_view = _samples_and_view(model, reference, reference_image, vae, "reference")
        tgt_samples, tgt_view = _samples_and_view(model, target, target_image, vae, "target")
        insp = inspect_match(model, config, features or FeatureConfig(), ref_samples, tgt_samples,
                             conditioning, noise_percent, seed)
        hw = tuple(tgt_view.shape[1:3])
        b = tgt_view.shape[0]
        ref_grid = tuple(insp.flow_r2t.shape[-2:])
        warped = torch.cat([warp_view(ref_view[:1], insp.flow_t2r[i:i + 1], ref_grid, hw) for i in range(b)])
        conf = _resize_map(insp.confidence, hw)
        fg = _resize_map(insp.mask, hw)
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


NODES = [SemanticMatch]
