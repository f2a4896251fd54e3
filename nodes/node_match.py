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

The same two roles exist as separate nodes, ``DM_MatchSettings`` and ``DM_InspectMatch``
(:mod:`.node_settings`, :mod:`.node_inspect`), which new graphs can use instead.

The widget order (lambda_c, mask_mode, subject, target_prompt, noise_percent, seed) is a public
contract; inspector sockets come after the configuration inputs.
"""

from __future__ import annotations

from .config import match_config
from .host import require_node_api
from .inputs import match_inspector_inputs, match_inspector_outputs, match_setting_inputs, noise_inputs
from .inspector import blank_image
from .node_inspect import match_views
from .sockets import CATEGORY, DMMatch

io = require_node_api().io


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
                "warped reference, confidence, foreground mask, flow and gated composite. The same roles "
                "as two lighter nodes: Match Settings and Inspect Match."
            ),
            inputs=[
                *match_setting_inputs(),
                *match_inspector_inputs("Inspector only: ", model_optional=True),
                *noise_inputs("Inspector only: ", fixed_seed=False),
            ],
            outputs=[
                DMMatch.Output("match", tooltip="Matching configuration for DM_AMAPatch."),
                *match_inspector_outputs(),
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
        images, ui = match_views(cls, model, config, features, reference, target, conditioning, vae,
                                 reference_image, target_image, noise_percent, seed)
        return io.NodeOutput(config, *images, ui=ui)
