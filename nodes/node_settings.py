"""``DM_FeatureSettings`` and ``DM_MatchSettings``: the settings of the matching, and nothing else.

The all-in-one ``DM_ExtractFeatures`` / ``DM_SemanticMatch`` nodes carry the same settings plus
inspector sockets (16 inputs on Semantic Match); these two show only what configuring AMA needs.
They produce exactly the objects the all-in-one nodes do, so either may feed AMA Model Patch,
the Matching Guidance Sampler and the inspectors.
"""

from __future__ import annotations

from .config import feature_config, match_config
from .host import require_node_api
from .inputs import feature_setting_inputs, match_setting_inputs, pca_solver_input
from .sockets import CATEGORY, DMFeatures, DMMatch

io = require_node_api().io


class FeatureSettings(io.ComfyNode):
    """Which decoder features build the matching descriptor."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_FeatureSettings",
            display_name="Feature Settings",
            category=CATEGORY,
            description=(
                "Chooses the UNet decoder features DreamMatcher matches on (layers, PCA size). Connect "
                "'features' to AMA Model Patch, the Matching Guidance Sampler or an inspector. Without "
                "this node they use the model's defaults (SD1.5: decoder blocks 5 and 8, PCA 256)."
            ),
            inputs=[*feature_setting_inputs(), pca_solver_input()],
            outputs=[DMFeatures.Output("features", tooltip="Feature configuration.")],
        )

    @classmethod
    def execute(cls, layers: str = "", pca_dim: int = 256, grid: str = "finest",
                pca_solver: str = "exact") -> io.NodeOutput:
        return io.NodeOutput(feature_config(layers, pca_dim, grid, pca_solver))


class MatchSettings(io.ComfyNode):
    """How far the correspondence is trusted, and which subject masks it."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MatchSettings",
            display_name="Match Settings",
            category=CATEGORY,
            description=(
                "How DreamMatcher trusts its correspondence: the cycle-consistency threshold λc, the "
                "subject whose cross-attention forms the foreground mask, and the mask mode. Connect "
                "'match' to AMA Model Patch (and the Matching Guidance Sampler). Give the subject's words "
                "as they appear in the target prompt, with the CLIP and that prompt."
            ),
            inputs=match_setting_inputs(),
            outputs=[DMMatch.Output("match", tooltip="Matching configuration.")],
        )

    @classmethod
    def execute(cls, lambda_c: float = 0.4, mask_mode: str = "soft", subject: str = "", clip=None,
                target_prompt: str = "", subject_mask=None) -> io.NodeOutput:
        return io.NodeOutput(match_config(lambda_c, mask_mode, subject, clip, target_prompt, subject_mask))
