"""``DM_InvertReference`` ("DDIM Invert Reference") and the reference file nodes.

The inversion walks the *same* sigma schedule KSampler uses (bit for bit) from sigma 0 up to
sigma_max with the model's own denoised prediction (ComfyUI's CFGGuider: LoRA, patches and
hooks apply), recording the reference latent at every sigma. The result is a typed
``DM_REFERENCE`` that later nodes replay at each sampling step and that many target
generations reuse; its quality is shown as the relative error of a stock "ddim" reconstruction.
The work is :func:`..inversion.invert_reference`.

Input names and order are a public contract (saved workflows).
"""

from __future__ import annotations

from .host import require_node_api
from .host.sampling import scheduler_names
from .inversion import invert_reference
from .reference import Reference, list_files, resolve_file, save_path
from .sockets import CATEGORY, DMReference

api = require_node_api()
io, ui = api.io, api.ui

class InvertReference(io.ComfyNode):
    """DDIM-invert reference latents into a reusable DreamMatcher reference."""

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
                io.Combo.Input("scheduler", options=scheduler_names(), default="ddim_uniform", tooltip=(
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
        ref, noise, rec, text = invert_reference(model, reference, reference_positive, steps, scheduler, cfg,
                                                 inversion_conditioning, reference_negative)
        return io.NodeOutput(ref, noise, rec, ui=ui.PreviewText(text))


class SaveReference(io.ComfyNode):
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


class LoadReference(io.ComfyNode):
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
