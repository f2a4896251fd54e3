"""The Semantic Match inspector (paper Fig. 7): the correspondence the AMA patch would use for two
images, outside sampling, and the views of it (warped reference, confidence, mask, flow, composite,
and the hover payload of the web extension).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dreammatcher_core import matching as core_matching
from ..dreammatcher_core import viz as core_viz
from . import layout
from .ama.correspond import descriptor
from .ama.settings import auto_mask
from .capture import subject_mask, user_mask
from .config import FeatureConfig, MatchConfig
from .host import model as host_model
from .host import sampling
from .inspector import feature_layers, inspector_pass, upscale_view


def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """Colour wheel of a flow ``[B, 2, H, W]`` -> IMAGE ``[B, H, W, 3]`` (the core's ``viz.flow_to_rgb``).

    Hue is the direction, saturation the length relative to half the larger grid side (fixed, so
    colours are comparable between runs); zero flow is white.
    """
    return core_viz.flow_to_rgb(flow, max_magnitude=max(flow.shape[-2:]) / 2)


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


def resize_map(m: torch.Tensor, hw: tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """``[B, 1, h, w]`` -> ``[B, H, W]`` (MASK) at ``hw``."""
    if mode == "nearest":
        return F.interpolate(m.float(), size=hw, mode="nearest")[:, 0]
    return F.interpolate(m.float(), size=hw, mode=mode, align_corners=False)[:, 0]


def samples_and_view(model, latent, image, vae, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE-space latent samples and an IMAGE to show for one side of the correspondence."""
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
        view = upscale_view(host_model.latent_rgb_preview(model, samples.cpu()))
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


def inspect_correspondence(model, config: MatchConfig, features: FeatureConfig, ref_samples: torch.Tensor,
                           tgt_samples: torch.Tensor, conditioning, noise_percent: float,
                           seed: int) -> Inspection:
    """The correspondence the AMA patch would compute for these two images, outside sampling.

    Same descriptor (``ama.correspond.descriptor``), flows, cycle error, mask rule
    (``capture.subject_mask`` / ``capture.user_mask``) and confidence as the AMA run; the features
    come from one UNet pass per image at ``noise_percent``.
    """
    layers = feature_layers(model, features)
    unet = host_model.unet_layout(model)
    auto = auto_mask(config.mask, config.mask_mode, config.subject_tokens)
    if auto and not conditioning:
        raise ValueError(
            f"The foreground mask of subject '{config.subject}' comes from the target prompt's "
            "cross-attention: connect the target's positive CONDITIONING to 'conditioning' (or set "
            "mask_mode to 'none', or connect a subject_mask)."
        )
    blocks = ()
    if auto:
        blocks = layout.mask_blocks(unet, layout.ama_blocks(unet, layout.PRESETS[0], ""))
    sampling.throw_if_interrupted()
    ref_feats, _ = inspector_pass(model, ref_samples[:1], conditioning, layers=layers,
                                  noise_percent=noise_percent, seed=seed)
    sampling.throw_if_interrupted()
    tgt_feats, token_map = inspector_pass(model, tgt_samples, conditioning, layers=layers,
                                          noise_percent=noise_percent, seed=seed,
                                          tokens=config.subject_tokens if auto else (), mask_blocks=blocks)
    flows_t, flows_r, errs, masks, confs = [], [], [], [], []
    for r in range(tgt_samples.shape[0]):
        sampling.throw_if_interrupted()
        dt, dr = descriptor([tgt_feats[k][r:r + 1] for k in layers], [ref_feats[k] for k in layers],
                            features.pca_dim, pca_solver=features.pca_solver)
        f_t2r, f_r2t = core_matching.argmax_flows(dt.float(), dr.float())
        err = core_matching.cycle_error(f_t2r, f_r2t)
        hw = tuple(dt.shape[-2:])
        if config.mask is not None:
            mask = user_mask(config.mask.tensor, r, hw)
        elif auto and token_map is not None:
            mask = subject_mask(token_map[r:r + 1], config.mask_mode, hw)
        else:
            mask = torch.ones(1, 1, *hw)
        conf = core_matching.confidence(err, mask.to(err.dtype), config.lambda_c)
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
