"""Calls into ComfyUI's sampling machinery: schedules, guiders, sampler objects, the model call of
a sampler function, conditioning processing, progress and interruption, and the refusals that must
happen before sampling starts.
"""

from __future__ import annotations

import torch

from . import require


def scheduler_names() -> list[str]:
    """The schedulers KSampler offers (the combo of DM_InvertReference)."""
    import comfy.samplers

    return list(comfy.samplers.KSampler.SCHEDULERS)


def schedule_sigmas(model_patcher, steps: int, scheduler: str) -> torch.Tensor:
    """The sigmas KSampler(sampler="ddim", scheduler, denoise=1) uses, bit for bit, on the CPU."""
    import comfy.samplers

    if scheduler not in comfy.samplers.KSampler.SCHEDULERS:
        raise ValueError(f"Unknown scheduler '{scheduler}'; choose one of {scheduler_names()}.")
    sampling = model_patcher.get_model_object("model_sampling")
    return comfy.samplers.calculate_sigmas(sampling, scheduler, int(steps)).to("cpu", torch.float32)


def ksampler_sigmas(model_patcher, steps: int, scheduler: str, denoise: float) -> torch.Tensor:
    """Exactly the sigmas the stock KSampler (sampler ddim) computes for (steps, scheduler, denoise)."""
    import comfy.samplers

    ks = comfy.samplers.KSampler(model_patcher, steps=steps, device=model_patcher.load_device,
                                 sampler="ddim", scheduler=scheduler, denoise=denoise,
                                 model_options=model_patcher.model_options)
    return ks.sigmas


def progress_callback(model_patcher, total_steps: int):
    """The node-level sampler callback KSampler uses: progress bar plus latent previews."""
    import latent_preview

    return latent_preview.prepare_callback(model_patcher, total_steps)


def progress_bar_disabled() -> bool:
    import comfy.utils

    return not comfy.utils.PROGRESS_BAR_ENABLED


def cfg_guider(model_patcher, positive: list, negative: list, cfg: float):
    """ComfyUI's ``CFGGuider`` for these conds (so LoRAs, patches, wrappers and hooks all apply)."""
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def guider_sample(guider, latent: torch.Tensor, sampler, sigmas: torch.Tensor, *, noise=None, callback=None,
                  seed: int = 0) -> torch.Tensor:
    """``guider.sample`` of a VAE-space latent (zero noise unless given), with ComfyUI's progress bar."""
    noise = torch.zeros_like(latent) if noise is None else noise
    return guider.sample(noise, latent, sampler, sigmas, callback=callback,
                         disable_pbar=progress_bar_disabled(), seed=seed)


def ksampler(fn, extra_options: dict | None = None):
    """A ``SAMPLER`` object for a sampler function ``fn(model, x, sigmas, extra_args, callback, disable)``."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(fn, extra_options=extra_options or {})


def stock_sampler(name: str):
    """One of ComfyUI's own samplers by name (e.g. ``"ddim"``)."""
    import comfy.samplers

    return comfy.samplers.sampler_object(name)


def sample_custom(model_patcher, sampler, sigmas: torch.Tensor, positive, negative, latent: dict, *,
                  seed: int, cfg: float, callback=None, disable_pbar: bool | None = None) -> torch.Tensor:
    """SamplerCustom's body: the latent's channels fixed, seeded noise, ``comfy.sample.sample_custom``."""
    import comfy.sample

    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, int(seed), latent.get("batch_index"))
    return comfy.sample.sample_custom(
        model_patcher, noise, cfg, sampler, sigmas, positive, negative, latent_image,
        noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=progress_bar_disabled() if disable_pbar is None else disable_pbar, seed=int(seed))


# ---- inside a sampler function --------------------------------------------------------------------
def sampler_parts(model_k) -> tuple:
    """``(guider, base model, model patcher)`` behind the ``model`` a sampler function receives."""
    guider = model_k.inner_model
    return guider, guider.inner_model, guider.model_patcher


def guider_conds(guider) -> dict:
    """The guider's processed ``positive`` / ``negative`` conds."""
    return guider.conds


def calc_cond_batch(base_model, conds: list, x: torch.Tensor, timestep: torch.Tensor, model_options: dict):
    """ComfyUI's own ``calc_cond_batch``: the per-cond predictions of one model evaluation."""
    import comfy.samplers

    return comfy.samplers.calc_cond_batch(base_model, conds, x, timestep, model_options)


def process_conds(base_model, x: torch.Tensor, positive: list | None, negative: list | None, device, *,
                  seed) -> dict:
    """Conditionings prepared the way a guider prepares its own (``{"positive": ..., "negative": ...}``
    for the kinds given), for model calls on ``x`` outside the guider's own batch."""
    import comfy.sampler_helpers
    import comfy.samplers

    raw = {}
    if positive:
        raw["positive"] = comfy.sampler_helpers.convert_cond(positive)
    if negative:
        raw["negative"] = comfy.sampler_helpers.convert_cond(negative)
    if not raw:
        return {}
    return comfy.samplers.process_conds(base_model, x, raw, device, latent_image=x, seed=seed)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """k-diffusion's derivative ``(x - denoised) / sigma``, exactly as ComfyUI's samplers compute it."""
    from comfy.k_diffusion.sampling import to_d as k_to_d

    return k_to_d(x, sigma, denoised)


def throw_if_interrupted() -> None:
    """Raise ComfyUI's interruption exception if the user pressed Cancel."""
    require("comfy.model_management", "throw_exception_if_processing_interrupted") \
        .throw_exception_if_processing_interrupted()


class MultiGPUUnsupported(RuntimeError):
    """ComfyUI's multi-GPU dispatch is on for a model that carries DreamMatcher."""


def refuse_multigpu(*, model_patcher=None, model_options: dict | None = None, what: str) -> None:
    """Stop before sampling when ComfyUI would split the model calls over several GPUs.

    Newer hosts run ``calc_cond_batch`` in one worker thread per GPU when the model carries
    multi-GPU clones (the "MultiGPU CFG Split" node adds them as additional models under the key
    ``multigpu``; sampling then puts them in ``model_options["multigpu_clones"]``). DreamMatcher's
    per-run state is not shared across those threads: the reference pass would run once per device,
    the correspondence of one device would be used by another and exact guidance would get no graph
    (the workers run under ``no_grad``). So it is refused, never run silently wrong. Hosts without
    multi-GPU dispatch have neither marker, and this is a no-op there.
    """
    clones = model_options.get("multigpu_clones") if model_options is not None else None
    extra = []
    if model_patcher is not None and hasattr(model_patcher, "get_additional_models_with_key"):
        extra = model_patcher.get_additional_models_with_key("multigpu")
    if clones or extra:
        raise MultiGPUUnsupported(
            f"DreamMatcher {what} does not support ComfyUI's multi-GPU dispatch: this model carries "
            "multi-GPU clones (from a 'MultiGPU CFG Split' node, multigpu work units). Remove that node "
            "from the model's path, or set its max_gpus to 1, and queue again. Nothing was sampled.")


