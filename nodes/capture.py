"""What the pack reads out of a UNet pass, each in one implementation shared by every runtime.

* Decoder features: :class:`FeatureTap` keeps the outputs of chosen output blocks per chunk label
  (the guidance sampler, the inspector); the AMA run uses the same row arithmetic
  (``host.hooks.output_layer`` / ``host.hooks.chunks``) for its per-row banks.
* Subject cross-attention: :func:`subject_token_map` is the head-mean softmax probability of the
  subject tokens (``dreammatcher_core.masks.token_map``), for the AMA mask layers and the inspector.
* The subject mask from those maps (:func:`subject_mask`, the core's ``masks.foreground_from_maps``)
  and from a user MASK (:func:`user_mask`), in one place.
"""

from __future__ import annotations

import torch

from ..dreammatcher_core import masks as core_masks
from .host import hooks


class FeatureTap:
    """``output_block_patch`` that keeps (detached) outputs of chosen decoder blocks per chunk label.

    ``feats[label][layer]`` is ``[B, C, h, w]`` (rows split by ``cond_or_uncond``, never by position).
    A later call with the same label overwrites an earlier one.
    """

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)
        self.feats: dict[int, dict[int, torch.Tensor]] = {}

    def __call__(self, h, hsp, transformer_options):
        layer = hooks.output_layer(transformer_options)
        if layer in self.layers:
            for _c, label, rows in hooks.chunks(h, hooks.chunk_labels(transformer_options)):
                self.feats.setdefault(label, {})[layer] = rows.detach()
        return h, hsp

    def __deepcopy__(self, memo: dict) -> FeatureTap:
        return self


def subject_token_map(q: torch.Tensor, k: torch.Tensor, heads: int, tokens) -> torch.Tensor:
    """``[B, N]``: head-mean cross-attention probability of ``tokens``, summed over them.

    ``q`` ``[B, N, heads*d]`` and ``k`` ``[B, T, heads*d]`` of one cross-attention call (float32 maths).
    """
    b = q.shape[0]
    d = q.shape[-1] // heads
    qh = q.float().reshape(b, -1, heads, d).transpose(1, 2)
    kh = k.float().reshape(b, -1, heads, d).transpose(1, 2)
    probs = torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)
    return core_masks.token_map(probs, list(tokens))


def subject_mask(mean_map: torch.Tensor, mode: str, hw: tuple[int, int]) -> torch.Tensor:
    """The foreground mask ``[B, 1, H, W]`` at ``hw`` from a mean token map ``[B, 1, h, w]``.

    The core's ``masks.foreground_from_maps``: min-max normalised per image (the official soft mask),
    thresholded at 0.5 for ``"binary"``, resized with nearest-neighbour interpolation (official).
    """
    return core_masks.foreground_from_maps([mean_map], tuple(hw), binary=mode == "binary")


def user_mask(mask: torch.Tensor, row: int, hw: tuple[int, int], device=None) -> torch.Tensor:
    """Row ``row`` (cycling) of a ComfyUI MASK ``[B, H, W]`` as ``[1, 1, h, w]`` at ``hw`` (bilinear)."""
    m = mask[row % mask.shape[0]][None, None].float()
    if device is not None:
        m = m.to(device)
    return core_masks.resize_mask(m, tuple(hw), mode="bilinear").clamp(0, 1)
