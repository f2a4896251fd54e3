"""``DM_MatchingGuidanceSampler`` ("Matching Guidance Sampler") and ``DM_MatchingGuidance``.

Semantic matching guidance (paper Eq. 9-11, ``docs/method.md``): at each guided step the target's
predicted clean latent is pulled toward the reference's clean latent z0, warped along the current
correspondence and weighted by the semantic-consistent mask. The first node is a KSampler-like
node that runs DDIM (deterministic Euler in sigma space) on the reference's schedule; the second
offers the same guidance as a ``SAMPLER`` for SamplerCustom / SamplerCustomAdvanced.

The sampler is :mod:`.guidance` (the per-step work :mod:`.guidance_run`); this module only declares
the nodes.

Input names and order are a public contract (saved workflows).
"""

from __future__ import annotations

from .ama import patch_of
from .config import FeatureConfig, MatchConfig
from .guidance import GuidanceSpec, guidance_sample, make_guidance_sampler
from .host import require_node_api
from .host.sampling import scheduler_names
from .node_diagnostics import diagnostics_report
from .sockets import CATEGORY, DMFeatures, DMMatch, DMReference

io = require_node_api().io

MODES = ["exact", "fast"]
REFERENCE_TIP = "The inverted reference from 'DDIM Invert Reference' (or 'Load Reference')."


def guidance_inputs() -> list:
    """The guidance widgets shared by both nodes (same names, defaults and tooltips)."""
    return [
        io.Float.Input(
            "guidance_scale", default=50.0, min=0.0, max=1000.0, step=1.0,
            tooltip=("Matching guidance weight λg (official code 50; the paper uses 75 for ViCo prompts). "
                     "0 disables guidance: the result equals plain DDIM."),
        ),
        io.Float.Input(
            "guidance_start", default=0.08, min=0.0, max=1.0, step=0.01,
            tooltip=("Start of guidance as a fraction of the schedule (ComfyUI's start_percent). 0.08 first "
                     "guides step 4 of 50, as the official code."),
        ),
        io.Float.Input(
            "guidance_end", default=1.0, min=0.0, max=1.0, step=0.01,
            tooltip="End of guidance as a fraction of the schedule (1.0 = until the last step).",
        ),
        io.Combo.Input(
            "mode", options=MODES, default="exact",
            tooltip=("'exact' backpropagates through the UNet as the official code (gradient through the "
                     "noise prediction, about 3x the cost of a step); 'fast' needs no backward pass: it "
                     "uses the closed-form pull on the predicted clean latent with the same sign and scale "
                     "convention."),
        ),
    ]


def optional_config_inputs() -> list:
    return [
        DMMatch.Input(
            "match", optional=True,
            tooltip="Optional Semantic Match configuration (λc of the cycle-consistency confidence).",
        ),
        DMFeatures.Input(
            "features", optional=True,
            tooltip="Optional Extract Diffusion Features configuration (decoder layers and PCA size) used "
                    "when the MODEL carries no AMA patch.",
        ),
    ]


def make_spec(reference, guidance_scale: float, guidance_start: float, guidance_end: float, mode: str,
              match: MatchConfig | None = None, features: FeatureConfig | None = None) -> GuidanceSpec:
    """Validate the widgets and build the sampler's :class:`~.guidance.GuidanceSpec`."""
    if reference is None or not hasattr(reference, "trajectory"):
        raise ValueError("Matching guidance needs a DM_REFERENCE: connect 'DDIM Invert Reference' (or "
                         "'Load Reference') to the 'reference' input.")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}; got '{mode}'.")
    if guidance_end < guidance_start:
        raise ValueError(f"guidance_end ({guidance_end}) is before guidance_start ({guidance_start}); "
                         "set guidance_end >= guidance_start.")
    match = match or MatchConfig()
    features = features or FeatureConfig()
    return GuidanceSpec(
        reference=reference, scale=float(guidance_scale), start_percent=float(guidance_start),
        end_percent=float(guidance_end), mode=mode, lambda_c=float(match.lambda_c),
        feature_layers=tuple(features.layers) if features.layers else None, pca_dim=int(features.pca_dim),
        pca_solver=str(features.pca_solver),
    )


class MatchingGuidanceSampler(io.ComfyNode):
    """KSampler-like DDIM sampler with DreamMatcher's semantic matching guidance."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MatchingGuidanceSampler",
            display_name="Matching Guidance Sampler",
            category=CATEGORY,
            description=(
                "DDIM sampling with DreamMatcher's semantic matching guidance: each guided step pulls the "
                "target's predicted clean latent toward the reference, warped along the semantic "
                "correspondence and masked by its confidence. Use it after 'AMA Model Patch' for the full "
                "paper method; it also works on a plain MODEL. Steps and scheduler must match the reference."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The model (ideally patched by 'AMA Model Patch')."),
                DMReference.Input("reference", tooltip=REFERENCE_TIP),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="The random seed used for creating the noise."),
                io.Int.Input("steps", default=50, min=1, max=10000,
                             tooltip="Sampling steps; must equal the steps the reference was inverted with."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (the official code uses 10)."),
                io.Combo.Input("scheduler", options=scheduler_names(), default="ddim_uniform",
                               tooltip="Noise schedule; must equal the reference's scheduler (official: "
                                       "ddim_uniform)."),
                io.Conditioning.Input("positive", tooltip="The target prompt."),
                io.Conditioning.Input("negative", tooltip="The negative prompt (the official code: empty)."),
                io.Latent.Input("latent_image", tooltip="The latent to denoise (e.g. Empty Latent Image)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Denoise strength; below 1.0 the sigmas must still be on the "
                                       "reference's schedule in the guided window."),
                *guidance_inputs(),
                *optional_config_inputs(),
            ],
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    def execute(cls, model, reference, seed, steps, cfg, scheduler, positive, negative, latent_image,
                denoise, guidance_scale, guidance_start, guidance_end, mode, match=None,
                features=None) -> io.NodeOutput:
        spec = make_spec(reference, guidance_scale, guidance_start, guidance_end, mode, match, features)
        check = getattr(reference, "check_model", None)
        if check is not None:
            check(model)
        out = guidance_sample(model, spec, seed=seed, steps=steps, cfg=cfg, scheduler=scheduler,
                              positive=positive, negative=negative, latent=latent_image, denoise=denoise)
        if patch_of(model) is None:
            return io.NodeOutput(out)
        # The sampler runs after the patch, so it can show what AMA did in this very run.
        return io.NodeOutput(out, ui=require_node_api().ui.PreviewText(diagnostics_report(model)[0]))


class MatchingGuidance(io.ComfyNode):
    """The guidance as a ``SAMPLER`` (DDIM/Euler with guidance) for SamplerCustom(Advanced)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_MatchingGuidance",
            display_name="Matching Guidance (SAMPLER)",
            category=CATEGORY,
            description=(
                "A SAMPLER (deterministic DDIM/Euler) with DreamMatcher's semantic matching guidance, for "
                "SamplerCustom and SamplerCustomAdvanced. Use sigmas from the same steps and scheduler "
                "as the reference's inversion."
            ),
            inputs=[
                DMReference.Input("reference", tooltip=REFERENCE_TIP),
                *guidance_inputs(),
                *optional_config_inputs(),
            ],
            outputs=[io.Sampler.Output(tooltip="Connect to SamplerCustom / SamplerCustomAdvanced.")],
        )

    @classmethod
    def execute(cls, reference, guidance_scale, guidance_start, guidance_end, mode, match=None,
                features=None) -> io.NodeOutput:
        spec = make_spec(reference, guidance_scale, guidance_start, guidance_end, mode, match, features)
        return io.NodeOutput(make_guidance_sampler(spec))
