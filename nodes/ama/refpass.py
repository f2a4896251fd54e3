"""The reference pass: one UNet call on the replayed reference latent, or its banked result.

Per capture step, the reference branch needs, for each chunk type the target call holds (0 =
cond, 1 = uncond), the reference's V at every AMA layer and its decoder features. They come from
one UNet call with one row per missing chunk type: the reference latent ``trajectory.at(sigma)``,
the reference's positive (cond) or negative (uncond) conditioning, and the target rows' other
per-row arguments (e.g. SDXL's ``y``; the reference has no size/pooled conditioning of its own).
A call whose every chunk type has its exact inputs in the reference bank (:mod:`.bank`) is replayed
instead, whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..host import hooks
from .keys import CALL_KEY


@dataclass
class RefRecord:
    """The reference pass of one step and chunk type: V per AMA layer and decoder features."""

    v: dict = field(default_factory=dict)  # key3 -> ([1, N, C], (H, W))
    feats: dict = field(default_factory=dict)  # output-block id -> [1, C, H, W]


def _per_row(v, total: int) -> bool:
    """Whether a UNet keyword argument holds one row per batch row (and so is sliced with them)."""
    return torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == total


def _rows_inputs(run, types: list[int], x, c_crossattn, kwargs: dict, cou: list[int]):
    """Per chunk type: (row index in the target batch, conditioning row [1, T, C], per-row kwargs)."""
    ref = run.patch.reference
    total = x.shape[0]
    b = total // len(cou)
    out = []
    for ty in types:
        row = cou.index(ty) * b
        cond = ref.positive if ty == 0 else ref.negative
        if cond:
            ctx = cond[0][0][:1]
        elif c_crossattn is not None:
            ctx = c_crossattn[row:row + 1].detach().cpu()
        else:
            raise ValueError("DreamMatcher AMA: the reference has no conditioning for this chunk type.")
        kw = {k: v[row:row + 1] for k, v in kwargs.items() if _per_row(v, total)}
        out.append((row, ctx, kw))
    return out


def reference_pass(run, executor, step: int, types: list[int], x, t, c_crossattn, transformer_options,
                   kwargs: dict, cou: list[int]) -> None:
    """Fill ``run.ref_v[step][ty]`` and the reference features of ``step`` for every type in ``types``."""
    sigma = run.sigmas[step]
    need_v = step in run.active
    layers = tuple(run.patch.settings.feature_layers)
    inputs = _rows_inputs(run, types, x, c_crossattn, kwargs, cou)
    entries = [run.bank.lookup(sigma, ty, ctx, kw, x.dtype, x.device, need_v, layers) if run.bank else None
               for ty, (_row, ctx, kw) in zip(types, inputs, strict=True)]
    if entries and all(e is not None for e in entries):  # replay the whole call, or compute it whole
        for ty, entry in zip(types, entries, strict=True):
            rec = RefRecord()
            if need_v:
                rec.v = {k: (v.to(x.device, non_blocking=True), hw) for k, (v, hw) in entry.v.items()}
            run.ref_v.setdefault(step, {})[ty] = rec
            feats = run.corr.ref_feats.setdefault(step, {}).setdefault(ty, {})
            for layer in layers:
                feats.setdefault(layer, entry.feats[layer].to(x.device, non_blocking=True))
            run.stats["bank_hits"] += 1
        return
    rows_of = [row for row, _, _ in inputs]
    n = len(types)
    ctxs = [ctx for _, ctx, _ in inputs]
    length = math.lcm(*[c.shape[1] for c in ctxs])
    ctx = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in ctxs]).to(
        device=x.device, dtype=c_crossattn.dtype if c_crossattn is not None else x.dtype)
    x_ref = run.patch.reference.trajectory.at(sigma)[:1].to(device=x.device, dtype=x.dtype)
    t_ref = t[:1].expand(n).clone()
    total = x.shape[0]
    kw = {k: (v[rows_of] if _per_row(v, total) else v) for k, v in kwargs.items()}
    ropts = hooks.options_for_rows(transformer_options, list(types), cou, t_ref)
    call = run.make_call("record", step, list(types), n)
    call.store_v = need_v
    ropts[CALL_KEY] = call
    for ty in types:
        run.ref_v.setdefault(step, {})[ty] = RefRecord()
    with torch.no_grad():
        executor(x_ref.expand(n, *x_ref.shape[1:]), t_ref, None, ctx, None, ropts, **kw)
    run.stats["ref_passes"] += 1
    run.stats["ref_rows"] += n
    if run.bank is None:
        return
    passes = []
    for ty, (_row, ctx_row, kw_rows) in zip(types, inputs, strict=True):
        feats = run.corr.ref_feats.get(step, {}).get(ty, {})
        rec = run.ref_v[step][ty]
        if any(layer not in feats for layer in layers) or (need_v and not rec.v):
            return  # the pass did not reach every layer (e.g. interrupted): do not bank it
        passes.append((ty, ctx_row, kw_rows, rec.v, {k: feats[k] for k in layers}))
    if run.bank.store(sigma, passes, x.dtype, x.device):
        run.stats["bank_stores"] += len(passes)
    else:
        run.stats["bank_full"] += len(passes)
