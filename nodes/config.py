"""The configuration objects carried by the ``DM_FEATURES`` and ``DM_MATCH`` sockets, and the
functions that build them from node inputs.

They hold no ComfyUI objects (a user MASK travels in a :class:`MaskOverride`, never copied), so
they are cheap to deep-copy and safe to keep in ``model_options``. ``None`` fields mean "use the
default of the model's layout" (SD1.5 or SDXL), resolved once the model is known.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..dreammatcher_core import features as core_features
from .layout import MAX_FEATURE_LAYER, parse_block_ids
from .subject import resolve_subject

MASK_MODES = ["soft", "binary", "none"]
#: Accepted descriptor grids (FeatureConfig.grid). Only the official behaviour for now.
GRIDS = ["finest"]
#: The PCA's solvers (FeatureConfig.pca_solver), the exact one first: the default.
PCA_SOLVERS = list(core_features.PCA_SOLVERS)


@dataclass(frozen=True)
class FeatureConfig:
    """Which decoder features build the matching descriptor (``docs/method.md``, "Decoder features").

    ``layers`` are output-block ids whose *output* is used (SD1.5 official: blocks 5 and 8,
    i.e. diffusers up_blocks[1] and up_blocks[2] after their upsamplers).
    """

    layers: tuple[int, ...] | None = None
    pca_dim: int = 256
    #: Descriptor grid: "finest" resizes every layer to the finest chosen layer's grid
    #: (official behaviour); an int N means N x N-per-latent-downsampling, reserved for later.
    grid: str = "finest"
    #: The PCA's solver: "exact" (default) or "lowrank" (docs/method.md, "A faster PCA").
    pca_solver: str = "exact"


@dataclass(frozen=True)
class MatchConfig:
    """How correspondence is gated (``docs/method.md``, "Cycle-consistency confidence", "Subject mask").

    ``subject_tokens`` are token positions in the *target* positive conditioning whose
    cross-attention forms the soft foreground mask; they are resolved from the subject words
    through the CLIP tokenizer by ``DM_SemanticMatch`` so users never count tokens.
    """

    lambda_c: float = 0.4
    #: "soft" (official: min-max normalised cross-attention), "binary" (soft > 0.5) or "none".
    mask_mode: str = "soft"
    subject: str = ""
    subject_tokens: tuple[int, ...] = field(default_factory=tuple)
    #: The target prompt text the subject was resolved in (for messages and the inspector).
    target_prompt: str = ""
    #: Optional user MASK overriding the automatic foreground mask: ``None`` or a holder
    #: (:class:`MaskOverride`) whose ``.tensor`` is a ComfyUI MASK ``[B, H, W]`` in 0..1 on
    #: the CPU; its ``__deepcopy__`` returns itself, so clones never copy the tensor.
    mask: object | None = None


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


def parse_layers(text: str) -> tuple[int, ...] | None:
    """Parse "5,8" / "5 8" / "5-8" into output-block ids; empty means "the layout's default".

    Raises ``ValueError`` with the expected syntax when the text is not a list of block ids, and
    for ids no supported layout has; ids this model lacks are refused once it is known
    (``layout.check_feature_layers``).
    """
    layers = parse_block_ids(text, "layers", example="e.g. '5,8' (SD1.5 default), or be empty for the "
                                                      "model's default")
    if not layers:
        return None
    bad = [x for x in layers if not 0 <= x <= MAX_FEATURE_LAYER]
    if bad:
        raise ValueError(
            f"layers {bad} are out of range: use output-block ids 0-{MAX_FEATURE_LAYER} (block 11's output "
            f"is the UNet's last feature map and is not available; SDXL has 0-7); got '{text}'."
        )
    return layers


def feature_config(layers: str = "", pca_dim: int = 256, grid: str = "finest",
                   pca_solver: str = "exact") -> FeatureConfig:
    """The ``DM_FEATURES`` object for these widget values."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}; got '{grid}'.")
    if pca_solver not in PCA_SOLVERS:
        raise ValueError(f"pca_solver must be one of {PCA_SOLVERS}; got '{pca_solver}'.")
    return FeatureConfig(layers=parse_layers(layers), pca_dim=int(pca_dim), grid=grid, pca_solver=pca_solver)
