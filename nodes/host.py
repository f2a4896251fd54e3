"""The one module of the pack that talks to ComfyUI internals.

Everything version-sensitive lives here: the node API import, model introspection (latent
format, prediction type, sigma schedules), sampler plumbing, block discovery and attention
patch installation, and the gradient escape from ``torch.inference_mode``. The node modules
call these helpers and never import ``comfy.*`` themselves, so a ComfyUI update that moves an
internal breaks exactly one file, with a clear message.

Tested against ComfyUI 0.3.75 (the oldest supported version, see ``pyproject.toml``) and 0.28.2 (the
newest tested one). Where the two differ, the helpers here read what the host provides (an option in
``extra_options``, a marker in ``model_options``) instead of its version number.
"""

from __future__ import annotations

import importlib
from types import ModuleType

MIN_COMFYUI = "0.3.75"


class HostAPIError(RuntimeError):
    """A ComfyUI API this pack relies on is missing or changed."""


def _update_hint(what: str) -> str:
    return (
        f"DreamMatcher needs {what}, which this ComfyUI does not provide. "
        f"Please update ComfyUI to {MIN_COMFYUI} or newer (git pull / ComfyUI-Manager 'Update ComfyUI')."
    )


def require(module: str, *attrs: str) -> ModuleType:
    """Import a host module and check that it exposes ``attrs``; raise an actionable error if not."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise HostAPIError(_update_hint(f"the module '{module}'")) from exc
    for attr in attrs:
        if not hasattr(mod, attr):
            raise HostAPIError(_update_hint(f"'{module}.{attr}'"))
    return mod


def require_node_api() -> ModuleType:
    """Return ``comfy_api.latest`` (the V3 node API)."""
    return require("comfy_api.latest", "ComfyExtension", "io", "ui")


# ---- inversion (DM_InvertReference) and reference files (DM_Save/LoadReference) ----
# Model introspection, the exact KSampler schedule, the DDIM inversion sampler and the
# reconstruction check. Everything runs through ComfyUI's own CFGGuider, so the user's LoRA,
# model patches, wrappers, hooks, model loading/offloading and process_latent_in/out apply
# exactly as in KSampler.

from pathlib import Path  # noqa: E402

import torch  # noqa: E402

#: unet_config keys that do not describe the architecture (precision, runtime flags).
_NOT_LAYOUT = {"dtype", "device", "operations", "use_checkpoint", "image_size"}


def model_fingerprint(model_patcher) -> tuple[str, str]:
    """Return ``(latent_format_name, fingerprint)`` describing the model family and UNet layout.

    The fingerprint ignores weights and precision (a LoRA or an fp16 copy of a model may reuse
    a reference) but changes with the architecture (SD1.5 vs SD2 vs SDXL layouts), whose
    latents and attention shapes are incompatible.
    """
    import hashlib
    import json

    model = model_patcher.model
    latent = type(model.latent_format).__name__
    cfg = dict(getattr(getattr(model, "model_config", None), "unet_config", None) or {})
    layout = {k: v for k, v in cfg.items() if k not in _NOT_LAYOUT}
    digest = hashlib.sha1(json.dumps(layout, sort_keys=True, default=str).encode()).hexdigest()[:12]
    mult = "-".join(str(m) for m in layout.get("channel_mult", []) or [])
    fp = (f"{latent}/{type(model).__name__}/ch{layout.get('model_channels', '?')}x[{mult}]"
          f"/ctx{layout.get('context_dim', '?')}/{digest}")
    return latent, fp


def latent_format_info(model_patcher) -> dict[str, float | str]:
    """Latent format name and its process_latent_in scale/shift (recorded in the trajectory)."""
    fmt = model_patcher.model.latent_format
    return {"latent_format": type(fmt).__name__, "latent_scale_factor": float(fmt.scale_factor),
            "latent_shift_factor": float(getattr(fmt, "shift_factor", 0.0) or 0.0)}


def prediction_type(model_patcher) -> str:
    """Prediction type of the model *as sampled* (honours ModelSamplingDiscrete patches).

    Raises a clear ValueError for model samplings the inversion does not support.
    """
    import comfy.model_sampling as ms

    sampling = model_patcher.get_model_object("model_sampling")
    # All of these keep latents as x = x0 + sigma * eps, for which the DDIM (euler) inversion
    # below is valid; flow models ("CONST": SD3, Flux...) are refused.
    for kind in ("EDM", "V_PREDICTION", "X0", "EPS"):
        if isinstance(sampling, getattr(ms, kind, ())):
            return {"V_PREDICTION": "v", "EDM": "edm", "X0": "x0", "EPS": "eps"}[kind]
    raise ValueError(
        f"DDIM Invert Reference supports eps- and v-prediction diffusion models (SD1.x, SD2.x, SDXL); "
        f"this model samples with {type(sampling).__name__}, which it cannot invert. Use an "
        "SD1.5/SD2/SDXL-family checkpoint."
    )


def trajectory_dtype(model_patcher) -> torch.dtype:
    """The dtype a trajectory is stored in: the model's dtype, or its compute dtype for fp8 weights."""
    ok = (torch.float32, torch.float16, torch.bfloat16)
    dtype = model_patcher.model_dtype()
    if dtype in ok:
        return dtype
    cast = getattr(model_patcher.model, "manual_cast_dtype", None)
    return cast if cast in ok else torch.float32


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


def process_latent_in(model_patcher, latent: torch.Tensor) -> torch.Tensor:
    """VAE space -> model space (what CFGGuider does before sampling)."""
    return model_patcher.model.process_latent_in(latent)


def process_latent_out(model_patcher, latent: torch.Tensor) -> torch.Tensor:
    """Model space -> VAE space (what CFGGuider does after sampling)."""
    return model_patcher.model.process_latent_out(latent)


def zero_conditioning_like(conditioning: list) -> list:
    """An all-zero text context shaped like ``conditioning`` (ComfyUI's ConditioningZeroOut idea).

    Only the first entry is used; a ``pooled_output`` is zeroed too (SDXL needs one). This is
    the fallback "unconditional" inversion prompt; an empty-prompt CLIPTextEncode is the exact
    official behaviour (the empty prompt does not encode to zeros).
    """
    if not conditioning:
        raise ValueError("reference_positive is an empty CONDITIONING; connect a CLIPTextEncode.")
    tensor, extra = conditioning[0][0], conditioning[0][1]
    out = {}
    if isinstance(extra.get("pooled_output"), torch.Tensor):
        out["pooled_output"] = torch.zeros_like(extra["pooled_output"])
    return [[torch.zeros_like(tensor), out]]


def progress_callback(model_patcher, total_steps: int):
    """The node-level sampler callback KSampler uses: progress bar plus latent previews."""
    import latent_preview

    return latent_preview.prepare_callback(model_patcher, total_steps)


def progress_bar_disabled() -> bool:
    import comfy.utils

    return not comfy.utils.PROGRESS_BAR_ENABLED


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
    official-code convention, method.md §1.2). ``D`` is the CFG-combined denoised prediction of
    the model with all its patches.
    """
    import comfy.model_management as mm

    @torch.no_grad()
    def sample_dm_ddim_invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        extra_args = {} if extra_args is None else extra_args
        s_in = x.new_ones([x.shape[0]])
        last = len(sigmas) - 1
        recorder.record(last, x)  # sigma 0: the clean latent z0
        for step, i in enumerate(range(last - 1, -1, -1)):
            mm.throw_exception_if_processing_interrupted()
            sigma_lo, sigma_hi = sigmas[i + 1], sigmas[i]
            denoised = model(x, sigma_hi * s_in, **extra_args)
            eps = (x - denoised) / sigma_hi
            x = x + eps * (sigma_hi - sigma_lo)
            recorder.record(i, x)
            if callback is not None:
                callback({"x": x, "i": step, "sigma": sigma_hi, "sigma_hat": sigma_hi, "denoised": denoised})
        return x

    return sample_dm_ddim_invert


def _guider(model_patcher, positive: list, negative: list, cfg: float):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(model_patcher)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def ddim_invert(model_patcher, latent: torch.Tensor, positive: list, negative: list, cfg: float,
                sigmas: torch.Tensor, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert a VAE-space latent ``[N,C,H,W]`` along ``sigmas`` (descending, ending at 0).

    Returns ``(trajectory [S,N,C,H,W] on CPU in the model dtype, model space,
    inverted noise in VAE space)``. ``latents[i]`` is the latent at ``sigmas[i]``.
    """
    import comfy.samplers

    recorder = _TrajectoryRecorder(int(sigmas.shape[0]), trajectory_dtype(model_patcher))
    sampler = comfy.samplers.KSAMPLER(_inversion_sampler(recorder))
    guider = _guider(model_patcher, positive, negative, cfg)
    x_t = guider.sample(torch.zeros_like(latent), latent, sampler, sigmas, callback=callback,
                        disable_pbar=progress_bar_disabled(), seed=0)
    return recorder.latents, x_t


def ddim_reconstruct(model_patcher, noisy: torch.Tensor, positive: list, negative: list, cfg: float,
                     sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """Sample a VAE-space latent at ``sigmas[0]`` back to sigma 0 with ComfyUI's stock "ddim"."""
    import comfy.samplers

    guider = _guider(model_patcher, positive, negative, cfg)
    return guider.sample(torch.zeros_like(noisy), noisy, comfy.samplers.sampler_object("ddim"), sigmas,
                         callback=callback, disable_pbar=progress_bar_disabled(), seed=0)


def reference_roots() -> dict[str, Path]:
    """ComfyUI's output and input folders (the roots DM_Save/LoadReference work under)."""
    import folder_paths

    return {"output": Path(folder_paths.get_output_directory()),
            "input": Path(folder_paths.get_input_directory())}


# ---- AMA model patch (DM_AMAPatch) ----------------------------------------------------------------
# Block discovery, attention-replace installation that wraps/delegates, keyed wrappers and the
# attention kernel, for nodes/ama.py and nodes/ama_runtime.py (which never import comfy.*).

from dataclasses import dataclass as _ama_dataclass  # noqa: E402

#: Key under which the AMA patch registers its patcher wrappers (``add_wrapper_with_key``).
AMA_WRAPPER_KEY = "dreammatcher_ama"


@_ama_dataclass(frozen=True)
class AttnBlock:
    """One UNet block that holds a SpatialTransformer.

    ``factor`` is the latent downsampling factor at its attention (1 = latent grid), ``depth`` the
    number of BasicTransformerBlocks (the ``transformer_index`` of 3-tuple replace keys runs over
    ``range(depth)``), ``cross`` whether attn2 attends to a text context.
    """

    name: str
    id: int
    depth: int
    factor: int
    cross: bool


@_ama_dataclass(frozen=True)
class UNetLayout:
    """The attention/feature geometry of an SD-style UNet, read from the modules themselves.

    ``family`` is ``"sd15"`` when attention exists at the latent resolution (SD1.x/2.x layout) and
    ``"sdxl"`` when the finest attention level is at factor 2 (SDXL layout); defaults per family are
    chosen in nodes/ama_runtime.py. ``output_factor[k]`` is the factor of the *output* of output
    block k (after its upsampler), which is what ``output_block_patch`` sees as ``h`` at block k+1.
    """

    family: str
    blocks: tuple[AttnBlock, ...]
    output_factor: tuple[int, ...]
    output_channels: tuple[int, ...]

    def block(self, name: str, id: int) -> AttnBlock | None:
        for b in self.blocks:
            if b.name == name and b.id == id:
                return b
        return None

    def decoder(self) -> tuple[AttnBlock, ...]:
        return tuple(b for b in self.blocks if b.name == "output")


def unet_layout(model_patcher) -> UNetLayout:
    """Discover attention blocks, their resolutions and transformer depths from the model's modules.

    WHY from modules: the block ids, depths and resolutions of SD1.5 and SDXL (and of narrow test
    models with those layouts) differ; reading them avoids hard-coded tables that would silently
    mis-key a replace on another UNet.
    """
    import comfy.ldm.modules.attention as attention
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai

    unet = getattr(getattr(model_patcher, "model", None), "diffusion_model", None)
    if unet is None or not hasattr(unet, "output_blocks") or not hasattr(unet, "input_blocks"):
        raise ValueError(
            "DreamMatcher's AMA patch needs an SD1.x/SD2.x/SDXL-style UNet (input/middle/output "
            "blocks); this MODEL has another architecture (e.g. a DiT such as Flux or SD3)."
        )

    def transformer_of(module):
        for m in module:
            if isinstance(m, attention.SpatialTransformer):
                return m
        return None

    blocks: list[AttnBlock] = []

    def add(name: str, id: int, module, factor: int) -> None:
        st = transformer_of(module)
        if st is not None:
            tb = st.transformer_blocks
            cross = getattr(tb[0], "attn2", None) is not None
            blocks.append(AttnBlock(name, id, len(tb), factor, cross))

    factor = 1
    for i, module in enumerate(unet.input_blocks):
        add("input", i, module, factor)
        if any(isinstance(m, oai.Downsample) for m in module):
            factor *= 2
    if unet.middle_block is not None:
        add("middle", 0, unet.middle_block, factor)
    out_factor: list[int] = []
    out_ch: list[int] = []
    for i, module in enumerate(unet.output_blocks):
        add("output", i, module, factor)
        if any(isinstance(m, oai.Upsample) for m in module):
            factor //= 2
        out_factor.append(factor)
        ch = None
        for m in module:
            for p in ("out_channels", "channels", "in_channels"):
                if isinstance(getattr(m, p, None), int):
                    ch = getattr(m, p)
                    break
        out_ch.append(int(ch or 0))
    family = "sd15" if any(b.factor == 1 for b in blocks) else "sdxl"
    return UNetLayout(family, tuple(blocks), tuple(out_factor), tuple(out_ch))


def attention_kernel():
    """ComfyUI's ``optimized_attention`` (the kernel vanilla CrossAttention calls), looked up per call
    so a kernel chosen at start-up (sage/xformers/SDPA/...) is honoured."""
    return require("comfy.ldm.modules.attention", "optimized_attention").optimized_attention


#: Keys of an attention patch's ``extra_options`` that vanilla ``CrossAttention`` passes to its kernel
#: as keyword arguments. ``attn_precision`` exists on every supported host; ``preferred_attention``
#: (a per-layer kernel choice, e.g. a quantised attention from a checkpoint's config) appears on
#: newer hosts. A key the host does not put into ``extra_options`` is simply not forwarded, so the
#: same call is right on hosts with and without it.
_KERNEL_OPTIONS = ("attn_precision", "preferred_attention")


def call_attention(q, k, v, extra_options: dict):
    """Run attention exactly as the vanilla layer would: same kernel, heads, precision and per-layer
    kernel preference, with ``extra_options`` as ``transformer_options`` (kernel overrides read it).

    Every attention call the pack makes itself goes through here, so strength 0 stays bit-identical
    to vanilla whatever the host forwards to its kernels."""
    kw = {name: extra_options[name] for name in _KERNEL_OPTIONS if name in extra_options}
    kw.setdefault("attn_precision", None)
    return attention_kernel()(q, k, v, extra_options["n_heads"], transformer_options=extra_options, **kw)


def existing_attn_replace(model_options: dict, attn: str, key3: tuple):
    """The replace ComfyUI would call today for ``key3`` = (block, id, transformer_index): the 3-tuple
    key first, then the 2-tuple key it shadows (BasicTransformerBlock.forward's lookup order)."""
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(attn, {})
    fn = table.get(tuple(key3))
    return fn if fn is not None else table.get(tuple(key3[:2]))


def attn_replace_table(transformer_options: dict, attn: str) -> dict:
    """``transformer_options["patches_replace"][attn]`` (read-only view; empty dict if absent)."""
    return transformer_options.get("patches_replace", {}).get(attn, {})


def set_attn_replace(model_patcher, attn: str, key3: tuple, fn) -> None:
    """Install ``fn`` as the attn1/attn2 replace on the 3-tuple key (on a clone the caller made)."""
    name, number, index = key3
    model_patcher.set_model_patch_replace(fn, attn, name, number, index)


def add_output_block_patch(model_patcher, fn) -> None:
    """``fn(h, hsp, transformer_options) -> (h, hsp)`` at the start of every output block."""
    model_patcher.set_model_output_block_patch(fn)


def add_keyed_wrapper(model_patcher, kind: str, key: str, fn) -> None:
    """Register ``fn(executor, *args, **kw)`` as a keyed WrappersMP wrapper (``kind``: outer_sample,
    apply_model, diffusion_model, ...). Keyed wrappers chain with other packs' wrappers."""
    mp = require("comfy.patcher_extension", "WrappersMP")
    model_patcher.add_wrapper_with_key(getattr(mp.WrappersMP, kind.upper()), key, fn)


def has_keyed_wrapper(model_patcher, kind: str, key: str) -> bool:
    mp = require("comfy.patcher_extension", "WrappersMP")
    return bool(model_patcher.get_wrappers(getattr(mp.WrappersMP, kind.upper()), key))


def percent_to_sigma(model_patcher, percent: float) -> float:
    """ComfyUI's own start/end-percent semantics (as ControlNet's timestep range uses them)."""
    return float(model_patcher.get_model_object("model_sampling").percent_to_sigma(float(percent)))


def model_dtype(model_patcher):
    return model_patcher.model_dtype()


def outer_sample_model_options(executor) -> dict:
    """The run-local ``model_options`` of the guider an OUTER_SAMPLE wrapper wraps (a per-run copy
    made by ``CFGGuider.sample``; everything the sampler and the UNet see derives from it)."""
    return executor.class_obj.model_options


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


def throw_if_interrupted() -> None:
    require("comfy.model_management", "throw_exception_if_processing_interrupted") \
        .throw_exception_if_processing_interrupted()


# ---- matching guidance (DM_MatchingGuidanceSampler) -----------------------------------------------
# Owner: guidance. Semantic matching guidance (method.md §6) as a ComfyUI sampler function.
#
# Parametrisation (derived once here, used by every function below). ComfyUI's latent at noise
# level sigma is the variance-exploding x = x0 + sigma*eps, while the UNet (and the official code)
# sees z_t = x * sqrt(abar) with abar = 1 / (1 + sigma^2), so sqrt(1 - abar) = sigma * sqrt(abar).
# The official update is  eps_branch -= lambda_g * sqrt(1 - abar) * dL/dz_t  where the loss sees
# x0 = (z_t_detached - sqrt(1-abar) eps(z_t)) / sqrt(abar) = x_detached - sigma * eps(x): the same x0
# ComfyUI writes, with the gradient flowing through eps only. Because z_t = sqrt(abar) x,
# dL/dz_t = dL/dx / sqrt(abar), hence
#     sqrt(1 - abar) * dL/dz_t = sigma * sqrt(abar) * dL/dx / sqrt(abar) = sigma * dL/dx
#     eps_branch -= lambda_g * sigma * dL/dx
#     denoised_branch = x - sigma * eps_branch  ->  denoised_branch += lambda_g * sigma^2 * dL/dx
# and CFG is applied afterwards to the guided branches, as in the official code.
# Fast mode replaces dL/dx (a UNet backward) by its value when the clean estimate is held constant,
# d eps/dx = I/sigma, i.e. dL/dx = -dL/dx0 in closed form: denoised -= lambda * sigma^2 * dL/dx0
# (dreammatcher_core.guidance.fast_guided_denoised). Same sign and sigma^2 scale as the exact mode;
# the exact mode's true Jacobian shrinks the pull where the model reacts to its input.

import math  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402


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
    loss: str = "official"
    #: Optional observer ``probe(info: dict)`` called once per guided branch (tests, diagnostics).
    probe: object = None

    def __deepcopy__(self, memo: dict) -> GuidanceSpec:
        return self


def _constant_copy(t):
    # Detaching keeps the weights constants of the graph, so only x-dependent activations are saved and
    # no .grad ever reaches a parameter. Usually cast_bias_weight has already made a fresh normal-mode
    # copy. Hosts that stream weights (dynamic VRAM) hand the weight functions cached views created
    # under inference mode, without a copy: autograd cannot save those for backward, so they are
    # cloned here (outside inference mode a clone is an ordinary tensor; the cached view is untouched).
    return t.clone() if t.is_inference() else t.detach()


#: What torch says when code writes in place into an inference tensor outside inference mode.
_INPLACE_INFERENCE = "Inplace update to inference tensor outside InferenceMode"


class ExactGuidanceUnavailable(RuntimeError):
    """The host's weight loading does not allow a backward pass through the UNet right now."""


def _exact_unavailable_message() -> str:
    return (
        "DreamMatcher matching guidance (mode 'exact') needs a backward pass through the UNet, but this "
        "ComfyUI casts the model's weights into a persistent buffer that was made for inference only "
        "(the model is partially offloaded and weights are streamed through async offload buffers). "
        "Nothing was changed. Fixes, in order of preference: set the sampler's mode to 'fast' (no "
        "backward pass); or free VRAM so the model loads fully (smaller batch or image, "
        "--highvram / --gpu-only); or start ComfyUI with --disable-async-offload."
    )


@contextmanager
def grad_escape(diffusion_model):
    """Let autograd run through a ComfyUI model whose weights are inference tensors.

    comfyui-host.md §4.4: every prompt runs under ``torch.inference_mode`` and the weights loaded
    there are inference tensors, which autograd refuses to save for backward. Giving every comfy
    op a *per-instance* pass-through ``weight_function``/``bias_function`` makes ``cast_bias_weight``
    copy the weight in normal mode for each call, so the graph holds ordinary tensors. The
    attributes are restored in ``finally``; the class-level lists are shared by every model and
    are never touched.
    """
    saved = []
    try:
        for module in diffusion_model.modules():
            if not hasattr(module, "comfy_cast_weights"):
                continue
            own = module.__dict__
            saved.append((module, own.get("weight_function", _MISSING), own.get("bias_function", _MISSING)))
            module.weight_function = [*module.weight_function, _constant_copy]
            module.bias_function = [*module.bias_function, _constant_copy]
        with torch.inference_mode(False), torch.enable_grad():
            try:
                yield
            except RuntimeError as exc:
                if _INPLACE_INFERENCE in str(exc):
                    raise ExactGuidanceUnavailable(_exact_unavailable_message()) from exc
                raise
    finally:
        for module, wf, bf in saved:
            for name, old in (("weight_function", wf), ("bias_function", bf)):
                if old is _MISSING:
                    module.__dict__.pop(name, None)
                else:
                    setattr(module, name, old)


_MISSING = object()


class _FeatureTap:
    """``output_block_patch`` that keeps (detached) outputs of chosen decoder blocks per branch.

    The output of output block ``i`` arrives as ``h`` in the patch of block ``i + 1``
    (comfyui-host.md §3.3). Rows are split into chunks by ``cond_or_uncond`` (never by position)
    and stored as ``feats[branch][block]``.
    """

    def __init__(self, layers: tuple[int, ...]) -> None:
        self.layers = tuple(layers)
        self.feats: dict[int, dict[int, torch.Tensor]] = {}

    def __call__(self, h, hsp, transformer_options):
        block = transformer_options.get("block", (None, -1))
        if block[0] == "output" and block[1] - 1 in self.layers:
            labels = list(transformer_options.get("cond_or_uncond", [0]))
            rows = h.shape[0] // max(1, len(labels))
            for c, branch in enumerate(labels):
                self.feats.setdefault(branch, {})[block[1] - 1] = h[c * rows:(c + 1) * rows].detach()
        return h, hsp

    def __deepcopy__(self, memo: dict) -> _FeatureTap:
        return self


def _with_output_patch(model_options: dict, patch) -> dict:
    """A copy of ``model_options`` with ``patch`` appended to ``output_block_patch`` (no mutation)."""
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["output_block_patch"] = [*patches.get("output_block_patch", []), patch]
    to["patches"] = patches
    mo["transformer_options"] = to
    return mo


def guidance_window(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(sigma_high, sigma_low): a step at sigma is guided when sigma_low <= sigma <= sigma_high.

    ComfyUI's percent convention (as ControlNet's start/end): 0.08 of a 50-step ddim_uniform
    schedule first guides official step 4 (t=901), exactly the official ``mg_initial_step``.
    """
    hi = float(model_sampling.percent_to_sigma(start_percent))
    return hi, float(model_sampling.percent_to_sigma(end_percent))


def check_guidance_schedule(reference, sigmas: torch.Tensor, window: tuple[float, float]) -> None:
    """Fail clearly if a guided sigma is not a sigma of the reference's trajectory."""
    traj = reference.trajectory
    hi, lo = window
    missing = [float(s) for s in sigmas[:-1] if lo <= float(s) <= hi and not traj.contains(float(s))]
    if missing:
        meta = traj.meta
        raise ValueError(
            "Matching guidance: the reference was inverted on another schedule "
            f"(steps={meta.get('steps', '?')}, scheduler={meta.get('scheduler', '?')}, "
            f"sigmas {float(traj.sigmas[0]):.4f}..{float(traj.sigmas[-2]):.4f}); "
            f"this sampler's sigma {missing[0]:.4f} is not in it. Use the same steps and scheduler on "
            "'DDIM Invert Reference' and on the sampler, with denoise 1.0 (or re-invert the reference)."
        )


class _GuidanceRun:
    """Per-sampling-run state of the guidance sampler (built inside the sampler function)."""

    def __init__(self, spec: GuidanceSpec, model_k, x: torch.Tensor, extra_args: dict) -> None:
        import comfy.samplers

        self.spec = spec
        self.guider = model_k.inner_model
        self.base = self.guider.inner_model
        self.device = x.device
        self.seed = extra_args.get("seed")
        self.window = guidance_window(self.base.model_sampling, spec.start_percent, spec.end_percent)
        if spec.feature_layers:
            self.layers = spec.feature_layers
        else:  # the same per-layout default the AMA patch and the inspector use
            from . import ama_runtime

            self.layers = ama_runtime.default_feature_layers(unet_layout(self.guider.model_patcher))
        self.calc = comfy.samplers.calc_cond_batch
        self._ref_conds: list | None = None
        self.last: dict = {}
        self.batch = x.shape[0]
        self.inner_calc = None
        self.source = "own"

    def active(self, sigma: float) -> bool:
        hi, lo = self.window
        return self.spec.scale != 0.0 and lo <= sigma <= hi and sigma > 0.0

    # -- reference side ---------------------------------------------------------------------------
    def ref_conds(self, ref_x: torch.Tensor) -> list:
        """The reference's own conditioning, processed once per run like ComfyUI's (cond, uncond)."""
        if self._ref_conds is None:
            import comfy.sampler_helpers
            import comfy.samplers

            ref = self.spec.reference
            pos = ref.positive or None
            neg = ref.negative or None
            raw = {}
            if pos:
                raw["positive"] = comfy.sampler_helpers.convert_cond(pos)
            if neg:
                raw["negative"] = comfy.sampler_helpers.convert_cond(neg)
            done = comfy.samplers.process_conds(self.base, ref_x, raw, self.device, latent_image=ref_x,
                                                seed=self.seed) if raw else {}
            # Fallback when the reference carries no conditioning of a kind: the target's own.
            self._ref_conds = [done.get("positive", self.guider.conds.get("positive")),
                               done.get("negative", self.guider.conds.get("negative"))]
        return self._ref_conds

    def reference_features(self, sigma: float, branches: list[int], model_options: dict) -> dict:
        """Decoder features of the reference latent at ``sigma`` with its own prompts, per branch."""
        traj = self.spec.reference.trajectory
        ref_x = traj.at(sigma).to(self.device)
        conds = self.ref_conds(ref_x)
        tap = _FeatureTap(self.layers)
        from . import ama_runtime

        mo = _with_output_patch(ama_runtime.without_run(model_options), tap)
        run = [conds[k] if k in branches else None for k in (0, 1)]
        sig = torch.full((ref_x.shape[0],), sigma, device=self.device, dtype=torch.float32)
        with torch.no_grad():
            self.calc(self.base, run, ref_x, sig, mo)
        return tap.feats

    # -- correspondence ---------------------------------------------------------------------------
    def correspondence(self, sigma: float, branch: int, tgt_feats: dict | None, ref_feats: dict | None,
                       model_options: dict, hw: tuple[int, int]):
        """(flow_t2r [B,2,H,W], weight [B,1,H,W]) at the latent grid for one branch.

        ``model_options`` are the step's own, without the target feature tap: a reference pass made
        here must not overwrite the target features the tap holds.

        Reuses the AMA patch's current-step correspondence when the MODEL carries it; otherwise
        matches decoder descriptors of this step (method.md §6: the current step's features).
        """
        shared = _ama_correspondence(model_options, sigma, branch, hw, self.batch)
        self.source = "ama" if shared is not None else "own"
        if shared is not None:
            return shared
        if ref_feats is None:
            ref_feats = self.reference_features(sigma, [branch], model_options)
        from ..dreammatcher_core import features as dmf
        from ..dreammatcher_core import matching as dmm

        tf, rf = tgt_feats[branch], ref_feats[branch]
        n_ref = next(iter(rf.values())).shape[0]
        b = next(iter(tf.values())).shape[0]
        idx = torch.arange(b) % n_ref  # target row i is matched to reference row i % N
        ref_hw = tuple(self.spec.reference.trajectory.shape[-2:])
        desc_r, desc_t = dmf.describe([rf[k][idx].float() for k in self.layers],
                                      [tf[k].float() for k in self.layers], pca_dim=self.spec.pca_dim,
                                      grid_ref=ref_hw, grid_tgt=tuple(hw))
        flow, back = dmm.argmax_flows(desc_t, desc_r)
        fg = torch.ones(b, 1, *hw, device=flow.device)
        conf = dmm.confidence(dmm.cycle_error(flow, back), fg, self.spec.lambda_c)
        return flow, fg * conf

    def targets(self, flow: torch.Tensor, dtype) -> torch.Tensor:
        """The warped clean reference latent z0 for each target row (reference row = row % N)."""
        from ..dreammatcher_core import matching as dmm

        z0 = self.spec.reference.trajectory.z0.to(self.device, dtype)
        idx = torch.arange(flow.shape[0]) % z0.shape[0]
        return dmm.warp(z0[idx], flow.to(self.device)).to(dtype)

    # -- the guided model call --------------------------------------------------------------------
    def calc_cond_batch(self, args: dict) -> list:
        """``sampler_calc_cond_batch_function`` used on guided steps: guidance per branch, pre-CFG."""
        import comfy.model_management

        comfy.model_management.throw_exception_if_processing_interrupted()
        conds, x, ts, mo = args["conds"], args["input"], args["sigma"], args["model_options"]
        sigma = float(ts.reshape(-1)[0])
        branches = [k for k in (0, 1) if k < len(conds) and conds[k] is not None]
        inner = self.inner_calc

        def forward(which: list, x_in: torch.Tensor, options: dict) -> list:
            if inner is not None:
                return inner({**args, "conds": which, "input": x_in, "model_options": options})
            return self.calc(self.base, which, x_in, ts, options)

        self.batch = x.shape[0]
        # With the AMA patch the reference pass is the patch's; the own one runs only if needed.
        ama = _ama_present(mo)
        layers_tap = _FeatureTap(self.layers)
        run_mo = _with_output_patch(mo, layers_tap)
        ref_feats = None if ama else self.reference_features(sigma, branches, mo)
        hw = (x.shape[-2], x.shape[-1])
        x_det = x.detach()
        out = [None] * len(conds)
        parts: dict[int, tuple] = {}
        if self.spec.mode == "exact":
            out, grads, denom, parts_exact = self._exact(conds, x_det, sigma, forward, mo, run_mo, layers_tap,
                                                         ref_feats, hw)
            # denoised_k += lambda * sigma^2 * dL/dx_k (derivation at the top of this section), where
            # L = sum_k loss_k * D_k / D is the official loss over both branches (D_k = sum of w_k).
            step = self.spec.scale * sigma * sigma
            for k in branches:
                share = denom[k] / max(sum(denom.values()), 1e-30)
                update = (step * share) * grads[k].to(out[k].dtype)
                self._observe(k, sigma=sigma, x=x_det, denoised=out[k], update=update, grad=grads[k],
                              share=share, **parts_exact.pop(k))
                out[k] = out[k] + update
        else:
            # Fast mode (dreammatcher_core.guidance, module docstring): no UNet backward. The clean
            # estimate is taken as constant in the input, so d eps / d x = I / sigma and the official
            # update becomes plain descent on the loss in latent space, x0 -= lambda * sigma^2 * dL/dx0,
            # with dL/dx0 in closed form over both branches together (one loss, as the official code).
            from ..dreammatcher_core import guidance as dmg

            with torch.no_grad():
                out = list(forward(list(conds), x_det, run_mo))
            for k in branches:
                flow, w = self.correspondence(sigma, k, layers_tap.feats, ref_feats, mo, hw)
                parts[k] = (flow, w, self.targets(flow, torch.float32), self.source)
            _, g0 = dmg.loss_grad_wrt_x0(torch.cat([out[k].float() for k in branches]),
                                         torch.cat([parts[k][2] for k in branches]),
                                         torch.cat([parts[k][1].float() for k in branches]), self.spec.loss)
            for k, g0_k in zip(branches, g0.split(x.shape[0]), strict=True):
                guided = dmg.fast_guided_denoised(out[k].float(), g0_k, self.spec.scale, sigma)
                update = guided.to(out[k].dtype) - out[k]
                flow, w, target, source = parts[k]
                self._observe(k, sigma=sigma, x=x_det, denoised=out[k], update=update, flow=flow, weight=w,
                              target=target, source=source)
                out[k] = out[k] + update
        self.last = {"sigma": sigma, "branches": branches}
        return out

    def _observe(self, branch: int, **info) -> None:
        if self.spec.probe is not None:
            self.spec.probe({"mode": self.spec.mode, "branch": branch, "source": self.source, **info})

    def _exact(self, conds, x_det, sigma, forward, mo, run_mo, tap, ref_feats, hw):
        """Per branch: grad forward on the target rows only, numerator loss, backward, free the graph.

        Approximation choices (documented, see method.md §6 / §11.1.6):
        * the gradient flows through eps only: x0 = x_detached - sigma * eps(x_in), as the official code;
        * unlike the official code, attention is *not* excluded from the gradient (ComfyUI gives no
          per-call no_grad around attention without replacing other packs' attention patches); the
          gradient is the true d eps / d x of the model as patched;
        * only the target rows enter the graph (the reference pass, if any, runs without grad);
        * the official loss spans both branches with one denominator; the weights are constant in x, so
          each branch's own loss is differentiated separately and rescaled by its share of the
          denominator, and the graph of one branch is freed before the next (bounded memory).
        """
        from ..dreammatcher_core import guidance as dmg

        out = [None] * len(conds)
        grads: dict[int, torch.Tensor] = {}
        parts: dict[int, dict] = {}
        denom: dict[int, float] = {}
        model = self.base.diffusion_model
        for k in (0, 1):
            if k >= len(conds) or conds[k] is None:
                continue
            which = [conds[j] if j == k else None for j in range(len(conds))]
            with grad_escape(model):
                x_in = x_det.clone().requires_grad_(True)
                den = forward(which, x_in, run_mo)[k]
                eps = (x_in - den) / sigma
                x0 = x_det - sigma * eps
                flow, w = self.correspondence(sigma, k, tap.feats, ref_feats, mo, hw)
                work = torch.promote_types(x0.dtype, torch.float32)  # float64 runs stay float64
                target = self.targets(flow, work)
                loss = dmg.matching_loss(x0.to(work), target, w.to(work), self.spec.loss)
                (g,) = torch.autograd.grad(loss, x_in)
                out[k] = den.detach()
                grads[k] = g.detach()
                denom[k] = float(w.sum())
                del x_in, den, eps, x0, loss, g
            parts[k] = {"flow": flow, "weight": w, "target": target, "source": self.source}
            if self.spec.probe is not None:
                def branch_denoised(x_new, which=which, k=k):
                    with torch.no_grad():
                        return forward(which, x_new, run_mo)[k]
                parts[k]["forward"] = branch_denoised
        for k in range(len(conds)):
            if out[k] is None:
                out[k] = torch.zeros_like(x_det)
        return out, grads, denom, parts


def _ama_present(model_options: dict) -> bool:
    """Whether the MODEL carries an AMA patch that is running in this sampling run."""
    from . import ama_runtime

    return ama_runtime.get_run(model_options) is not None


def _ama_correspondence(model_options: dict, sigma: float, branch: int, hw: tuple[int, int], batch: int):
    """(flow_t2r, mask * confidence) of the AMA patch for this step at the latent grid, or None.

    Uses ``nodes.ama_runtime.current_match`` (its stable API) per target row. The AMA correspondence
    is built from the previous step's features (the AMA timing, method.md §2) and the subject's soft
    mask; it is only reused when it belongs to *this* step's sigma and exists at the latent grid
    (SD1.5 layout: decoder 64² = latent). Otherwise the caller matches on its own.
    """
    from . import ama_runtime

    if ama_runtime.get_run(model_options) is None:
        return None
    flows, weights = [], []
    for r in range(batch):
        m = ama_runtime.current_match(model_options, chunk_type=branch, row=r, resolution=hw)
        if m is None or m.confidence is None or m.mask is None or not math.isclose(
                float(m.sigma), sigma, rel_tol=1e-4, abs_tol=1e-6):
            return None
        flows.append(m.flow_t2r)
        weights.append((m.mask * m.confidence).detach())
    return torch.cat(flows), torch.cat(weights)


@torch.no_grad()
def sample_matching_guidance(model, x, sigmas, extra_args=None, callback=None, disable=None,
                             dm_guidance=None):
    """KSAMPLER function: deterministic Euler (= DDIM, eta 0) in sigma space with matching guidance.

    Unguided steps are bit-identical to ComfyUI's ``sample_euler`` (its ``ddim`` sampler). Guided
    steps route the model call through a ``sampler_calc_cond_batch_function`` so the guidance
    acts on the cond and uncond predictions separately *before* CFG, while ComfyUI still does
    inpainting masks, pre-/post-CFG functions and the CFG combination itself.
    """
    from comfy.k_diffusion.sampling import to_d
    from tqdm.auto import trange

    spec: GuidanceSpec = dm_guidance
    extra_args = {} if extra_args is None else extra_args
    run = _GuidanceRun(spec, model, x, extra_args)
    refuse_multigpu(model_patcher=getattr(run.guider, "model_patcher", None),
                    model_options=extra_args.get("model_options"), what="matching guidance")
    check_guidance_schedule(spec.reference, sigmas, run.window)
    checker = getattr(spec.reference, "check_model", None)
    if checker is not None and getattr(run.guider, "model_patcher", None) is not None:
        checker(run.guider.model_patcher)
    s_in = x.new_ones([x.shape[0]])
    base_options = extra_args.get("model_options", {})
    run.inner_calc = base_options.get("sampler_calc_cond_batch_function")
    for i in trange(len(sigmas) - 1, disable=disable):
        sigma_hat = sigmas[i]
        if run.active(float(sigma_hat)):
            hooked = {**base_options, "sampler_calc_cond_batch_function": run.calc_cond_batch}
            guided = {**extra_args, "model_options": hooked}
            denoised = model(x, sigma_hat * s_in, **guided)
        else:
            denoised = model(x, sigma_hat * s_in, **extra_args)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigmas[i + 1] - sigma_hat
        x = x + d * dt
    return x


def make_guidance_sampler(spec: GuidanceSpec):
    """The ``SAMPLER`` object (``comfy.samplers.KSAMPLER``) for SamplerCustom(Advanced)."""
    import comfy.samplers

    return comfy.samplers.KSAMPLER(sample_matching_guidance, extra_options={"dm_guidance": spec})


def ksampler_sigmas(model_patcher, steps: int, scheduler: str, denoise: float) -> torch.Tensor:
    """Exactly the sigmas the stock KSampler (sampler ddim) computes for (steps, scheduler, denoise)."""
    import comfy.samplers

    ks = comfy.samplers.KSampler(model_patcher, steps=steps, device=model_patcher.load_device,
                                 sampler="ddim", scheduler=scheduler, denoise=denoise,
                                 model_options=model_patcher.model_options)
    return ks.sigmas


def guidance_sample(model_patcher, spec: GuidanceSpec, *, seed: int, steps: int, cfg: float, scheduler: str,
                    positive, negative, latent: dict, denoise: float) -> dict:
    """The KSampler-like node's body: noise, schedule check, previews/progress, sample_custom."""
    import comfy.sample
    import comfy.utils
    import latent_preview

    refuse_multigpu(model_patcher=model_patcher, what="matching guidance")
    latent_image = comfy.sample.fix_empty_latent_channels(model_patcher, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    sigmas = ksampler_sigmas(model_patcher, steps, scheduler, denoise)
    ms = model_patcher.get_model_object("model_sampling")
    check_guidance_schedule(spec.reference, sigmas, guidance_window(ms, spec.start_percent, spec.end_percent))
    callback = latent_preview.prepare_callback(model_patcher, len(sigmas) - 1)
    samples = comfy.sample.sample_custom(
        model_patcher, noise, cfg, make_guidance_sampler(spec), sigmas, positive, negative, latent_image,
        noise_mask=latent.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out


# ---- inspector (DM_ExtractFeatures / DM_SemanticMatch standalone) ---------------------------------
# Owner: inspector. One UNet pass on a noised latent, capturing decoder features (the guidance
# section's ``_FeatureTap``) and the cross-attention of chosen tokens, through ComfyUI's own
# sample_custom so model loading, LoRA, patches, wrappers and SDXL's ADM conds all apply.


class _TokenAttnTap:
    """attn2 replace that records the cross-attention probability of chosen context tokens.

    It delegates the actual attention to the replace another pack installed on that key (or to
    ComfyUI's kernel), so the pass is otherwise unchanged. ``maps`` holds one ``[B, 1, H, W]``
    map (summed over tokens, averaged over heads) per call, for the cond branch only.
    """

    def __init__(self, tokens: tuple[int, ...], previous) -> None:
        self.tokens = tuple(tokens)
        self.previous = previous
        self.maps: list[torch.Tensor] = []

    def __call__(self, q, k, v, extra_options, **kwargs):
        heads = extra_options["n_heads"]
        shape = extra_options.get("activations_shape")
        labels = list(extra_options.get("cond_or_uncond", [0]))
        if k is not None and shape is not None and q.shape[1] == shape[2] * shape[3] and 0 in labels:
            rows = q.shape[0] // max(1, len(labels))
            c = labels.index(0)
            qc, kc = q[c * rows:(c + 1) * rows].float(), k[c * rows:(c + 1) * rows].float()
            b, n, inner = qc.shape
            dh = inner // heads
            qh = qc.view(b, n, heads, dh).transpose(1, 2)
            kh = kc.view(b, kc.shape[1], heads, dh).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) * dh ** -0.5, dim=-1).mean(1)
            keep = [t for t in self.tokens if t < probs.shape[-1]]
            if keep:
                m = probs[..., keep].sum(-1)
                self.maps.append(m.view(b, 1, shape[2], shape[3]).detach().cpu())
        if self.previous is not None:
            return self.previous(q, k, v, extra_options, **kwargs)
        return call_attention(q, k, v, extra_options)

    def __deepcopy__(self, memo: dict) -> _TokenAttnTap:
        return self


def inspector_zero_conditioning(model_patcher) -> list:
    """An all-zero prompt for a feature pass without conditioning (with SDXL's pooled output)."""
    model = model_patcher.model
    ctx = int(model.model_config.unet_config.get("context_dim") or 768)
    extra = {}
    if getattr(model, "adm_channels", 0):
        extra["pooled_output"] = torch.zeros(1, 1280)
    return [[torch.zeros(1, 77, ctx), extra]]


def inspector_sigma(model_patcher, noise_percent: float) -> float:
    """Sigma at ``noise_percent`` of the training schedule (0 = sigma_min, 0.99 = nearly sigma_max)."""
    sampling = model_patcher.get_model_object("model_sampling")
    return float(sampling.sigma(torch.tensor(float(noise_percent) * 999.0)))


def inspector_pass(model_patcher, samples: torch.Tensor, conditioning: list | None, *,
                   layers: tuple[int, ...], noise_percent: float, seed: int, tokens: tuple[int, ...] = (),
                   mask_blocks=()) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """One UNet call (cond only, cfg 1) on ``samples`` (VAE-space LATENT samples) noised to
    ``noise_percent`` with seeded noise.

    Returns ``(features, token_map)``: ``features[k]`` is the output of output block ``k`` as
    float32 ``[B, C, h, w]`` on the CPU; ``token_map`` is the head-mean cross-attention of ``tokens``
    (summed over tokens) averaged over every transformer of ``mask_blocks`` (``AttnBlock``s, the
    AMA patch's choice), ``[B, 1, h, w]`` (``None`` without tokens).
    The input MODEL is not modified (patches go on a clone).
    """
    import comfy.sample
    import comfy.samplers

    model = model_patcher.clone()
    tap = _FeatureTap(tuple(layers))
    model.set_model_output_block_patch(tap)
    token_taps: list[_TokenAttnTap] = []
    if tokens:
        for blk in mask_blocks:
            for index in range(blk.depth):
                key3 = (blk.name, blk.id, index)
                t = _TokenAttnTap(tokens, existing_attn_replace(model.model_options, "attn2", key3))
                set_attn_replace(model, "attn2", key3, t)
                token_taps.append(t)

    def one_call(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        model_k(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        return x

    latent = comfy.sample.fix_empty_latent_channels(model, samples)
    noise = comfy.sample.prepare_noise(latent, int(seed))
    sigmas = torch.tensor([inspector_sigma(model, noise_percent), 0.0])
    positive = conditioning if conditioning else inspector_zero_conditioning(model)
    comfy.sample.sample_custom(model, noise, 1.0, comfy.samplers.KSAMPLER(one_call), sigmas, positive,
                               positive, latent, disable_pbar=True, seed=int(seed))
    got = tap.feats.get(0, {})
    missing = [k for k in layers if k not in got]
    if missing:
        raise ValueError(f"The feature pass produced no output for decoder blocks {missing}; choose output "
                         f"blocks 0-{len(model.model.diffusion_model.output_blocks) - 2} in 'layers'.")
    feats = {k: got[k].float().cpu() for k in layers}
    token_map = None
    maps = [t_map for t in token_taps for t_map in t.maps]
    if maps:
        size = maps[0].shape[-2:]
        token_map = torch.stack([torch.nn.functional.interpolate(m, size=size) for m in maps]).mean(0)
    return feats, token_map


def latent_rgb_preview(model_patcher, samples: torch.Tensor) -> torch.Tensor:
    """A fast IMAGE ``[B, H, W, 3]`` of VAE-space latents via the latent format's RGB factors
    (ComfyUI's Latent2RGB preview); grey-scaled first channels when the format has none."""
    fmt = model_patcher.model.latent_format
    x = samples.float()
    factors = getattr(fmt, "latent_rgb_factors", None)
    if factors is not None and len(factors) == x.shape[1]:
        f = torch.tensor(factors, dtype=torch.float32)
        bias = getattr(fmt, "latent_rgb_factors_bias", None)
        rgb = torch.einsum("bchw,cr->bhwr", x, f)
        if bias is not None:
            rgb = rgb + torch.tensor(bias, dtype=torch.float32)
        return ((rgb + 1.0) / 2.0).clamp(0, 1)
    g = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    lo, hi = g.amin((2, 3), keepdim=True), g.amax((2, 3), keepdim=True)
    return ((g - lo) / (hi - lo + 1e-6)).permute(0, 2, 3, 1)
