"""The AMA patch's settings: node inputs resolved once against the model's layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout import UNetLayout, ama_blocks, feature_layers, mask_blocks


def auto_mask(user_mask, mask_mode: str, subject_tokens) -> bool:
    """Whether the foreground mask comes from the subject's cross-attention (the one rule: no user
    MASK, a mask mode other than "none", and subject tokens to look at)."""
    return user_mask is None and mask_mode != "none" and len(subject_tokens) > 0


@dataclass(frozen=True)
class AMASettings:
    """Everything the patch needs, resolved against the model's layout (no tensors but ``user_mask``)."""

    strength: float
    start_percent: float
    end_percent: float
    ama_keys: tuple[tuple[str, int, int], ...]
    mask_keys: tuple[tuple[str, int, int], ...]
    feature_layers: tuple[int, ...]
    pca_dim: int
    lambda_c: float
    mask_mode: str
    subject_tokens: tuple[int, ...]
    user_mask: torch.Tensor | None = None
    #: Reference bank budget in MiB (0: no bank; see ``bank``).
    bank_mib: float = 0.0
    #: The descriptor PCA's solver ("exact" or "lowrank", from DM_FEATURES).
    pca_solver: str = "exact"

    @property
    def auto_mask(self) -> bool:
        """Whether the foreground mask comes from cross-attention (needs the attn2 replaces)."""
        return auto_mask(self.user_mask, self.mask_mode, self.subject_tokens)

    def __deepcopy__(self, memo):
        return self  # immutable; never copy the user mask tensor


def resolve_settings(layout: UNetLayout, *, strength: float, start_percent: float, end_percent: float,
                     layer_preset: str, custom_layers: str, features=None, match=None,
                     mask: torch.Tensor | None = None, bank_mib: float = 0.0) -> AMASettings:
    """Turn node inputs (+ optional DM_FEATURES / DM_MATCH configs) into :class:`AMASettings`."""
    ama = ama_blocks(layout, layer_preset, custom_layers)
    ama_keys = tuple(("output", b.id, i) for b in ama for i in range(b.depth))
    layers = feature_layers(layout, getattr(features, "layers", None))
    pca_dim = int(getattr(features, "pca_dim", 256) or 256)
    lambda_c = float(getattr(match, "lambda_c", 0.4))
    mask_mode = str(getattr(match, "mask_mode", "soft"))
    if mask_mode not in ("soft", "binary", "none"):
        raise ValueError(f"mask_mode must be 'soft', 'binary' or 'none'; got '{mask_mode}'.")
    tokens = tuple(int(t) for t in getattr(match, "subject_tokens", ()) or ())
    user_mask = mask
    if user_mask is None and getattr(match, "mask", None) is not None:
        user_mask = getattr(match.mask, "tensor", match.mask)
    if user_mask is not None:
        user_mask = user_mask.detach().float().cpu()
        if user_mask.ndim == 2:
            user_mask = user_mask[None]
        if user_mask.ndim != 3:
            raise ValueError(f"mask must be a ComfyUI MASK [B, H, W]; got shape {tuple(user_mask.shape)}.")
    mkeys: tuple = ()
    if auto_mask(user_mask, mask_mode, tokens):
        mkeys = tuple((b.name, b.id, i) for b in mask_blocks(layout, ama) for i in range(b.depth))
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in 0..1, got {strength}.")
    if float(bank_mib) < 0:
        raise ValueError(f"reference_bank_mib must be 0 (off) or more; got {bank_mib}.")
    return AMASettings(float(strength), float(start_percent), float(end_percent), ama_keys, mkeys, layers,
                       pca_dim, lambda_c, mask_mode, tokens, user_mask, float(bank_mib),
                       str(getattr(features, "pca_solver", "exact")))
