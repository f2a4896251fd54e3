"""``DM_AMAPatch`` ("AMA Model Patch"): DreamMatcher's reference branch as a MODEL patch.

MODEL + DM_REFERENCE → MODEL. Any stock sampler (KSampler, KSamplerAdvanced, SamplerCustom…) then
generates the target with the reference's appearance injected through Appearance Matching
Self-Attention (``docs/method.md``): the target keeps its own Q/K (structure), its V in the chosen
decoder self-attention layers moves towards the reference V warped along the semantic
correspondence, gated by cycle-consistency confidence and the subject's soft foreground mask.
The patch and its per-run machinery are in the :mod:`.ama` package.

The input names and widget order are a public contract (saved workflows):
model, reference, strength, start_percent, end_percent, layer_preset, custom_layers,
features (optional), match (optional), mask (optional).
"""

from __future__ import annotations

from .ama import patch_model
from .host import require_node_api
from .layout import PRESETS
from .sockets import CATEGORY, DMFeatures, DMMatch, DMReference

#: Default reference-bank budget (system RAM). Banking never changes a result, only memory and
#: speed. With the default layers in fp16, SD1.5 at 512² takes about 40 MiB a step (cond and
#: uncond together), so 2 GiB hold a 50-step run; SDXL at 1024² takes about 280 MiB a step.
BANK_DEFAULT_MIB = 2048

io = require_node_api().io


class AMAModelPatch(io.ComfyNode):
    """Inject the reference's appearance into any sampler through Appearance Matching Self-Attention."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_AMAPatch",
            display_name="AMA Model Patch",
            category=CATEGORY,
            description=(
                "DreamMatcher: patches the MODEL so that any sampler generates your prompt with the "
                "reference subject's appearance. The target keeps its own layout (queries/keys); in the "
                "chosen decoder layers its values move towards the reference values, warped along a "
                "semantic correspondence and gated by its confidence and the subject's mask. Sample with "
                "the same steps and scheduler as DM_InvertReference."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model to patch (the same family the reference was "
                                                "inverted with; LoRAs may come before or after this node)."),
                DMReference.Input("reference", tooltip="The inverted reference from DM_InvertReference."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How much of the reference appearance is injected (1 = official "
                                       "DreamMatcher, 0 = the unpatched model)."),
                io.Float.Input("start_percent", default=0.08, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the active part of the schedule (official 0.08 = step 4 of "
                                       "50). Earlier steps keep the target's own layout forming."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the active part of the schedule (official 1.0 = last step)."),
                io.Combo.Input("layer_preset", options=list(PRESETS), default=PRESETS[0],
                               tooltip="Decoder self-attention layers that get AMA. 'paper': the two finest "
                                       "decoder resolutions (official; SD1.5 output blocks 6-11, SDXL 0-5); "
                                       "'all decoder': every decoder attention block; 'custom': the "
                                       "custom_layers list."),
                io.String.Input("custom_layers", default="",
                                tooltip="With layer_preset 'custom': decoder output-block ids, e.g. "
                                        "'6,7,8,9,10,11' or '6-11' (every transformer block of each)."),
                DMFeatures.Input("features", optional=True,
                                 tooltip="Optional DM_FEATURES from Extract Diffusion Features: which "
                                         "decoder features build the matching descriptor and its PCA size "
                                         "(default: the official layers, PCA 256)."),
                DMMatch.Input("match", optional=True,
                              tooltip="Optional DM_MATCH from Semantic Match: λc, mask mode and the subject "
                                      "words whose cross-attention forms the foreground mask (default: "
                                      "λc 0.4, no subject → the whole image)."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional MASK of the subject in the target; overrides the automatic "
                                      "cross-attention mask (resized to every layer)."),
                io.Int.Input("reference_bank_mib", default=BANK_DEFAULT_MIB, min=0, max=1 << 20, step=64,
                             optional=True,
                             tooltip="Memory (MiB of system RAM) for the reference bank: the reference "
                                     "branch's per-step values and features, computed in the first "
                                     "sampling and replayed while the reference, its prompts, the model's "
                                     "weights/LoRAs and patches stay the same (checked exactly; results "
                                     "are identical). Roughly halves the cost of later samplings. Steps "
                                     "beyond the budget are computed live. 0 = off."),
            ],
            outputs=[io.Model.Output(display_name="MODEL",
                                     tooltip="The patched model; use it in any sampler.")],
        )

    @classmethod
    def execute(cls, model, reference, strength: float = 1.0, start_percent: float = 0.08,
                end_percent: float = 1.0, layer_preset: str = PRESETS[0], custom_layers: str = "",
                features=None, match=None, mask=None,
                reference_bank_mib: int = BANK_DEFAULT_MIB) -> io.NodeOutput:
        return io.NodeOutput(patch_model(model, reference, strength, start_percent, end_percent, layer_preset,
                                         custom_layers, features, match, mask, bank_mib=reference_bank_mib))
