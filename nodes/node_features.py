"""``DM_ExtractFeatures`` ("Extract Diffusion Features").

Two roles in one node, so saved workflows never need a second node type:

* **configuration** (always): output 0 is a ``DM_FEATURES`` :class:`~.config.FeatureConfig`
  (decoder layers, PCA dim, descriptor grid) for ``DM_AMAPatch``;
* **inspector** (when ``model`` and ``latent_a`` are connected): runs the UNet once on each
  noised latent, builds a joint co-PCA descriptor of both images (``inspector.joint_descriptors``)
  and shows its first three principal components as colours, jointly projected so that the same
  semantics get the same colours in both images (paper Fig. 6).

The same two roles exist as separate nodes, ``DM_FeatureSettings`` and ``DM_InspectFeatures``
(:mod:`.node_settings`, :mod:`.node_inspect`), which new graphs can use instead.

The widget order (layers, pca_dim, grid, noise_percent, seed) is a public contract.
"""

from __future__ import annotations

from .config import feature_config
from .host import require_node_api
from .inputs import feature_inspector_inputs, feature_setting_inputs, noise_inputs
from .inspector import blank_image
from .node_inspect import feature_views
from .sockets import CATEGORY, DMFeatures

io = require_node_api().io


class ExtractFeatures(io.ComfyNode):
    """Configure (and optionally visualise) the diffusion features used for semantic matching."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_ExtractFeatures",
            display_name="Extract Diffusion Features",
            category=CATEGORY,
            description=(
                "Chooses the UNet decoder features DreamMatcher matches on. Connect 'features' to "
                "DM_AMAPatch / DM_SemanticMatch. Optionally connect a model and one or two latents to SEE "
                "the features: the first three principal components, coloured consistently across both "
                "images (same colour = same semantics). The same roles as two lighter nodes: "
                "Feature Settings and Inspect Features."
            ),
            inputs=[
                *feature_setting_inputs(),
                *feature_inspector_inputs("Inspector only: ", model_optional=True),
                *noise_inputs("Inspector only: ", fixed_seed=False),
            ],
            outputs=[
                DMFeatures.Output("features",
                                  tooltip="Feature configuration for DM_AMAPatch / DM_SemanticMatch."),
                io.Image.Output("pca_a", tooltip="Inspector: first 3 principal components of latent_a."),
                io.Image.Output("pca_b", tooltip="Inspector: the same projection applied to latent_b."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, layers: str = "", pca_dim: int = 256, grid: str = "finest", model=None,
                latent_a=None, latent_b=None, conditioning=None, noise_percent: float = 0.25,
                seed: int = 0) -> io.NodeOutput:
        config = feature_config(layers, pca_dim, grid)
        if model is None or latent_a is None:
            if model is not None or latent_a is not None or latent_b is not None:
                raise ValueError(
                    "To inspect features, connect both 'model' and 'latent_a' (latent_b is optional); "
                    "for configuration only, disconnect them."
                )
            blank = blank_image()
            return io.NodeOutput(config, blank, blank)
        images, ui = feature_views(cls, model, config, latent_a, latent_b, conditioning, noise_percent, seed)
        return io.NodeOutput(config, *images, ui=ui)
