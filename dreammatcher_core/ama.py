"""Appearance-matching self-attention (AMA): value injection with the target's own Q/K (docs/method.md,
"Appearance matching self-attention (AMA)").

``V' = V_tgt + gate * (warp(V_ref, F_t2r) - V_tgt)`` with ``gate = strength * m_t * U``, then
``out = attention(Q_tgt, K_tgt, V')``.  The official code blends twice (first with the confidence ``U``,
then with the soft mask ``m_t``), which is algebraically this single blend with ``gate = m_t * U``.
``strength`` (1 in the official code) is this port's global knob; 0 turns AMA off exactly.

Token layout is ComfyUI's: ``[B, N, heads * dim_head]`` with token ``y * W + x``.  The flow is per pixel,
not per head, so the reference values are gathered as whole tokens (all heads at once) and heads are
never split here; the attention kernel (ComfyUI's ``optimized_attention`` wrapped in a lambda) does that.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .matching import warp_tokens

__all__ = ["gate", "inject_values", "ama_attention", "AttentionFn"]

#: ``attention_fn(q, k, v, heads) -> out``, all ``[B, N, heads * dim_head]``.
AttentionFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


def gate(strength: float, fg_mask: Tensor | None, conf: Tensor | None) -> Tensor:
    """``strength * fg_mask * conf`` (``[B,1,H,W]``); a ``None`` factor counts as ones.

    ``fg_mask=None`` is the official ``fg_mask=False`` switch (confidence only); ``conf=None`` drops the
    cycle-consistency filter (official ``cc_thres`` -> infinity).  With both ``None`` the result is a 0-d
    tensor ``strength``.
    """
    g: Tensor | None = None
    for factor in (fg_mask, conf):
        if factor is None:
            continue
        f = factor.to(torch.float64 if factor.dtype == torch.float64 else torch.float32)
        g = f if g is None else g * f
    if g is None:
        return torch.tensor(float(strength))
    return g * float(strength)


def inject_values(v_tgt: Tensor, v_ref_warped: Tensor, gate: Tensor | float) -> Tensor:
    """``V' = V_tgt + gate * (V_ref_warped - V_tgt)``; ``gate`` broadcasts against the values.

    Half/bfloat16 values are blended in float32 and cast back to ``v_tgt.dtype`` (the official code warps
    and blends in float32, then casts to the attention dtype).  Where the gate is 0 the result is
    ``V_tgt`` exactly and where it is 1 the warped reference exactly (see the lerp note below).
    """
    if v_tgt.shape != v_ref_warped.shape:
        raise ValueError(f"value shapes differ: {tuple(v_tgt.shape)} vs {tuple(v_ref_warped.shape)}")
    if isinstance(gate, (int, float)) and float(gate) == 0.0:
        return v_tgt
    work = torch.float64 if v_tgt.dtype == torch.float64 else torch.float32
    vt = v_tgt.to(work)
    g = gate.to(device=v_tgt.device, dtype=work) if isinstance(gate, Tensor) else float(gate)
    # torch.lerp evaluates start + w*(end-start) for w < 0.5 and end - (end-start)*(1-w) otherwise, which
    # is exact at both ends: gate 0 -> V_tgt and gate 1 -> warped reference, bit for bit.
    if isinstance(g, Tensor):
        g = g.expand(torch.broadcast_shapes(g.shape, vt.shape))
    return torch.lerp(vt, v_ref_warped.to(work), g).to(v_tgt.dtype)


def _gate_tokens(g: Tensor | float, batch: int, hw: tuple[int, int]) -> Tensor | float:
    """Gate ``[Bg,1,H,W]`` (or scalar) -> ``[B, N, 1]`` in token order; ``Bg`` must divide ``B``."""
    if not isinstance(g, Tensor) or g.dim() == 0:
        return float(g) if not isinstance(g, Tensor) else g
    if g.dim() != 4 or g.shape[1] != 1 or tuple(g.shape[-2:]) != tuple(hw):
        raise ValueError(f"gate must be [B,1,{hw[0]},{hw[1]}], got {tuple(g.shape)}")
    if batch % g.shape[0]:
        raise ValueError(f"gate batch {g.shape[0]} does not divide the value batch {batch}")
    tok = g.reshape(g.shape[0], hw[0] * hw[1], 1)
    if g.shape[0] != batch:
        tok = tok.repeat_interleave(batch // g.shape[0], dim=0)
    return tok


def ama_attention(
    q: Tensor,
    k: Tensor,
    v_tgt: Tensor,
    v_ref: Tensor,
    flow_t2r: Tensor,
    gate: Tensor | float,
    heads: int,
    attention_fn: AttentionFn,
    *,
    ref_hw: tuple[int, int] | None = None,
) -> Tensor:
    """Target self-attention with appearance-matched values: ``attention_fn(q, k, V', heads)``.

    * ``q, k, v_tgt``: ``[B, Nt, heads*d]``, the target's own projections (the structure path is kept).
    * ``v_ref``: ``[B, Nr, heads*d]`` on the reference grid ``ref_hw`` (default: the target grid); the
      reference may have another size or aspect than the target.
    * ``flow_t2r``: ``[Bf, 2, Ht, Wt]`` with ``Ht*Wt == Nt``; value item ``i`` uses flow item
      ``i // (B // Bf)`` (see :func:`dreammatcher_core.matching.warp`).
    * ``gate``: ``[Bg, 1, Ht, Wt]`` (``Bg`` divides ``B``, same batch convention) or a scalar.

    A gate that is the scalar 0, or a tensor of zeros, calls ``attention_fn(q, k, v_tgt, heads)`` with the
    original tensor, so "strength 0" is bit-identical to no AMA at all.
    """
    if q.dim() != 3 or k.dim() != 3 or v_tgt.dim() != 3 or v_ref.dim() != 3:
        raise ValueError("q, k, v_tgt and v_ref must be [B, N, heads*dim_head]")
    if v_tgt.shape[-1] % heads or v_ref.shape[-1] != v_tgt.shape[-1]:
        raise ValueError(f"value width {v_tgt.shape[-1]} / {v_ref.shape[-1]} does not fit {heads} heads")
    if v_ref.shape[0] != v_tgt.shape[0]:
        raise ValueError(f"reference and target value batches differ: {v_ref.shape[0]} vs {v_tgt.shape[0]}")
    ht, wt = flow_t2r.shape[-2], flow_t2r.shape[-1]
    if ht * wt != v_tgt.shape[1]:
        raise ValueError(f"flow grid {ht}x{wt} does not hold the {v_tgt.shape[1]} target tokens")
    is_zero = (not isinstance(gate, Tensor) and float(gate) == 0.0) or (
        isinstance(gate, Tensor) and not bool(gate.any())
    )
    if is_zero:
        return attention_fn(q, k, v_tgt, heads)
    warped = warp_tokens(v_ref, flow_t2r, ref_hw)
    v_prime = inject_values(v_tgt, warped, _gate_tokens(gate, v_tgt.shape[0], (ht, wt)))
    return attention_fn(q, k, v_prime, heads)
