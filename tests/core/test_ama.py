"""Tests for dreammatcher_core.ama: value injection in ComfyUI's token layout."""

from __future__ import annotations

import pytest
import torch

from dreammatcher_core import ama as A
from dreammatcher_core import matching as M


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Reference softmax attention on ``[B, N, heads*d]`` (what ComfyUI's kernels compute)."""
    b, n, hd = q.shape
    d = hd // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    w = (split(q) @ split(k).transpose(-1, -2) * d**-0.5).softmax(-1)
    return (w @ split(v)).transpose(1, 2).reshape(b, n, hd)


def _qkv(b: int, n: int, hd: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, hd, generator=g) for _ in range(3)]


def test_strength_zero_is_exactly_plain_attention():
    q, k, v = _qkv(2, 12, 16, 0)
    v_ref = torch.randn(2, 12, 16)
    flow = torch.randint(-2, 3, (2, 2, 3, 4)).float()
    mask = torch.rand(2, 1, 3, 4)
    expect = plain_attention(q, k, v, 4)
    for g in (0.0, A.gate(0.0, mask, torch.ones(2, 1, 3, 4)), torch.zeros(2, 1, 3, 4)):
        out = A.ama_attention(q, k, v, v_ref, flow, g, 4, plain_attention)
        assert torch.equal(out, expect)


def test_gate_one_identity_flow_same_values_is_identical():
    q, k, v = _qkv(2, 20, 24, 1)
    flow = torch.zeros(2, 2, 4, 5)
    g = A.gate(1.0, torch.ones(2, 1, 4, 5), None)
    out = A.ama_attention(q, k, v, v.clone(), flow, g, 3, plain_attention)
    assert torch.equal(out, plain_attention(q, k, v, 3))


def test_full_gate_with_permutation_uses_warped_reference_values():
    h, w, hd, heads = 3, 4, 8, 2
    q, k, v = _qkv(1, h * w, hd, 2)
    v_ref = torch.randn(1, h * w, hd)
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(3))
    flow = M.flows_from_indices(perm[None], torch.argsort(perm)[None], (h, w), (h, w))[0]
    out = A.ama_attention(q, k, v, v_ref, flow, 1.0, heads, plain_attention)
    assert torch.equal(out, plain_attention(q, k, v_ref[:, perm], heads))


def test_partial_gate_blends_per_token_and_reference_grid_may_differ():
    ht, wt, hr, wr, hd, heads = 2, 3, 4, 5, 6, 3
    q, k, v = _qkv(2, ht * wt, hd, 4)
    v_ref = torch.randn(2, hr * wr, hd)
    flow = torch.zeros(2, 2, ht, wt)
    flow[:, 0] = 2.0  # target (x, y) reads reference (x + 2, y + 1)
    flow[:, 1] = 1.0
    mask = torch.rand(2, 1, ht, wt, generator=torch.Generator().manual_seed(5))
    conf = torch.ones(2, 1, ht, wt)
    conf[1, 0, 0, 0] = 0.0
    g = A.gate(0.7, mask, conf)
    captured = {}

    def spy(qq, kk, vv, nh):
        captured["v"] = vv
        return plain_attention(qq, kk, vv, nh)

    A.ama_attention(q, k, v, v_ref, flow, g, heads, spy, ref_hw=(hr, wr))
    ys, xs = torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij")
    src = ((ys + 1) * wr + (xs + 2)).reshape(-1)
    gate_tok = (0.7 * mask * conf).reshape(2, -1, 1)
    expect = v + gate_tok * (v_ref[:, src] - v)
    torch.testing.assert_close(captured["v"], expect)
    assert torch.equal(captured["v"][1, 0], v[1, 0])  # unconfident token keeps its own value exactly


def test_flow_and_gate_broadcast_over_batch_and_dtype_kept():
    q, k, v = _qkv(4, 6, 8, 6)
    v_ref = torch.randn(4, 6, 8)
    flow = torch.zeros(1, 2, 2, 3)
    out = A.ama_attention(
        q.half(),
        k.half(),
        v.half(),
        v_ref.half(),
        flow,
        torch.full((1, 1, 2, 3), 0.5),
        2,
        lambda a, b, c, h: c,
    )
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), (0.5 * (v + v_ref)).half().float(), rtol=1e-3, atol=1e-3)


def test_inject_values_formula_and_errors():
    vt, vr = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    g = torch.rand(2, 1, 4, 5)
    torch.testing.assert_close(A.inject_values(vt, vr, g), vt + g * (vr - vt))
    assert A.inject_values(vt, vr, 0.0) is vt
    assert torch.equal(A.inject_values(vt, vr, 1.0), vr)
    assert torch.equal(A.inject_values(vt, vr, torch.ones(1, 1, 4, 5)), vr)
    assert torch.equal(A.inject_values(vt, vr, torch.zeros(2, 1, 4, 5)), vt)
    with pytest.raises(ValueError):
        A.inject_values(vt, vr[:, :2], g)
    with pytest.raises(ValueError, match="target tokens"):
        q, k, v = _qkv(1, 6, 4, 7)
        A.ama_attention(q, k, v, torch.randn(1, 6, 4), torch.zeros(1, 2, 2, 2), 1.0, 2, plain_attention)


def test_gate_factors():
    m, c = torch.rand(1, 1, 2, 2), (torch.rand(1, 1, 2, 2) > 0.5).float()
    torch.testing.assert_close(A.gate(0.5, m, c), 0.5 * m * c)
    torch.testing.assert_close(A.gate(1.0, None, c), c)
    assert float(A.gate(0.3, None, None)) == pytest.approx(0.3)
