"""``DM_InvertReference`` ("DDIM Invert Reference") and the reference file nodes.

The inversion walks the *same* sigma schedule KSampler uses (bit for bit) from sigma 0 up to
sigma_max with the model's own denoised prediction (ComfyUI's CFGGuider: LoRA, patches and
hooks apply), recording the reference latent at every sigma. The result is a typed
``DM_REFERENCE`` that later nodes replay at each sampling step and that many target
generations reuse; its quality is shown as the relative error of a stock "ddim" reconstruction.

Input names and order are a public contract (saved workflows).
"""

from __future__ import annotations

import logging

import torch

from ..dreammatcher_core.trajectory import Trajectory
from . import host
from .reference import Reference, list_files, resolve_file, save_path
from .types import CATEGORY, DMReference

api = host.require_node_api()
io, ui = api.io, api.ui
log = logging.getLogger("dreammatcher")

#: Reconstruction errors above this are flagged in the UI text.
WARN_ERROR = 0.05


def relative_errors(x: torch.Tensor, ref: torch.Tensor) -> list[float]:
    """Per-image ``||x - ref|| / ||ref||`` (float64)."""
    x, ref = x.double().flatten(1), ref.double().flatten(1)
    return ((x - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)).tolist()


class DM_InvertReference(io.ComfyNode):
    """DDIM-invert reference latents into a reusable DreamMatcher reference (method.md §1.2)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DM_InvertReference",
            display_name="DDIM Invert Reference",
            category=CATEGORY,
            description=(
                "DDIM-inverts the reference image(s) with the model (LoRA etc. included) and records the "
                "latent at every sigma of the schedule. Use the same steps and scheduler when sampling the "
                "targets. The node shows the reconstruction error: a few percent or less means a good "
                "inversion."
            ),
            inputs=[
                io.Model.Input("model", tooltip=(
                    "The model the targets will be sampled with, with the same LoRA / embeddings / patches "
                    "(an SD1.x, SD2.x or SDXL-family model).")),
                io.Latent.Input("reference", tooltip=(
                    "The reference image(s) as a LATENT from VAE Encode. A batch of N images gives N "
                    "reference trajectories (multi-reference).")),
                io.Conditioning.Input("reference_positive", tooltip=(
                    "The reference prompt the reference branch uses while the targets are sampled, e.g. "
                    "'a photo of a sks dog' or 'a photo of embedding:my_cat'. Stored in the reference.")),
                io.Int.Input("steps", default=50, min=1, max=1000, tooltip=(
                    "Inversion steps. Must equal the steps of the sampler that uses this reference "
                    "(the paper uses 50).")),
                io.Combo.Input("scheduler", options=host.scheduler_names(), default="ddim_uniform", tooltip=(
                    "Sigma schedule. Must equal the scheduler of the sampler that uses this reference "
                    "(ddim_uniform matches the official DDIM schedule).")),
                io.Float.Input("cfg", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip=(
                    "CFG scale while inverting. 1.0 (no guidance) is the exact official behaviour and "
                    "reconstructs best; above 1 the inversion is pushed by "
                    "inversion_conditioning versus reference_negative.")),
                io.Conditioning.Input("inversion_conditioning", optional=True, tooltip=(
                    "Prompt used while inverting. Leave empty for an all-zero (unconditional) context; "
                    "connect a CLIP Text Encode with an EMPTY prompt for the exact official behaviour.")),
                io.Conditioning.Input("reference_negative", optional=True, tooltip=(
                    "Negative prompt of the reference branch (UNCOND chunks while sampling, and the "
                    "uncond of the inversion when cfg > 1). Defaults to inversion_conditioning.")),
            ],
            outputs=[
                # The input is already called "reference" (public contract) and V3 needs unique ids.
                DMReference.Output("dm_reference", display_name="reference",
                                   tooltip="The DreamMatcher reference (trajectory + prompts)."),
                io.Latent.Output("inverted_noise", tooltip="The fully inverted latent x_T (VAE space)."),
                io.Latent.Output("reconstruction", tooltip=(
                    "The stock 'ddim' reconstruction from x_T; decode it to judge the inversion.")),
            ],
        )

    @classmethod
    def execute(cls, model, reference, reference_positive, steps=50, scheduler="ddim_uniform", cfg=1.0,
                inversion_conditioning=None, reference_negative=None) -> io.NodeOutput:
        latent = reference["samples"]
        if getattr(latent, "is_nested", False) or latent.ndim != 4:
            raise ValueError(f"reference must be an image LATENT [N, C, H, W]; got {tuple(latent.shape)}.")
        if not bool(torch.count_nonzero(latent)):
            raise ValueError("The reference latent is all zeros; connect VAE Encode of the reference image.")
        prediction = host.prediction_type(model)
        sigmas = host.schedule_sigmas(model, steps, scheduler)
        if not bool((sigmas[:-1] > sigmas[1:]).all()) or float(sigmas[-1]) != 0.0:
            raise ValueError(f"The {scheduler} schedule with {steps} steps repeats sigmas; use fewer "
                             "steps or another scheduler.")
        inv_cond = inversion_conditioning or host.zero_conditioning_like(reference_positive)
        negative = reference_negative or inv_cond

        progress = host.progress_callback(model, 2 * steps)

        def inv_cb(i, x0, x, total):
            progress(i, x0, x, 2 * total)

        def rec_cb(i, x0, x, total):
            progress(i + total, x0, x, 2 * total)

        latents, x_t = host.ddim_invert(model, latent, inv_cond, negative, cfg, sigmas, callback=inv_cb)
        start = host.process_latent_out(model, latents[0].to(torch.float32))
        rec = host.ddim_reconstruct(model, start, inv_cond, negative, cfg, sigmas, callback=rec_cb).to("cpu")
        errors = relative_errors(host.process_latent_in(model, rec), latents[-1])

        latent_format, fingerprint = host.model_fingerprint(model)
        info = host.latent_format_info(model)
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
        if max(errors) > WARN_ERROR:
            text += (" - high: use cfg 1, more steps, and the model/LoRA you sample with.")
        log.info("DreamMatcher: %s", text)
        out_noise = {"samples": x_t.to("cpu")}
        out_rec = {"samples": rec}
        return io.NodeOutput(ref, out_noise, out_rec, ui=ui.PreviewText(text))


class DM_SaveReference(io.ComfyNode):
    """Write a reference to ``output/dreammatcher/<name>_NNNNN.dm.safetensors``."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DM_SaveReference",
            display_name="Save DreamMatcher Reference",
            category=CATEGORY,
            description="Saves a DreamMatcher reference (safetensors) in output/dreammatcher.",
            inputs=[
                DMReference.Input("reference", tooltip="The reference from DDIM Invert Reference."),
                io.String.Input("filename_prefix", default="dreammatcher/reference", tooltip=(
                    "File name; a counter and .dm.safetensors are appended. Saved in output/dreammatcher/; "
                    "other folders and '..' are refused.")),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, reference, filename_prefix="dreammatcher/reference") -> io.NodeOutput:
        path = save_path(filename_prefix)
        reference.save(path)
        text = f"Saved {path.parent.name}/{path.name} (load it with Load DreamMatcher Reference)."
        return io.NodeOutput(ui=ui.PreviewText(text))


class DM_LoadReference(io.ComfyNode):
    """Load and validate a saved reference from the output or input folder."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DM_LoadReference",
            display_name="Load DreamMatcher Reference",
            category=CATEGORY,
            description=(
                "Loads a DreamMatcher reference (*.dm.safetensors) from output/dreammatcher, "
                "input/dreammatcher or input. The file is fully validated; whether it fits the model is "
                "checked when sampling."
            ),
            inputs=[
                io.Combo.Input("reference_file", options=list_files(), tooltip=(
                    "A saved reference. Files in output/dreammatcher, input/dreammatcher and input are "
                    "listed (refresh after saving).")),
            ],
            outputs=[DMReference.Output("reference", tooltip="The loaded DreamMatcher reference.")],
        )

    @classmethod
    def fingerprint_inputs(cls, reference_file):
        try:
            st = resolve_file(reference_file).stat()
            return f"{reference_file}:{st.st_mtime_ns}:{st.st_size}"
        except ValueError:
            return reference_file

    @classmethod
    def execute(cls, reference_file) -> io.NodeOutput:
        ref = Reference.load(resolve_file(reference_file))
        t = ref.trajectory
        text = (f"{reference_file}: {t.batch} image(s), {t.latent_format}, {t.steps} steps "
                f"({t.meta.get('scheduler', '?')}), reconstruction error "
                f"{float(t.meta.get('recon_error', float('nan'))):.3%}.")
        return io.NodeOutput(ref, ui=ui.PreviewText(text))


NODES = [DM_InvertReference, DM_SaveReference, DM_LoadReference]
