"""Plain configuration objects carried by the ``DM_FEATURES`` and ``DM_MATCH`` sockets.

They hold no tensors and no ComfyUI objects, so they are cheap to deep-copy and safe to keep
in ``model_options``. ``None`` fields mean "use the default of the model's layout" (SD1.5 or
SDXL), resolved by the AMA runtime once it has seen the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class FeatureConfig:
    """Which decoder features build the matching descriptor (method.md §2).

    ``layers`` are output-block ids whose *output* is used (SD1.5 official: blocks 5 and 8,
    i.e. diffusers up_blocks[1] and up_blocks[2] after their upsamplers).
    """

    layers: tuple[int, ...] | None = None
    pca_dim: int = 256
    #: Descriptor grid: "finest" resizes every layer to the finest chosen layer's grid
    #: (official behaviour); an int N means N x N-per-latent-downsampling, reserved for later.
    grid: str = "finest"


@dataclass(frozen=True)
class MatchConfig:
    """How correspondence is gated (method.md §5).

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
    #: (``nodes.match.MaskOverride``) whose ``.tensor`` is a ComfyUI MASK ``[B, H, W]`` in 0..1 on
    #: the CPU; its ``__deepcopy__`` returns itself, so clones never copy the tensor.
    mask: object | None = None
