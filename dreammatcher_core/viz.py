"""Debug visualisations as ComfyUI IMAGE tensors (``[B, H, W, 3]``, float32 in [0, 1]).

* :func:`flow_to_rgb`: colour wheel (hue = direction, saturation = magnitude, value = 1), so a zero flow
  is **white**; the magnitude is normalised by ``max_magnitude`` (default: the largest in the batch).
* :func:`features_to_rgb`: the first 3 principal components of *all* given feature maps fitted jointly,
  so the same feature gets the same colour in every map (e.g. ref and tgt descriptors side by side).
* :func:`mask_to_rgb` and :func:`overlay`: masks/confidence as grey images or tinted over an image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .features import pca_basis

__all__ = ["flow_to_rgb", "features_to_rgb", "mask_to_rgb", "overlay"]


def _hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """Vectorised HSV -> RGB; ``h`` in [0, 1), ``s, v`` in [0, 1]; returns ``[..., 3]``."""
    h6 = (h % 1.0) * 6.0
    c = v * s
    x = c * (1.0 - torch.abs(h6 % 2.0 - 1.0))
    m = v - c
    zero = torch.zeros_like(c)
    sector = torch.floor(h6).long().clamp(0, 5)
    r = torch.stack([c, x, zero, zero, x, c], dim=-1)
    g = torch.stack([x, c, c, x, zero, zero], dim=-1)
    b = torch.stack([zero, zero, x, c, c, x], dim=-1)
    idx = sector.unsqueeze(-1)
    rgb = torch.cat([r.gather(-1, idx), g.gather(-1, idx), b.gather(-1, idx)], dim=-1)
    return rgb + m.unsqueeze(-1)


def flow_to_rgb(flow: Tensor, max_magnitude: float | None = None) -> Tensor:
    """Flow ``[B,2,H,W]`` -> ``[B,H,W,3]``: hue = ``atan2(dy, dx)``, saturation = ``|flow| / max_magnitude``.

    A zero flow (or an all-zero batch) is white ``(1, 1, 1)``; magnitudes above ``max_magnitude`` saturate.
    """
    if flow.dim() != 4 or flow.shape[1] != 2:
        raise ValueError(f"flow must be [B,2,H,W], got {tuple(flow.shape)}")
    f = flow.detach().to(torch.float32)
    dx, dy = f[:, 0], f[:, 1]
    mag = torch.sqrt(dx * dx + dy * dy)
    top = float(mag.max()) if max_magnitude is None else float(max_magnitude)
    sat = (mag / top).clamp(0.0, 1.0) if top > 0 else torch.zeros_like(mag)
    hue = (torch.atan2(dy, dx) / (2.0 * math.pi)) % 1.0
    return _hsv_to_rgb(hue, sat, torch.ones_like(mag)).clamp(0.0, 1.0)


def features_to_rgb(feats: Sequence[Tensor]) -> list[Tensor]:
    """First 3 joint principal components of feature maps ``[B_i, C, H_i, W_i]`` -> ``[B_i, H_i, W_i, 3]``.

    One PCA over every pixel of every map (exact, deterministic, sign-fixed: :func:`pca_basis`) and one
    per-component min-max over all maps, so colours are comparable across maps.  With fewer than 3
    components available the missing channels are 0.5 (grey).
    """
    if not feats:
        raise ValueError("no feature maps given")
    c = feats[0].shape[1]
    if any(f.dim() != 4 or f.shape[1] != c for f in feats):
        raise ValueError("feature maps must be [B,C,H,W] with equal C")
    rows = [f.detach().to(torch.float32).permute(0, 2, 3, 1).reshape(-1, c) for f in feats]
    allrows = torch.cat(rows, dim=0)
    mean, comps, _ = pca_basis(allrows, 3)
    proj = (allrows - mean) @ comps
    lo, hi = proj.amin(dim=0), proj.amax(dim=0)
    proj = (proj - lo) / (hi - lo).clamp_min(1e-12)
    if proj.shape[1] < 3:
        proj = torch.cat([proj, torch.full((proj.shape[0], 3 - proj.shape[1]), 0.5)], dim=1)
    out, start = [], 0
    for f in feats:
        n = f.shape[0] * f.shape[2] * f.shape[3]
        out.append(proj[start : start + n].reshape(f.shape[0], f.shape[2], f.shape[3], 3).clamp(0.0, 1.0))
        start += n
    return out


def mask_to_rgb(mask: Tensor, size: tuple[int, int] | None = None) -> Tensor:
    """Mask/confidence ``[B,1,h,w]`` in [0,1] -> grey ``[B,H,W,3]`` (nearest resize to ``size``)."""
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B,1,H,W], got {tuple(mask.shape)}")
    m = mask.detach().to(torch.float32).clamp(0.0, 1.0)
    if size is not None and tuple(m.shape[-2:]) != tuple(size):
        m = F.interpolate(m, size=tuple(size), mode="nearest")
    return m.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous()


def overlay(
    image: Tensor, mask: Tensor, color: tuple[float, float, float] = (1.0, 0.0, 0.0), alpha: float = 0.5
) -> Tensor:
    """Tint ``image [B,H,W,3]`` by ``color`` where ``mask [B|1,1,h,w]`` is high.

    ``out = img + alpha * m * (color - img)``.

    The mask is resized bilinearly to the image (a smooth overlay for low-resolution attention masks).
    """
    if image.dim() != 4 or image.shape[-1] != 3:
        raise ValueError(f"image must be [B,H,W,3], got {tuple(image.shape)}")
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B,1,H,W], got {tuple(mask.shape)}")
    img = image.detach().to(torch.float32)
    m = mask.detach().to(device=img.device, dtype=torch.float32).clamp(0.0, 1.0)
    if tuple(m.shape[-2:]) != tuple(img.shape[1:3]):
        m = F.interpolate(m, size=tuple(img.shape[1:3]), mode="bilinear", align_corners=False)
    m = m.permute(0, 2, 3, 1)
    col = torch.tensor(color, dtype=torch.float32, device=img.device)
    return (img + float(alpha) * m * (col - img)).clamp(0.0, 1.0)
