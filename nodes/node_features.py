"""``DM_ExtractFeatures`` ("Extract Diffusion Features").

Two roles in one node, so saved workflows never need a second node type:

* **configuration** (always): output 0 is a ``DM_FEATURES`` :class:`~.config.FeatureConfig`
  (decoder layers, PCA dim, descriptor grid) for ``DM_AMAPatch``;
* **inspector** (when ``model`` and ``latent_a`` are connected): runs the UNet once on each
  noised latent, builds a joint co-PCA descriptor of both images (``inspector.joint_descriptors``)
  and shows its first three principal components as colours, jointly projected so that the same
  semantics get the same colours in both images (paper Fig. 6).

The widget order (layers, pca_dim, grid, noise_percent, seed) is a public contract.
"""

from __future__ import annotations

from .config import GRIDS, feature_config
from .host import require_node_api
from .inspector import blank_image, feature_images
from .sockets import CATEGORY, DMFeatures, inspector_noise_inputs

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
                "images (same colour = same semantics)."
            ),
            inputs=[
                io.String.Input(
                    "layers", default="",
                    tooltip=("Decoder output blocks whose outputs build the descriptor, e.g. '5,8' (SD1.5 "
                             "official: 32x32 and 64x64 at 512px). Empty = the model's default "
                             "(SD1.5: 5,8)."),
                ),
                io.Int.Input(
                    "pca_dim", default=256, min=3, max=2048, step=1,
                    tooltip=("Dimensions kept per layer by the joint (reference+target) PCA. Official: 256 "
                             "per layer, 512 in total. Lower is faster and smoother, higher is sharper."),
                ),
                io.Combo.Input(
                    "grid", options=GRIDS, default="finest",
                    tooltip="Resolution of the descriptor: 'finest' resizes all layers to the finest chosen "
                            "layer's grid (official).",
                ),
                io.Model.Input(
                    "model", optional=True,
                    tooltip="Inspector only: the model whose features to show.",
                ),
                io.Latent.Input(
                    "latent_a", optional=True,
                    tooltip="Inspector only: first image (e.g. the reference), as a LATENT (VAEEncode).",
                ),
                io.Latent.Input(
                    "latent_b", optional=True,
                    tooltip="Inspector only: optional second image (e.g. a generated target); its colours "
                            "are comparable with latent_a's.",
                ),
                io.Conditioning.Input(
                    "conditioning", optional=True,
                    tooltip="Inspector only: prompt for the feature pass (default: an all-zero prompt).",
                ),
                *inspector_noise_inputs(),
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
        pca_a, pca_b = feature_images(
            model, config, latent_a, latent_b, conditioning, noise_percent, seed
        )
        api = require_node_api()
        previews = [pca_a] if latent_b is None else [pca_a, pca_b]
        ui = {"images": [r for img in previews for r in api.ui.PreviewImage(img, cls=cls).values]}
        return io.NodeOutput(config, pca_a, pca_b, ui=ui)
