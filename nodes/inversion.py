"""DDIM inversion of a reference latent in ComfyUI's sigma space, and its reconstruction check.

Runs through ComfyUI's own guider, so the user's LoRA, model patches, wrappers, hooks, model loading
and ``process_latent_in/out`` apply exactly as in KSampler. The step is derived in ``docs/method.md``
("Reference inversion and trajectory").
"""

from __future__ import annotations

import logging

import torch

from ..dreammatcher_core.trajectory import Trajectory
from .host import model as host_model
from .host import sampling
from .reference import Reference

log = logging.getLogger("dreammatcher")

#: Reconstruction errors above this are flagged in the UI text, unless the model's loader declares the
#: level its model reaches (``host.model.declared_inversion_error``): a small model can be far from an
#: SD checkpoint's few percent at its own recommended settings, and a warning about those would only
#: mislead.
WARN_ERROR = 0.05


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per-image ``||x - ref|| / ||ref||`` (float64)."""
    x, ref = x.double().flatten(1), ref.double().flatten(1)
    return ((x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).tolist()


class _TrajectoryRecorder:
    """Copies the latent at each sigma into one CPU buffer allocated once ([S, N, C, H, W]).

    Only the current latent stays on the device; the buffer is exactly the trajectory's size.
    """

    def __init__(self, n_sigmas: int, dtype: torch.dtype) -> None:
        self.n_sigmas, self.dtype = n_sigmas, dtype
        self.latents: torch.Tensor | None = None

    def record(self, index: int, x: torch.Tensor) -> None:
        if self.latents is None:
            self.latents = torch.empty((self.n_sigmas, *x.shape), dtype=self.dtype, device="cpu")
        self.latents[index].copy_(x)


def _inversion_sampler(recorder: _TrajectoryRecorder):
    """A KSAMPLER function that walks the schedule from sigma 0 up to sigma_max (DDIM inversion).

    Step sigma_lo -> sigma_hi: ``eps = (x - D(x, sigma_hi)) / sigma_hi`` and
    ``x <- x + (sigma_hi - sigma_lo) * eps``, i.e. the inverse of ComfyUI's "ddim" (deterministic
    euler) step with eps evaluated at the target level on the current latent (the MasaCtrl /
    official-code convention). ``D`` is the CFG-combined denoised prediction of the model with all
    its patches.
    """

    @torch.no_grad()
    def sample_dm_ddim_invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        last = len(sigmas) - 1
        recorder.record(last, x)  # sigma 0: the clean latent z0
        for step, i in enumerate(range(last - 1, -1, -1)):
            sampling.throw_if_interrupted()
            sigma_lo, sigma_hi = sigmas[i + 1], sigmas[i]
            denoised = model(x, sigma_hi * s_in, **extra_args)
            eps = (x - denoised) / sigma_hi
            x = x + eps * (sigma_hi - sigma_lo)
            recorder.record(i, x)
            if callback is not None:
                callback({"x": x, "i": step, "sigma": sigma_hi, "sigma_hat": sigma_hi, "denoised": denoised})
        return x

    return sample_dm_ddim_invert


def ddim_invert(model_patcher, latent: torch.Tensor, positive: list, negative: list, cfg: float,
                sigmas: torch.Tensor, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a VAE-space latent ``[N,C,H,W]`` along ``sigmas`` (descending, ending at 0).

    Returns ``(trajectory [S,N,C,H,W] on CPU in the model dtype, model space,
    inverted noise in VAE space)``. ``latents[i]`` is the latent at ``sigmas[i]``.
    """
    recorder = _TrajectoryRecorder(int(sigmas.shape[0]), host_model.trajectory_dtype(model_patcher))
    guider = sampling.cfg_guider(model_patcher, positive, negative, cfg)
    x_t = sampling.guider_sample(guider, latent, sampling.ksampler(_inversion_sampler(recorder)), sigmas,
                                 callback=callback)
    return recorder.latents, x_t


def ddim_reconstruct(model_patcher, noisy: torch.Tensor, positive: list, negative: list, cfg: float,
                     sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """Sample a VAE-space latent at ``sigmas[0]`` back to sigma 0 with ComfyUI's stock "ddim"."""
    guider = sampling.cfg_guider(model_patcher, positive, negative, cfg)
    return sampling.guider_sample(guider, noisy, sampling.stock_sampler("ddim"), sigmas, callback=callback)


def invert_reference(model, reference: dict, reference_positive: list, steps: int = 50,
                     scheduler: str = "ddim_uniform", cfg: float = 1.0, inversion_conditioning=None,
                     reference_negative=None) -> tuple:
    """DM_InvertReference's work: ``(Reference, inverted noise LATENT, reconstruction LATENT, text)``.

    Inverts along the sigmas KSampler uses for ``steps``/``scheduler``, reconstructs with stock
    "ddim" to measure the relative error, and bundles the trajectory with the reference prompts.
    """
    latent = reference["samples"]
    if getattr(latent, "is_nested", False) or latent.ndim != 4:
        raise ValueError(f"reference must be an image LATENT [N, C, H, W]; got {tuple(latent.shape)}.")
    if not bool(torch.count_nonzero(latent)):
        raise ValueError("The reference latent is all zeros; connect VAE Encode of the reference image.")
    prediction = host_model.prediction_type(model)
    sigmas = sampling.schedule_sigmas(model, steps, scheduler)
    if not bool((sigmas[:-1] > sigmas[1:]).all()) or float(sigmas[-1]) != 0.0:
        raise ValueError(f"The {scheduler} schedule with {steps} steps repeats sigmas; use fewer "
                         "steps or another scheduler.")
    inv_cond = inversion_conditioning or host_model.zero_conditioning_like(reference_positive)
    negative = reference_negative or inv_cond

    progress = sampling.progress_callback(model, 2 * steps)

    def inv_cb(i, x0, x, total):
        progress(i, x0, x, 2 * total)

    def rec_cb(i, x0, x, total):
        progress(i + total, x0, x, 2 * total)

    latents, x_t = ddim_invert(model, latent, inv_cond, negative, cfg, sigmas, callback=inv_cb)
    start = host_model.process_latent_out(model, latents[0].to(torch.float32))
    rec = ddim_reconstruct(model, start, inv_cond, negative, cfg, sigmas, callback=rec_cb).to("cpu")
    errors = relative_errors(host_model.process_latent_in(model, rec), latents[-1])

    latent_format, fingerprint = host_model.model_fingerprint(model)
    info = host_model.latent_format_info(model)
    meta = {
        "steps": int(steps), "scheduler": scheduler, "cfg": float(cfg), "prediction": prediction,
        "recon_error": max(errors), "recon_errors": ",".join(f"{e:.6g}" for e in errors),
        "latent_scale_factor": info["latent_scale_factor"],
        "latent_shift_factor": info["latent_shift_factor"],
        "inversion": "ddim-sigma-space/eps-at-target",
        "inversion_conditioning": "connected" if inversion_conditioning else "zero",
    }
    traj = Trajectory(sigmas=sigmas, latents=latents, latent_format=latent_format,
                      fingerprint=fingerprint, meta=meta)
    ref = Reference(traj, reference_positive, negative,
                    info={k: meta[k] for k in ("steps", "scheduler", "cfg", "recon_error", "prediction")})
    text = (f"DDIM inversion: {steps} steps ({scheduler}), cfg {cfg:g}, {latent.shape[0]} image(s), "
            f"{latent_format}. Reconstruction error: " + ", ".join(f"{e:.3%}" for e in errors))
    declared = host_model.declared_inversion_error(model)
    level = declared[0] if declared else WARN_ERROR
    if declared:
        why = f", {declared[1]}" if declared[1] else ""
        text += f" (this model: up to {level:.0%} expected{why})"
    if max(errors) > level:
        text += (" - high: use cfg 1, more steps, and the model/LoRA you sample with.")
    log.info("DreamMatcher: %s", text)
    out_noise = {"samples": x_t.to("cpu")}
    out_rec = {"samples": rec}
    return ref, out_noise, out_rec, text
