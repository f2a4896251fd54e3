"""Input declarations shared by the settings nodes, the inspectors and the all-in-one nodes.

``DM_ExtractFeatures`` and ``DM_SemanticMatch`` (the all-in-one nodes that saved workflows use)
carry both roles: settings, and optional inspector sockets. ``DM_FeatureSettings`` /
``DM_MatchSettings`` carry only the settings, ``DM_InspectFeatures`` / ``DM_InspectMatch`` only
the inspector. Declaring each input once keeps the four descriptions of the same setting equal.
The order in which a node lists them is part of its saved-workflow contract (schema snapshot).
"""

from __future__ import annotations

from .config import GRIDS, MASK_MODES, PCA_SOLVERS
from .host import require_node_api
from .sockets import DMFeatures

io = require_node_api().io


def feature_setting_inputs() -> list:
    """``layers``, ``pca_dim``, ``grid``: what ``DM_FEATURES`` holds."""
    return [
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
    ]


def pca_solver_input():
    """``pca_solver``: only Feature Settings has it.

    Appended last and optional: a saved API-format prompt written before it existed has no value for
    it, and a required input would fail that prompt's validation; missing means ``exact``, the old
    behaviour.
    """
    return io.Combo.Input(
        "pca_solver", options=PCA_SOLVERS, default="exact", optional=True,
        tooltip=("How the PCA is computed. 'exact' (default): a full eigen-decomposition. 'lowrank': a "
                 "seeded randomised solver for the top pca_dim directions, much faster on a GPU and "
                 "nearly the same descriptor (README, 'Performance'); it is not the default until the "
                 "fidelity benchmark shows it is as good."),
    )


def match_setting_inputs() -> list:
    """``lambda_c``, ``mask_mode``, ``subject``, ``clip``, ``target_prompt``, ``subject_mask``."""
    return [
        io.Float.Input(
            "lambda_c", default=0.4, min=0.0, max=4.0, step=0.01,
            tooltip=("Cycle-consistency tolerance (paper λc, official 0.4): a match is trusted when "
                     "going target→reference→target lands within λc × mask share × width pixels. "
                     "Higher trusts more matches."),
        ),
        io.Combo.Input(
            "mask_mode", options=MASK_MODES, default="soft",
            tooltip=("Foreground mask from the subject's cross-attention: 'soft' (official, "
                     "min-max normalised), 'binary' (soft > 0.5) or 'none' (whole image)."),
        ),
        io.String.Input(
            "subject", default="",
            tooltip=("The subject's words as they appear in the TARGET prompt, e.g. 'sks dog' or "
                     "'dog' (official: the class word), or 'embedding:my_cat' for a textual "
                     "inversion. Needs 'clip' and 'target_prompt'."),
        ),
        io.Clip.Input(
            "clip", optional=True,
            tooltip="The CLIP that encodes the target prompt; used to find the subject's tokens.",
        ),
        io.String.Input(
            "target_prompt", default="", multiline=True, optional=True,
            tooltip=("The target's positive prompt text, exactly as given to CLIPTextEncode (link "
                     "the same String node to both to keep them in sync)."),
        ),
        io.Mask.Input(
            "subject_mask", optional=True,
            tooltip="Optional MASK of the subject in the target; overrides the automatic "
                    "cross-attention mask.",
        ),
    ]


def noise_inputs(prefix: str, fixed_seed: bool) -> list:
    """The trailing ``noise_percent`` and ``seed`` of every inspector.

    ``fixed_seed``: the frontend gives any INT input named ``seed`` a "control after generate"
    widget that defaults to *randomize*, which makes an inspector re-run (two UNet passes) on
    every queue. The inspector nodes turn that widget off, so the seed stays what the user typed
    and a re-queued graph reuses the cached inspection. The all-in-one nodes keep the widget:
    saved workflows store its value.
    """
    seed_opts = {"control_after_generate": False} if fixed_seed else {}
    return [
        io.Float.Input(
            "noise_percent", default=0.25, min=0.0, max=0.99, step=0.01, optional=True,
            tooltip=f"{prefix}how far into the noise schedule the latents are noised before "
                    "the feature pass (0 = clean, 0.99 = almost pure noise).",
        ),
        io.Int.Input(
            "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
            tooltip=f"{prefix}seed of the noise added to the latents (deterministic).", **seed_opts,
        ),
    ]


def feature_inspector_inputs(prefix: str, model_optional: bool) -> list:
    """The feature inspector's sockets: model, latent_a, latent_b, conditioning."""
    return [
        io.Model.Input("model", optional=model_optional,
                       tooltip=f"{prefix}the model whose features to show."),
        io.Latent.Input(
            "latent_a", optional=model_optional,
            tooltip=f"{prefix}first image (e.g. the reference), as a LATENT (VAEEncode).",
        ),
        io.Latent.Input(
            "latent_b", optional=True,
            tooltip=f"{prefix}optional second image (e.g. a generated target); its colours are "
                    "comparable with latent_a's.",
        ),
        io.Conditioning.Input(
            "conditioning", optional=True,
            tooltip=f"{prefix}prompt for the feature pass (default: an all-zero prompt).",
        ),
    ]


def match_inspector_inputs(prefix: str, model_optional: bool) -> list:
    """The match inspector's sockets: model, two images (LATENT or IMAGE), features, conditioning, vae."""
    return [
        io.Model.Input("model", optional=model_optional, tooltip=f"{prefix}the model to match with."),
        io.Latent.Input(
            "reference", optional=True,
            tooltip=f"{prefix}the reference image as a LATENT (or use reference_image + vae).",
        ),
        io.Latent.Input(
            "target", optional=True,
            tooltip=f"{prefix}the target image as a LATENT (or use target_image + vae).",
        ),
        DMFeatures.Input(
            "features", optional=True,
            tooltip=f"{prefix}feature configuration from Feature Settings (default: the model's "
                    "default layers, PCA 256).",
        ),
        io.Conditioning.Input(
            "conditioning", optional=True,
            tooltip=f"{prefix}the target's positive conditioning, needed for the automatic foreground "
                    "mask (default: an all-zero prompt, no mask).",
        ),
        io.Vae.Input(
            "vae", optional=True,
            tooltip=f"{prefix}decodes latents (or encodes images) for full-resolution views; without it "
                    "the views use a fast latent colour preview.",
        ),
        io.Image.Input(
            "reference_image", optional=True,
            tooltip=f"{prefix}the reference as an IMAGE (encoded with 'vae' if 'reference' is not "
                    "connected).",
        ),
        io.Image.Input(
            "target_image", optional=True,
            tooltip=f"{prefix}the target as an IMAGE (encoded with 'vae' if 'target' is not connected).",
        ),
    ]


def match_inspector_outputs() -> list:
    """warped_reference, confidence, foreground, flow, composite (paper Fig. 7)."""
    return [
        io.Image.Output("warped_reference", tooltip="Reference warped onto the target."),
        io.Mask.Output("confidence", tooltip="1 where the match is cycle-consistent."),
        io.Mask.Output("foreground", tooltip="The subject's soft foreground mask."),
        io.Image.Output("flow", tooltip="Target→reference flow as a colour wheel "
                                        "(hue = direction, saturation = length; white = no motion)."),
        io.Image.Output("composite", tooltip="Warped reference where the gate (mask × confidence) is "
                                             "high, target elsewhere."),
    ]
