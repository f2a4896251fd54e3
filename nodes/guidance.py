"""Semantic matching guidance (DM_MatchingGuidanceSampler / DM_MatchingGuidance) as a sampler function.

At each guided step the target's predicted clean latent is pulled toward the reference's clean
latent z0, warped along the current correspondence and weighted by the confidence (and the subject
mask when the AMA patch provides it). The sampler is deterministic DDIM (Euler in sigma space); the
per-step work lives in :mod:`.guidance_run`. ``docs/method.md`` ("Matching guidance") has the method.

Parametrisation (derived once here, used by every function below). ComfyUI's latent at noise
level sigma is the variance-exploding x = x0 + sigma*eps, while the UNet (and the official code)
sees z_t = x * sqrt(abar) with abar = 1 / (1 + sigma^2), so sqrt(1 - abar) = sigma * sqrt(abar).
The official update is  eps_branch -= lambda_g * sqrt(1 - abar) * dL/dz_t  where the loss sees
x0 = (z_t_detached - sqrt(1-abar) eps(z_t)) / sqrt(abar) = x_detached - sigma * eps(x): the same x0
ComfyUI writes, with the gradient flowing through eps only. Because z_t = sqrt(abar) x,
dL/dz_t = dL/dx / sqrt(abar), hence
    sqrt(1 - abar) * dL/dz_t = sigma * sqrt(abar) * dL/dx / sqrt(abar) = sigma * dL/dx
    eps_branch -= lambda_g * sigma * dL/dx
    denoised_branch = x - sigma * eps_branch  ->  denoised_branch += lambda_g * sigma^2 * dL/dx
and CFG is applied afterwards to the guided branches, as in the official code.
Fast mode replaces dL/dx (a UNet backward) by its value when the clean estimate is held constant,
d eps/dx = I/sigma, i.e. dL/dx = -dL/dx0 in closed form: denoised -= lambda * sigma^2 * dL/dx0
(dreammatcher_core.guidance.fast_guided_denoised). Same sign and sigma^2 scale as the exact mode;
the exact mode's true Jacobian shrinks the pull where the model reacts to its input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .guidance_run import GuidanceRun, guidance_window
from .host import sampling


@dataclass(eq=False)
class GuidanceSpec:
    """Everything the guidance sampler needs besides the sampling call itself.

    Shared, never copied (``__deepcopy__`` returns self): it holds the reference, whose trajectory
    can be tens of megabytes.
    """

    reference: object
    scale: float = 50.0
    start_percent: float = 0.08
    end_percent: float = 1.0
    mode: str = "exact"
    lambda_c: float = 0.4
    feature_layers: tuple[int, ...] | None = None
    pca_dim: int = 256
    pca_solver: str = "exact"
    #: Optional observer ``probe(info: dict)`` called once per guided branch (tests, diagnostics).
    probe: object = None

    def __deepcopy__(self, memo: dict) -> GuidanceSpec:
        return self


def check_guidance_schedule(reference, sigmas: torch.Tensor, window: tuple[float, float]) -> None:
    """Fail clearly if a guided sigma is not a sigma of the reference's trajectory."""
    traj = reference.trajectory
    hi, lo = window
    values = sigmas[:-1].tolist()  # one host read for the whole schedule
    missing = [s for s in values if lo <= s <= hi and not traj.contains(s)]
    if missing:
        meta = traj.meta
        raise ValueError(
            "Matching guidance: the reference was inverted on another schedule "
            f"(steps={meta.get('steps', '?')}, scheduler={meta.get('scheduler', '?')}, "
            f"sigmas {float(traj.sigmas[0]):.4f}..{float(traj.sigmas[-2]):.4f}); "
            f"this sampler's sigma {missing[0]:.4f} is not in it. Use the same steps and scheduler on "
            "'DDIM Invert Reference' and on the sampler, with denoise 1.0 (or re-invert the reference)."
        )


@torch.no_grad()
def sample_matching_guidance(model, x, sigmas, extra_args=None, callback=None, disable=None,
                             dm_guidance=None):
    """KSAMPLER function: deterministic Euler (= DDIM, eta 0) in sigma space with matching guidance.

    Unguided steps are bit-identical to ComfyUI's ``sample_euler`` (its ``ddim`` sampler). Guided
    steps route the model call through a ``sampler_calc_cond_batch_function`` so the guidance
    acts on the cond and uncond predictions separately *before* CFG, while ComfyUI still does
    inpainting masks, pre-/post-CFG functions and the CFG combination itself.
    """
    from tqdm.auto import trange

    spec: GuidanceSpec = dm_guidance
    extra_args = {} if extra_args is None else extra_args
    run = GuidanceRun(spec, model, x, extra_args)
    sampling.refuse_multigpu(model_patcher=run.model_patcher, model_options=extra_args.get("model_options"),
                             what="matching guidance")
    check_guidance_schedule(spec.reference, sigmas, run.window)
    checker = getattr(spec.reference, "check_model", None)
    if checker is not None and run.model_patcher is not None:
        checker(run.model_patcher)
    s_in = x.new_ones([x.shape[0]])
    base_options = extra_args.get("model_options", {})
    run.inner_calc = base_options.get("sampler_calc_cond_batch_function")
    values = sigmas.tolist()  # read once: a float() per step would be a host read per step
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma_hat = sigmas[i]
        if run.active(values[i]):
            hooked = {**base_options, "sampler_calc_cond_batch_function": run.calc_cond_batch}
            guided = {**extra_args, "model_options": hooked}
            denoised = model(x, sigma_hat * s_in, **guided)
        else:
            denoised = model(x, sigma_hat * s_in, **extra_args)
        d = sampling.to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def make_guidance_sampler(spec: GuidanceSpec):
    """The ``SAMPLER`` object for SamplerCustom(Advanced)."""
    return sampling.ksampler(sample_matching_guidance, extra_options={"dm_guidance": spec})


def guidance_sample(model_patcher, spec: GuidanceSpec, *, seed: int, steps: int, cfg: float, scheduler: str,
                    positive, negative, latent: dict, denoise: float) -> dict:
    """The KSampler-like node's body: schedule check, previews/progress, sample_custom."""
    sampling.refuse_multigpu(model_patcher=model_patcher, what="matching guidance")
    sigmas = sampling.ksampler_sigmas(model_patcher, steps, scheduler, denoise)
    ms = model_patcher.get_model_object("model_sampling")
    check_guidance_schedule(spec.reference, sigmas, guidance_window(ms, spec.start_percent, spec.end_percent))
    callback = sampling.progress_callback(model_patcher, len(sigmas) - 1)
    samples = sampling.sample_custom(model_patcher, make_guidance_sampler(spec), sigmas, positive, negative,
                                     latent, seed=seed, cfg=cfg, callback=callback)
    out = latent.copy()
    out["samples"] = samples
    return out
