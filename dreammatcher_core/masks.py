"""Soft foreground masks from cross-attention maps, and attention-grid geometry (docs/method.md, "Subject
mask").

Geometry.  ComfyUI flattens a UNet attention layer's ``h x w`` feature map to ``h*w`` tokens in
row-major order (token ``y*w + x``).  The UNet reaches lower resolutions with stride-2 3x3 convolutions
with padding 1, whose output size is ``floor((n - 1) / 2) + 1 = ceil(n / 2) = (n + 1) // 2``; the decoder
upsamples back to the skip connection's exact size.  So for a latent of any size and aspect ratio the
grid of an attention layer is the latent size halved with ceiling ``d`` times, and ``d`` is the unique
level whose ``h*w`` equals the layer's sequence length (``h*w`` strictly decreases until ``1x1``).
``sqrt(seq_len)`` is wrong for every non-square latent, and ``latent // 2**d`` is wrong for odd sizes
(e.g. a 912x1144 image: latent 114x143 -> 57x72, not 57x71).

Masks.  The official code averages the head-mean cross-attention probabilities of the five 16x16 layers,
takes the map of the concept token(s) (summing several), min-max normalises it per image and resizes it
with nearest-neighbour interpolation to the layer that uses it.  The mask stays soft (``thres`` is dead
code there, docs/method.md, "Subject mask").  Two deliberate, documented differences:

* the min-max uses ``max(max - min, eps)`` as denominator (the official code divides by zero on a
  constant map).  A constant map therefore becomes all zeros: no evidence of a foreground, so AMA does
  nothing there, which is the safe side;
* layers of different resolutions are allowed (e.g. SDXL): they are averaged on the finest grid among
  them after a bilinear resize; with equal sizes (the official case) this is the plain mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "downsample_hw",
    "attention_hw",
    "latent_hw_for_tokens",
    "token_map",
    "minmax_normalise",
    "foreground_mask",
    "mean_token_map",
    "foreground_from_maps",
    "mask_to_tokens",
    "resize_mask",
]


def downsample_hw(hw: tuple[int, int], levels: int) -> tuple[int, int]:
    """Grid after ``levels`` stride-2, padding-1 convolutions: ceil-halving each side ``levels`` times."""
    h, w = int(hw[0]), int(hw[1])
    if h < 1 or w < 1 or levels < 0:
        raise ValueError(f"invalid grid {hw} or level {levels}")
    for _ in range(levels):
        h, w = (h + 1) // 2, (w + 1) // 2
    return h, w


def attention_hw(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """The ``(h, w)`` grid of an attention layer with ``seq_len`` tokens in a UNet run on ``latent_hw``.

    Raises ``ValueError`` naming the candidate grids if no downsampling level matches.
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"invalid latent size {latent_hw}")
    tried = []
    while True:
        tried.append(f"{h}x{w}={h * w}")
        if h * w == seq_len:
            return h, w
        if h * w < seq_len or (h == 1 and w == 1):
            break
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(
        f"no attention grid of latent {latent_hw[0]}x{latent_hw[1]} has {seq_len} tokens "
        f"(grids: {', '.join(tried)})"
    )


def latent_hw_for_tokens(latent_h: int, latent_w: int, n_tokens: int) -> tuple[int, int]:
    """Same as :func:`attention_hw` with separate arguments: the ``(h, w)`` grid holding ``n_tokens``."""
    return attention_hw((latent_h, latent_w), n_tokens)


def _as_index_list(token_indices: int | Sequence[int], n_tokens: int) -> list[int]:
    idx = [int(token_indices)] if isinstance(token_indices, int) else [int(i) for i in token_indices]
    if not idx:
        raise ValueError("at least one token index is required")
    for i in idx:
        if not -n_tokens <= i < n_tokens:
            raise ValueError(f"token index {i} out of range for {n_tokens} text tokens")
    return idx


def token_map(attn: Tensor, token_indices: int | Sequence[int]) -> Tensor:
    """Head-mean map of the selected text tokens, summed: ``[B, N]`` (float32, or float64 for float64 input).

    ``attn`` is ``[B, heads, N, T]`` (softmax probabilities per head) or ``[B, N, T]`` (already averaged
    over heads).  ComfyUI's ``[B*heads, N, T]`` must be viewed as ``[B, heads, N, T]`` first.
    """
    if attn.dim() == 4:
        a = attn.to(torch.float64 if attn.dtype == torch.float64 else torch.float32).mean(dim=1)
    elif attn.dim() == 3:
        a = attn.to(torch.float64 if attn.dtype == torch.float64 else torch.float32)
    else:
        raise ValueError(f"attention maps must be [B,heads,N,T] or [B,N,T], got {tuple(attn.shape)}")
    idx = _as_index_list(token_indices, a.shape[-1])
    return a[..., idx].sum(dim=-1)


def minmax_normalise(m: Tensor, eps: float = 1e-6) -> Tensor:
    """Per-item min-max normalisation of ``[B, ...]`` to [0, 1]: ``(m - min) / max(max - min, eps)``.

    A constant map gives zeros (never NaN); a map whose range is below ``eps`` keeps its tiny relative
    variations scaled by ``1/eps`` instead of being blown up to full contrast.
    """
    flat = m.reshape(m.shape[0], -1)
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    out = (flat - lo) / (hi - lo).clamp_min(eps)
    return out.reshape(m.shape)


def resize_mask(mask: Tensor, size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """Resize ``[B,1,h,w]`` to ``size``; ``"nearest"`` is the official choice, ``"bilinear"`` is smoother.

    Bilinear uses ``align_corners=False``; both keep values inside [0, 1].
    """
    size = (int(size[0]), int(size[1]))
    if tuple(mask.shape[-2:]) == size:
        return mask
    if mode == "nearest":
        return F.interpolate(mask, size=size, mode="nearest")
    if mode == "bilinear":
        return F.interpolate(mask, size=size, mode="bilinear", align_corners=False)
    raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")


def mean_token_map(maps: Tensor | Sequence[Tensor]) -> Tensor:
    """Mean of per-layer token maps ``[B,1,h_l,w_l]`` on the finest grid among them.

    Maps on other grids are resized there bilinearly first; with equal grids (the official case) this
    is the plain mean.
    """
    maps = [maps] if isinstance(maps, Tensor) else list(maps)
    if not maps:
        raise ValueError("no token maps given")
    batch = {m.shape[0] for m in maps}
    if len(batch) != 1:
        raise ValueError(f"attention maps disagree on batch size: {sorted(batch)}")
    gh, gw = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
    stacked = [
        m
        if tuple(m.shape[-2:]) == (gh, gw)
        else F.interpolate(m, size=(gh, gw), mode="bilinear", align_corners=False)
        for m in maps
    ]
    return torch.stack(stacked, dim=0).mean(dim=0)


def foreground_from_maps(
    maps: Tensor | Sequence[Tensor],
    size: tuple[int, int],
    *,
    mode: str = "nearest",
    eps: float = 1e-6,
    binary: bool = False,
) -> Tensor:
    """Soft (or, with ``binary``, thresholded at 0.5) foreground mask ``[B,1,H,W]`` from per-layer token
    maps ``[B,1,h_l,w_l]``: mean over layers -> per-image min-max with ``eps`` -> threshold -> resize."""
    m = minmax_normalise(mean_token_map(maps), eps)
    if binary:
        m = (m > 0.5).to(m.dtype)
    return resize_mask(m, size, mode)


def foreground_mask(
    attn_maps: Tensor | Sequence[Tensor],
    token_indices: int | Sequence[int],
    size: tuple[int, int],
    *,
    latent_hw: tuple[int, int],
    mode: str = "nearest",
    eps: float = 1e-6,
) -> Tensor:
    """Soft foreground mask ``[B,1,H,W]`` in [0, 1] from cross-attention maps of one or more layers.

    ``attn_maps``: one tensor or a list, each ``[B, heads, N_l, T]`` or ``[B, N_l, T]``; ``N_l`` may differ
    between layers (their grids are recovered with :func:`attention_hw` from ``latent_hw``).
    Steps, as the official ``aggregate_cross_attn_map``: head mean -> sum of the selected tokens per layer
    -> mean over layers (on the finest layer grid) -> per-image min-max with ``eps`` -> resize to
    ``size = (H, W)`` (``mode``, default nearest as official).
    """
    maps = [attn_maps] if isinstance(attn_maps, Tensor) else list(attn_maps)
    if not maps:
        raise ValueError("no attention maps given")
    per_layer = []
    for a in maps:
        tm = token_map(a, token_indices)
        h, w = attention_hw(latent_hw, tm.shape[-1])
        per_layer.append(tm.reshape(tm.shape[0], 1, h, w))
    return foreground_from_maps(per_layer, size, mode=mode, eps=eps)


def mask_to_tokens(mask: Tensor, latent_hw: tuple[int, int], seq_len: int, mode: str = "nearest") -> Tensor:
    """A ``[B,1,h,w]`` mask on an attention layer's token axis: ``[B, seq_len]`` (row-major, ComfyUI order).

    The layer's grid comes from :func:`attention_hw`, so the token count is right for any aspect ratio.
    """
    h, w = attention_hw(latent_hw, seq_len)
    return resize_mask(mask, (h, w), mode).reshape(mask.shape[0], h * w)
