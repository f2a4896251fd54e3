"""Attention variants the fidelity benchmark compares DreamMatcher with, and its positive controls.

* :func:`kv_model` — key/value replacement (the MasaCtrl family): in the same decoder self-attention
  layers and sigma window as AMA, the target's queries attend to the *reference's* keys and values,
  recorded by a reference pass at the same sigma (the inverted reference latent, reference prompt).
* :func:`pair_model` — two targets sampled as a pair, each decoder self-attention over both images
  (the world's training-time pairing); ``zero_values`` zeroes those layers' values, cutting the only
  channel between the two images. Positive control (a) compares the pair's appearance agreement in
  the two cases.

Both wrap a *clone* with ComfyUI's public unet-function wrapper; the input MODEL is untouched.
"""

from __future__ import annotations

import torch

from .training import DECODER_BLOCKS, attention, joint_attention


def _with_attn1(c: dict, replace: dict) -> dict:
    c = dict(c)
    to = dict(c.get("transformer_options", {}))
    pr = {k: dict(v) for k, v in to.get("patches_replace", {}).items()}
    pr.setdefault("attn1", {}).update(replace)
    to["patches_replace"] = pr
    c["transformer_options"] = to
    return c


def kv_model(model, reference, layers: tuple[int, ...], sigma_hi: float, sigma_lo: float):
    """A clone whose decoder self-attention in ``layers`` uses the reference's keys and values."""
    ref_cond = reference.positive[0][0]
    fmt = model.model.latent_format

    def wrapper(apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        sigma = float(t.flatten()[0])
        if not (sigma_lo - 1e-6 <= sigma <= sigma_hi + 1e-6):
            return apply_model(x, t, **c)
        ref_x = fmt.process_in(reference.trajectory.at(sigma).to(x)[:1])
        store: dict = {}

        def record(key):
            def fn(q, k, v, extra):
                store[key] = (k, v)
                return attention(q, k, v, extra["n_heads"])

            return fn

        rc = {"c_crossattn": ref_cond.to(x), "transformer_options": c.get("transformer_options", {})}
        apply_model(ref_x, t[:1], **_with_attn1(rc, {("output", i): record(i) for i in layers}))

        def use(key):
            def fn(q, k, v, extra):
                rk, rv = store[key]
                return attention(
                    q, rk.expand(q.shape[0], -1, -1), rv.expand(q.shape[0], -1, -1), extra["n_heads"]
                )

            return fn

        return apply_model(x, t, **_with_attn1(c, {("output", i): use(i) for i in layers}))

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m


def pair_model(model, zero_values: bool = False, blocks: tuple[int, ...] = DECODER_BLOCKS):
    """A clone that samples a batch of 2 as a pair (rows 0 and 1 of every cond/uncond chunk)."""

    def wrapper(apply_model, args):
        x, t, c = args["input"], args["timestep"], args["c"]
        chunks = max(1, len(args.get("cond_or_uncond", [0])))
        per = x.shape[0] // chunks
        if per != 2:
            raise ValueError(f"pair sampling needs a batch of 2 targets; got {per}.")
        partner = torch.tensor([r ^ 1 for r in range(x.shape[0])], device=x.device)

        def fn(q, k, v, extra):
            if zero_values:
                return torch.zeros_like(q)
            return joint_attention(q, k, v, extra["n_heads"], partner)

        return apply_model(x, t, **_with_attn1(c, {("output", i): fn for i in blocks}))

    m = model.clone()
    m.set_model_unet_function_wrapper(wrapper)
    return m
