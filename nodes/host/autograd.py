"""The gradient escape from ``torch.inference_mode`` for exact matching guidance.

ComfyUI runs every prompt under inference mode, so the weights a prompt loads are inference tensors,
which autograd refuses to save for backward. ``docs/host.md`` ("Inference mode and the gradient
escape") explains the host behaviour this relies on, on each supported version.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


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

    Every prompt runs under ``torch.inference_mode`` and the weights loaded
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


