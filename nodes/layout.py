"""The UNet's attention/feature geometry and the per-layout policy built on it (pure data).

:class:`UNetLayout` is what ``host.model.unet_layout`` reads from a model's modules: which blocks hold
a transformer, at which latent downsampling factor, with how many transformer blocks, and the factor
and channels of every decoder output. Everything that *chooses* blocks from a layout lives here, once:
the AMA layer presets, the cross-attention layers of the subject mask, the default feature layers per
family, and the one parser and validator of block ids every path uses (AMA, the feature inspector,
matching guidance). No ComfyUI import: the layout is plain frozen data.
"""

from __future__ import annotations

from dataclasses import dataclass

PRESETS = ("paper (decoder 32²+64²)", "all decoder", "custom")

#: Official/default feature layers (output-block ids whose *output* feeds the descriptor).
DEFAULT_FEATURE_LAYERS = {"sd15": (5, 8), "sdxl": (2, 5)}

#: The largest decoder of a supported layout (SD1.5: 12 output blocks, whose last output is not
#: observable by an output-block patch). Block ids are checked against it before a model is known.
MAX_FEATURE_LAYER = 10


@dataclass(frozen=True)
class AttnBlock:
    """One UNet block that holds a SpatialTransformer.

    ``factor`` is the latent downsampling factor at its attention (1 = latent grid), ``depth`` the
    number of BasicTransformerBlocks (the ``transformer_index`` of 3-tuple replace keys runs over
    ``range(depth)``), ``cross`` whether attn2 attends to a text context.
    """

    name: str
    id: int
    depth: int
    factor: int
    cross: bool


@dataclass(frozen=True)
class UNetLayout:
    """The attention/feature geometry of an SD-style UNet, read from the modules themselves.

    ``family`` is ``"sd15"`` when attention exists at the latent resolution (SD1.x/2.x layout) and
    ``"sdxl"`` when the finest attention level is at factor 2 (SDXL layout); defaults per family are
    chosen in this module. ``output_factor[k]`` is the factor of the *output* of output
    block k (after its upsampler), which is what ``output_block_patch`` sees as ``h`` at block k+1.
    """

    family: str
    blocks: tuple[AttnBlock, ...]
    output_factor: tuple[int, ...]
    output_channels: tuple[int, ...]

    def block(self, name: str, id: int) -> AttnBlock | None:
        for b in self.blocks:
            if b.name == name and b.id == id:
                return b
        return None

    def decoder(self) -> tuple[AttnBlock, ...]:
        return tuple(b for b in self.blocks if b.name == "output")


def parse_block_ids(text: str, what: str, *, example: str) -> tuple[int, ...]:
    """"6,7,8", "6 7 8", "6;7" or "6-11" -> sorted unique block ids (empty text -> ``()``).

    The one parser of block-id lists (``custom_layers`` of the AMA patch, ``layers`` of the feature
    configuration). Raises ``ValueError`` naming ``what`` and the expected syntax.
    """
    ids: list[int] = []
    for part in text.replace(";", ",").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(p) for p in part.split("-", 1))
                ids.extend(range(min(a, b), max(a, b) + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(
                f"{what} must list decoder output-block ids, {example}; got '{text}'."
            ) from None
    return tuple(sorted(set(ids)))


def check_feature_layers(layout: UNetLayout, layers: tuple[int, ...]) -> tuple[int, ...]:
    """``layers`` if every id is an output block whose output a patch can observe, else a clear error.

    The output of output block ``k`` is seen by the patch of block ``k + 1``, so the last block's
    output is never available: SD1.5 offers 0..10, SDXL 0..7.
    """
    n_out = len(layout.output_factor)
    bad = [k for k in layers if not 0 <= k < n_out - 1]
    if bad or not layers:
        raise ValueError(f"feature layers {bad or 'nothing'} are not usable on this model: output-block ids "
                         f"0..{n_out - 2} are available (the last block's output is not observable).")
    return tuple(layers)


def feature_layers(layout: UNetLayout, configured: tuple[int, ...] | None) -> tuple[int, ...]:
    """The configured feature layers, or the family default, validated against ``layout``."""
    return check_feature_layers(layout, tuple(configured or default_feature_layers(layout)))


def ama_blocks(layout: UNetLayout, preset: str, custom: str) -> tuple[AttnBlock, ...]:
    """Decoder attention blocks that get AMA.

    * paper: the decoder attention blocks at the two finest decoder attention resolutions — SD1.5
      output 6..11 (32²+64² at 512², the official up_blocks 2-3), SDXL output 0..5 (32²+64² at 1024²).
    * all decoder: every decoder attention block (SD1.5 3..11, SDXL 0..5).
    * custom: the listed output-block ids (every transformer index of each).
    """
    decoder = layout.decoder()
    if preset == PRESETS[0]:
        finest = sorted({b.factor for b in decoder})[:2]
        chosen = tuple(b for b in decoder if b.factor in finest)
    elif preset == PRESETS[1]:
        chosen = decoder
    elif preset == PRESETS[2]:
        ids = parse_block_ids(custom, "custom_layers", example="like '6,7,8,9,10,11' or '6-11'")
        valid = [b.id for b in decoder]
        bad = [i for i in ids if i not in valid]
        if not ids or bad:
            raise ValueError(
                f"custom_layers: {bad or 'nothing'} is not a decoder attention block of this model; "
                f"valid output-block ids are {valid}."
            )
        chosen = tuple(b for b in decoder if b.id in ids)
    else:
        raise ValueError(f"layer_preset must be one of {list(PRESETS)}; got '{preset}'.")
    return chosen


def mask_blocks(layout: UNetLayout, ama: tuple[AttnBlock, ...]) -> tuple[AttnBlock, ...]:
    """Cross-attention blocks whose maps form the foreground mask.

    Official SD1.5: the five 16×16 layers (input 7, 8, output 3, 4, 5), i.e. the coarsest
    non-middle attention resolution, all of which run before the first AMA layer. The rule here:
    the cross-attention blocks at the coarsest encoder attention resolution that run *before the
    first AMA block* (so the mask is complete when AMA needs it): SD1.5 paper → input 7, 8 and
    output 3, 4, 5; SDXL paper → input 7, 8 and middle (all transformer indices).
    """
    coarsest = max(b.factor for b in layout.blocks if b.name == "input")
    first_ama = min(b.id for b in ama)
    out = []
    for b in layout.blocks:
        if not b.cross or b.factor != coarsest:
            continue
        if b.name == "output" and b.id >= first_ama:
            continue
        out.append(b)
    if not out:
        raise ValueError("No cross-attention layer runs before the chosen AMA layers, so no automatic "
                         "foreground mask can be computed; choose later decoder layers or connect a MASK.")
    return tuple(out)


def default_feature_layers(layout: UNetLayout) -> tuple[int, ...]:
    """SD1.5: outputs of output blocks 5 and 8 (official up_feat2/up_feat3); SDXL: blocks 2 and 5."""
    return DEFAULT_FEATURE_LAYERS.get(layout.family, DEFAULT_FEATURE_LAYERS["sd15"])


