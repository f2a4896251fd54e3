"""Introspection of a MODEL (``ModelPatcher``): what it is, not how it samples.

Latent format and fingerprint (which references fit which model), prediction type, the dtype a
trajectory is stored in, latent in/out processing, the UNet's attention layout read from its modules,
and sigmas at a percent of the schedule.
"""

from __future__ import annotations

import torch

from ..layout import AttnBlock, UNetLayout
from . import require

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


#: ``model_options`` key where a model's loader may declare the DDIM reconstruction error its model
#: reaches at the settings it is meant for: ``{"level": 0.25, "why": "a few words"}``. DDIM Invert
#: Reference warns above that level instead of the default (docs/host.md, "Declared inversion error").
INVERSION_ERROR_KEY = "dreammatcher_inversion_error"


def declared_inversion_error(model_patcher) -> tuple[float, str] | None:
    """``(level, why)`` that the model's loader declared under :data:`INVERSION_ERROR_KEY`, else None.

    A malformed entry (not a dict, no level, a level outside (0, 1)) counts as none: the default
    warning level then applies, which errs towards warning.
    """
    entry = (getattr(model_patcher, "model_options", None) or {}).get(INVERSION_ERROR_KEY)
    if not isinstance(entry, dict):
        return None
    try:
        level = float(entry["level"])
    except (KeyError, TypeError, ValueError):
        return None
    if not 0.0 < level < 1.0:
        return None
    return level, str(entry.get("why", "")).strip()


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


def unet_layout(model_patcher) -> UNetLayout:
    """Discover attention blocks, their resolutions and transformer depths from the model's modules.

    WHY from modules: the block ids, depths and resolutions of SD1.5 and SDXL (and of narrow test
    models with those layouts) differ; reading them avoids hard-coded tables that would silently
    mis-key a replace on another UNet.
    """
    attention = require("comfy.ldm.modules.attention", "SpatialTransformer")
    oai = require("comfy.ldm.modules.diffusionmodules.openaimodel", "Downsample", "Upsample")

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


def percent_to_sigma(model_patcher, percent: float) -> float:
    """ComfyUI's own start/end-percent semantics (as ControlNet's timestep range uses them)."""
    return float(model_patcher.get_model_object("model_sampling").percent_to_sigma(float(percent)))




def window_sigmas(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """``(sigma_hi, sigma_lo)`` of a start/end-percent window with ComfyUI's own percent semantics
    (as ControlNet's timestep range uses them), from a sampler's ``model_sampling`` object."""
    hi = float(model_sampling.percent_to_sigma(start_percent))
    return hi, float(model_sampling.percent_to_sigma(end_percent))


def zero_prompt(model_patcher) -> list:
    """An all-zero prompt for a feature pass without conditioning (with SDXL's pooled output)."""
    model = model_patcher.model
    ctx = int(model.model_config.unet_config.get("context_dim") or 768)
    extra = {}
    if getattr(model, "adm_channels", 0):
        extra["pooled_output"] = torch.zeros(1, 1280)
    return [[torch.zeros(1, 77, ctx), extra]]


def sigma_at_percent(model_patcher, noise_percent: float) -> float:
    """Sigma at ``noise_percent`` of the training schedule (0 = sigma_min, 0.99 = nearly sigma_max)."""
    sampling = model_patcher.get_model_object("model_sampling")
    return float(sampling.sigma(torch.tensor(float(noise_percent) * 999.0)))


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


#: The parts of ``transformer_options`` whose callables run inside (or around) a UNet call.
_CALLABLE_TREES = ("patches", "patches_replace", "wrappers", "callbacks")


def _callables(tree, path: tuple) -> list:
    """(path, callable) pairs of a nested dict/list tree, bound methods split into (self, function)."""
    out: list = []
    if isinstance(tree, dict):
        for key in sorted(tree, key=repr):
            out += _callables(tree[key], (*path, repr(key)))
    elif isinstance(tree, (list, tuple)):
        for i, item in enumerate(tree):
            out += _callables(item, (*path, str(i)))
    elif callable(tree):
        owner, func = getattr(tree, "__self__", None), getattr(tree, "__func__", None)
        out += [("/".join(path), owner, func)] if func is not None else [("/".join(path), tree)]
    return out


def unet_call_fingerprint(model_patcher, transformer_options: dict) -> tuple | None:
    """Everything besides its tensor inputs that decides what one UNet call of this model returns.

    The model object, its weight-patch generation (``patches_uuid``: renewed whenever weight patches
    such as a LoRA or its strength change), its object patches (e.g. a replaced ``model_sampling``),
    the manual-cast dtype, and every callable in the patches, replaces, wrappers and callbacks of
    ``transformer_options``. ``None`` when the call also depends on something this cannot see:
    ComfyUI hooks (per-conditioning LoRA/weight hooks change weights during sampling).
    """
    if getattr(model_patcher, "hook_patches", None) or getattr(model_patcher, "forced_hooks", None):
        return None
    if getattr(model_patcher, "current_hooks", None):
        return None
    model = model_patcher.model
    items: list = [model, str(getattr(model_patcher, "patches_uuid", None)),
                   str(getattr(model, "manual_cast_dtype", None))]
    patches = getattr(model_patcher, "object_patches", {}) or {}
    for name in sorted(patches):
        items += [name, patches[name]]
    for tree in _CALLABLE_TREES:
        for entry in _callables(transformer_options.get(tree, {}), (tree,)):
            items += list(entry)
    return tuple(items)
