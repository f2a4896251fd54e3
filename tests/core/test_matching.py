"""Oracle tests for dreammatcher_core.matching: flows, warp, cycle error, confidence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dreammatcher_core import matching as M


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=dtype)


def _oracle_indices(ft: torch.Tensor, fr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent brute force: full float64 cosine matrix, argmax both ways (first index on ties)."""
    b, c = ft.shape[:2]
    t = F.normalize(ft.double().reshape(b, c, -1).transpose(1, 2), dim=2)
    r = F.normalize(fr.double().reshape(b, c, -1).transpose(1, 2), dim=2)
    sim = t @ r.transpose(1, 2)
    return sim.argmax(dim=2), sim.argmax(dim=1)


def _grid(h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return xs, ys


# ------------------------------------------------------------------------------------------------ flows
def test_known_shift_flow_and_warp_exact_on_overlap():
    c, h, w, sx, sy = 64, 20, 24, 3, -2
    ref = _rand(1, c, h, w, seed=1)
    # target pixel (x, y) shows reference pixel (x + sx, y + sy); uncovered target pixels are new content
    tgt = _rand(1, c, h, w, seed=2)
    xs, ys = _grid(h, w)
    overlap = (xs + sx >= 0) & (xs + sx < w) & (ys + sy >= 0) & (ys + sy < h)
    tgt[0][:, overlap] = ref[0][:, (ys + sy)[overlap], (xs + sx)[overlap]]

    f_t2r, f_r2t = M.argmax_flows(tgt, ref)
    assert f_t2r.shape == (1, 2, h, w) and f_r2t.shape == (1, 2, h, w)
    assert f_t2r.dtype == torch.float32
    assert torch.all(f_t2r[0, 0][overlap] == sx) and torch.all(f_t2r[0, 1][overlap] == sy)
    # converse direction on the reference pixels that are visible in the target
    xr, yr = _grid(h, w)
    seen = (xr - sx >= 0) & (xr - sx < w) & (yr - sy >= 0) & (yr - sy < h)
    assert torch.all(f_r2t[0, 0][seen] == -sx) and torch.all(f_r2t[0, 1][seen] == -sy)
    warped = M.warp(ref, f_t2r)
    assert torch.equal(warped[0][:, overlap], tgt[0][:, overlap])


def test_horizontal_flip_recovered_exactly():
    c, h, w = 96, 12, 17
    ref = _rand(2, c, h, w, seed=3)
    tgt = ref.flip(-1)
    f_t2r, f_r2t = M.argmax_flows(tgt, ref)
    xs, _ = _grid(h, w)
    expect_dx = (w - 1 - xs) - xs
    for b in range(2):
        assert torch.equal(f_t2r[b, 0], expect_dx.float()) and torch.all(f_t2r[b, 1] == 0)
        assert torch.equal(f_r2t[b, 0], expect_dx.float()) and torch.all(f_r2t[b, 1] == 0)
    assert torch.equal(M.warp(ref, f_t2r), tgt)


def test_random_permutation_recovered_exactly():
    c, h, w = 128, 16, 16
    ref = _rand(1, c, h, w, seed=4)
    perm = torch.randperm(h * w, generator=_gen(5))
    tgt = ref.reshape(1, c, -1)[:, :, perm].reshape(1, c, h, w)
    idx_t2r, idx_r2t = M.match_indices(tgt, ref)
    assert torch.equal(idx_t2r[0], perm)
    assert torch.equal(idx_r2t[0], torch.argsort(perm))
    f_t2r, _ = M.argmax_flows(tgt, ref)
    xs, ys = _grid(h, w)
    assert torch.equal(f_t2r[0, 0], ((perm % w).view(h, w) - xs).float())
    assert torch.equal(f_t2r[0, 1], ((perm // w).view(h, w) - ys).float())
    assert torch.equal(M.warp(ref, f_t2r), tgt)


def test_different_sizes_hand_built_ground_truth():
    """24x40 target against a 32x32 reference: target (x, y) copies reference ((4x)//5, y + 4)."""
    c, ht, wt, hr, wr = 80, 24, 40, 32, 32
    ref = _rand(1, c, hr, wr, seed=6)
    xs, ys = _grid(ht, wt)
    xr_gt, yr_gt = (4 * xs) // 5, ys + 4
    tgt = ref[:, :, yr_gt, xr_gt]
    assert tgt.shape == (1, c, ht, wt)

    f_t2r, f_r2t = M.argmax_flows(tgt, ref)
    assert f_t2r.shape == (1, 2, ht, wt) and f_r2t.shape == (1, 2, hr, wr)
    assert torch.equal(f_t2r[0, 0], (xr_gt - xs).float())
    assert torch.equal(f_t2r[0, 1], (yr_gt - ys).float())

    # Reference rows 4..27 are seen; every reference column c is the image of one or two target columns,
    # identical features tie and the lowest flat target index (smallest x) wins.
    first_x = [min(x for x in range(wt) if (4 * x) // 5 == xr) for xr in range(wr)]
    expect_dx = torch.tensor([fx - xr for xr, fx in enumerate(first_x)], dtype=torch.float32)
    assert torch.equal(f_r2t[0, 0, 4:28], expect_dx.expand(24, wr))
    assert torch.all(f_r2t[0, 1, 4:28] == -4)
    # unseen reference rows: compare with an independent float64 brute force
    _, oracle_r2t = _oracle_indices(tgt, ref)
    idx_t2r, idx_r2t = M.match_indices(tgt, ref)
    unseen = torch.ones(hr, wr, dtype=torch.bool)
    unseen[4:28] = False
    assert torch.equal(idx_r2t[0][unseen.reshape(-1)], oracle_r2t[0][unseen.reshape(-1)])
    assert torch.equal(M.warp(ref, f_t2r), tgt)


def test_ties_resolve_to_lowest_flat_index():
    tgt = torch.ones(1, 8, 3, 5)
    ref = torch.ones(1, 8, 4, 2)
    idx_t2r, idx_r2t = M.match_indices(tgt, ref)
    assert torch.all(idx_t2r == 0) and torch.all(idx_r2t == 0)
    # zero vectors have similarity 0 with everything: also ties -> index 0
    idx_t2r, idx_r2t = M.match_indices(torch.zeros(1, 8, 3, 5), _rand(1, 8, 4, 2, seed=9))
    assert torch.all(idx_t2r == 0)
    # exact duplicates in the reference: the earlier copy wins
    ref = _rand(1, 16, 1, 6, seed=10)
    ref[..., 4] = ref[..., 1]
    idx_t2r, _ = M.match_indices(ref[..., [1]], ref)
    assert idx_t2r.item() == 1


def test_matches_independent_bruteforce_on_random_features():
    tgt = _rand(2, 48, 13, 11, seed=11)
    ref = _rand(2, 48, 9, 15, seed=12)
    idx_t2r, idx_r2t = M.match_indices(tgt, ref)
    o_t2r, o_r2t = _oracle_indices(tgt, ref)
    assert torch.equal(idx_t2r, o_t2r) and torch.equal(idx_r2t, o_r2t)


def _tie_heavy(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with exact duplicates and near-ties below the float32 screening margin."""
    base = torch.round(_rand(1, 24, 8, 12, seed=seed) * 2) / 2  # few levels: many exact duplicates
    ref = base.clone()
    ref[..., ::3] += 1e-6 * _rand(1, 24, 8, 4, seed=seed + 1)  # near ties
    tgt = torch.cat([base[..., :6], _rand(1, 24, 8, 6, seed=seed + 2)], dim=-1)
    tgt[:, :, 2:5] = ref[:, :, 0:1]  # many identical target rows (column-direction ties)
    return tgt, ref


@pytest.mark.parametrize("kind", ["random", "tie_heavy"])
def test_chunking_is_bit_identical(kind):
    if kind == "random":
        tgt, ref = _rand(2, 40, 12, 14, seed=13), _rand(2, 40, 10, 9, seed=14)
    else:
        tgt, ref = _tie_heavy(15)
    results = [M.argmax_flows(tgt, ref, chunk_size=cs) for cs in (1, 7, 4096, None)]
    idx = [M.match_indices(tgt, ref, chunk_size=cs) for cs in (1, 7, 4096, None)]
    for other, other_idx in zip(results[1:], idx[1:], strict=True):
        assert torch.equal(other[0], results[0][0]) and torch.equal(other[1], results[0][1])
        assert torch.equal(other_idx[0], idx[0][0]) and torch.equal(other_idx[1], idx[0][1])


def test_screened_path_equals_exact_definition_and_uses_fixups(monkeypatch):
    """The float32 screening must reproduce the exact integer similarity's argmax, near-ties included."""
    tgt, ref = _tie_heavy(21)
    ut, ur = M._unit_rows(tgt[0]), M._unit_rows(ref[0])
    exact = M._exact_indices(ut, ur, 5)
    calls = {"n": 0}
    original = M._quantise

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return original(x)

    monkeypatch.setattr(M, "_quantise", counting)
    for chunk in (1, 3, 64, 10_000):
        screened = M._screened_indices(ut, ur, chunk)
        assert torch.equal(screened[0], exact[0]) and torch.equal(screened[1], exact[1])
    assert calls["n"] > 0, "the near-tie data must exercise the exact fix-up path"
    # the tiled exact argmax (used by the fix-ups) agrees with the one-pass definition for any tiling
    for rows, entries in ((2, 5), (3, 40), (1000, 10**6)):
        assert torch.equal(M._exact_argmax(ut, ur, rows, entries), exact[0])
        assert torch.equal(M._exact_argmax(ur, ut, rows, entries), exact[1])


def _flat_patches() -> tuple[torch.Tensor, torch.Tensor]:
    """Flat 9x9 patches (81 identical pixels, more than _MAX_CANDIDATES) in both images plus near-ties."""
    tgt, ref = _rand(1, 16, 12, 12, seed=70), _rand(1, 16, 12, 12, seed=71)
    flat = _rand(16, 1, 1, seed=72)
    tgt[0, :, 2:11, 1:10] = flat
    ref[0, :, 3:12, 0:9] = flat
    ref[0, :, 0, :] = tgt[0, :, 0, :] + 1e-7 * _rand(16, 12, seed=73)  # near-ties for the first target row
    ref[0, :, 1, :] = tgt[0, :, 0, :]
    return tgt, ref


@pytest.mark.parametrize("max_candidates", [64, 2])
def test_candidate_and_full_fallbacks_match_exact(monkeypatch, max_candidates):
    monkeypatch.setattr(M, "_MAX_CANDIDATES", max_candidates)
    calls = {"pairs": 0, "full": 0}
    pairs_fn, full_fn = M._exact_pairs, M._exact_argmax

    def count_pairs(*a):
        calls["pairs"] += 1
        return pairs_fn(*a)

    def count_full(*a):
        calls["full"] += 1
        return full_fn(*a)

    monkeypatch.setattr(M, "_exact_pairs", count_pairs)
    monkeypatch.setattr(M, "_exact_argmax", count_full)
    for tgt, ref in (_flat_patches(), _tie_heavy(80)):
        ut, ur = M._unit_rows(tgt[0]), M._unit_rows(ref[0])
        exact = M._exact_indices(ut, ur, 4)
        for chunk in (5, 50, 10_000):
            got = M._screened_indices(ut, ur, chunk)
            assert torch.equal(got[0], exact[0]) and torch.equal(got[1], exact[1])
    assert calls["pairs"] > 0 and calls["full"] > 0
    # flat patches tie: the lowest flat index wins in both directions
    tgt, ref = _flat_patches()
    idx_t2r, idx_r2t = M.match_indices(tgt, ref)
    assert torch.all(idx_t2r[0].view(12, 12)[2:11, 1:10] == 3 * 12 + 0)
    assert torch.all(idx_r2t[0].view(12, 12)[3:12, 0:9] == 2 * 12 + 1)


def test_exact_path_used_when_fp32_matmul_is_not_ieee(monkeypatch):
    tgt, ref = _tie_heavy(31)
    expected = M.match_indices(tgt, ref, chunk_size=3)
    monkeypatch.setattr(M, "_ieee_fp32_matmul", lambda device: False)
    for cs in (1, 7, None):
        got = M.match_indices(tgt, ref, chunk_size=cs)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_half_and_double_inputs():
    ref = _rand(1, 32, 6, 7, seed=40)
    perm = torch.randperm(42, generator=_gen(41))
    tgt = ref.reshape(1, 32, -1)[:, :, perm].reshape(1, 32, 6, 7)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        idx_t2r, _ = M.match_indices(tgt.to(dt), ref.to(dt))
        assert torch.equal(idx_t2r[0], perm)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        M.argmax_flows(torch.full((1, 4, 2, 2), math.nan), torch.ones(1, 4, 2, 2))
    # callers that check once elsewhere may skip it (no host read); the NaN then just flows through
    M.argmax_flows(torch.full((1, 4, 2, 2), math.nan), torch.ones(1, 4, 2, 2), check_finite=False)
    with pytest.raises(ValueError, match="channels"):
        M.argmax_flows(torch.ones(1, 4, 2, 2), torch.ones(1, 5, 2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        M.argmax_flows(torch.ones(1, 4, 2, 2), torch.ones(1, 4, 2, 2), chunk_size=0)


def test_auto_chunk_bounds_memory():
    assert M.auto_chunk_size(128 * 128) * 128 * 128 * 4 <= M.AUTO_CHUNK_BYTES <= 256 * 2**20
    assert M.auto_chunk_size(10**9) == 1


# ------------------------------------------------------------------------------------------------ warp
def test_zero_flow_warp_is_identity():
    x = _rand(3, 5, 7, 9, seed=50)
    assert torch.equal(M.warp(x, torch.zeros(3, 2, 7, 9)), x)
    assert torch.equal(M.warp(x, torch.zeros(1, 2, 7, 9)), x)


def test_integer_flow_equals_manual_gather_bit_for_bit():
    b, c, hr, wr, ht, wt = 2, 6, 5, 7, 4, 6
    x = _rand(b, c, hr, wr, seed=51, dtype=torch.float64)
    flow = torch.randint(-8, 9, (b, 2, ht, wt), generator=_gen(52)).float()
    out = M.warp(x, flow)
    manual = torch.zeros(b, c, ht, wt, dtype=torch.float64)
    for i in range(b):
        for y in range(ht):
            for xx in range(wt):
                sx, sy = xx + int(flow[i, 0, y, xx]), y + int(flow[i, 1, y, xx])
                if 0 <= sx < wr and 0 <= sy < hr:
                    manual[i, :, y, xx] = x[i, :, sy, sx]
    assert torch.equal(out, manual)
    # and it agrees with the official grid_sample formulation
    ys, xs = torch.meshgrid(torch.arange(ht), torch.arange(wt), indexing="ij")
    fl = flow.double()
    grid = torch.stack([2 * (xs + fl[:, 0]) / (wr - 1) - 1, 2 * (ys + fl[:, 1]) / (hr - 1) - 1], dim=-1)
    official = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    torch.testing.assert_close(out, official, rtol=0, atol=1e-12)


def test_fractional_flow_is_bilinear_with_zero_padding():
    x = _rand(1, 3, 4, 5, seed=53, dtype=torch.float64)
    flow = torch.zeros(1, 2, 4, 5, dtype=torch.float64)
    flow[:, 0] = 0.5
    out = M.warp(x, flow)
    expect = torch.zeros_like(x)
    expect[..., :-1] = 0.5 * (x[..., :-1] + x[..., 1:])
    expect[..., -1] = 0.5 * x[..., -1]  # the right neighbour is outside: zeros padding
    torch.testing.assert_close(out, expect, rtol=0, atol=1e-12)
    # single-pixel-wide reference keeps zeros-padding semantics
    x1 = _rand(1, 2, 3, 1, seed=54, dtype=torch.float64)
    f1 = torch.zeros(1, 2, 3, 2, dtype=torch.float64)
    f1[:, 0, :, 1] = -0.25  # target column 1 samples reference x = 0.75: weight 0.25 on pixel 0
    out1 = M.warp(x1, f1)
    torch.testing.assert_close(out1[..., 0], x1[..., 0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out1[..., 1], 0.25 * x1[..., 0], rtol=0, atol=1e-12)


def test_warp_gradients_reach_x_ref():
    x = _rand(1, 2, 4, 4, seed=55, dtype=torch.float64).requires_grad_(True)
    flow = torch.zeros(1, 2, 4, 4)
    flow[0, 0, :, :2] = 1  # columns 0 and 1 both read reference column 1 / 2
    M.warp(x, flow).sum().backward()
    idx, valid = M.flow_to_indices(flow, (4, 4))
    counts = torch.bincount(idx[0][valid[0]], minlength=16).double().view(4, 4)
    assert torch.equal(x.grad[0, 0], counts) and torch.equal(x.grad[0, 1], counts)
    frac = torch.full((1, 2, 3, 3), 0.3, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: M.warp(t, frac), (x.detach().clone().requires_grad_(True),))


def test_heads_folded_into_batch_use_flow_of_their_image():
    b, k, d, h, w = 2, 3, 4, 5, 6
    x = _rand(b * k, d, h, w, seed=56)
    flow = torch.randint(-2, 3, (b, 2, h, w), generator=_gen(57)).float()
    out = M.warp(x, flow)
    for i in range(b * k):
        assert torch.equal(out[i : i + 1], M.warp(x[i : i + 1], flow[i // k : i // k + 1]))
    frac = flow + 0.25
    out = M.warp(x, frac)
    for i in range(b * k):
        torch.testing.assert_close(out[i : i + 1], M.warp(x[i : i + 1], frac[i // k : i // k + 1]))
    with pytest.raises(ValueError, match="multiple"):
        M.warp(x[:5], flow)


def test_warp_tokens_matches_grid_warp():
    b, d, hr, wr, ht, wt = 2, 10, 5, 6, 4, 7
    grid_x = _rand(b, d, hr, wr, seed=58)
    tokens = grid_x.flatten(2).transpose(1, 2)
    flow = torch.randint(-3, 4, (b, 2, ht, wt), generator=_gen(59)).float()
    expect = M.warp(grid_x, flow).flatten(2).transpose(1, 2)
    assert torch.equal(M.warp_tokens(tokens, flow, (hr, wr)), expect)
    frac = flow + 0.5
    torch.testing.assert_close(
        M.warp_tokens(tokens, frac, (hr, wr)), M.warp(grid_x, frac).flatten(2).transpose(1, 2)
    )
    with pytest.raises(ValueError, match="ref_hw"):
        M.warp_tokens(tokens, flow)


# ------------------------------------------------------------------------------------------------ cycles
def test_cycle_error_zero_for_bijection():
    c, h, w = 64, 8, 9
    ref = _rand(1, c, h, w, seed=60)
    perm = torch.randperm(h * w, generator=_gen(61))
    tgt = ref.reshape(1, c, -1)[:, :, perm].reshape(1, c, h, w)
    err = M.cycle_error(*M.argmax_flows(tgt, ref))
    assert err.shape == (1, 1, h, w)
    assert torch.all(err == 0)


def test_cycle_error_many_to_one_hand_computed():
    # Target 5x5, reference 2x2.  t2r: every target pixel -> reference (0, 0) except target (4, 4) -> (1, 1).
    # r2t: reference (0, 0) -> target (3, 4); reference (1, 1) -> target (4, 4); others -> target (0, 0).
    f_t2r = torch.zeros(1, 2, 5, 5)
    xs, ys = _grid(5, 5)
    f_t2r[0, 0], f_t2r[0, 1] = -xs.float(), -ys.float()
    f_t2r[0, :, 4, 4] = torch.tensor([1 - 4, 1 - 4]).float()
    f_r2t = torch.zeros(1, 2, 2, 2)
    f_r2t[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # (x, y) = (3, 4)
    f_r2t[0, :, 1, 1] = torch.tensor([4 - 1, 4 - 1]).float()
    err = M.cycle_error(f_t2r, f_r2t)[0, 0]
    expect = torch.sqrt((xs - 3.0) ** 2 + (ys - 4.0) ** 2)
    expect[4, 4] = 0.0
    assert torch.equal(err, expect)
    assert err[0, 0] == 5.0 and err[4, 0] == 3.0 and err[4, 3] == 0.0  # err[y, x]; (0, 4) is 3 px away


def test_cycle_error_out_of_range_reads_zero_backward_flow():
    f_t2r = torch.zeros(1, 2, 1, 2)
    f_t2r[0, :, 0, 1] = torch.tensor([3.0, 4.0])  # leaves the 1x2 reference
    f_r2t = torch.zeros(1, 2, 1, 2)
    err = M.cycle_error(f_t2r, f_r2t)
    assert err[0, 0, 0, 1] == 5.0 and err[0, 0, 0, 0] == 0.0


# ------------------------------------------------------------------------------------------------ confidence
def test_confidence_hand_example_with_sqrt_hw_mean_mask_scaling():
    # 4x9 grid: sqrt(H*W) = 6 (neither H nor W).  Item 0: mask mean 0.25 -> threshold 0.4*6*0.25 = 0.6.
    # Item 1: mask mean 0.5 -> threshold 1.2.
    err = torch.zeros(2, 1, 4, 9)
    err[:, 0, 0, :5] = torch.tensor([0.0, 0.59, 0.6, 1.1, 1.3])
    mask = torch.zeros(2, 1, 4, 9)
    mask[0, 0, :, :] = 0.25
    mask[1, 0, :2, :] = 1.0
    conf = M.confidence(err, mask, 0.4)
    assert conf.shape == (2, 1, 4, 9) and conf.dtype == err.dtype
    assert conf[0, 0, 0, :5].tolist() == [1.0, 1.0, 0.0, 0.0, 0.0]  # strict '<' at exactly 0.6
    assert conf[1, 0, 0, :5].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert torch.all(conf[:, :, 1:] == 1.0)
    # empty mask: nothing is confident
    assert torch.all(M.confidence(err, torch.zeros(2, 1, 4, 9), 0.4) == 0)
    # mask batch 1 broadcasts
    torch.testing.assert_close(M.confidence(err, mask[:1], 0.4)[0], conf[0])


def test_flows_do_not_depend_on_the_summation_order_of_the_normalisation():
    """A proxy for CPU == GPU: CUDA and CPU kernels sum a pixel's squares in different orders.

    Permuting the channels of both maps changes that order but not one similarity. Rank-2
    descriptors make most similarities near-ties, so any last-bit change of a unit row flips
    matches (measured on an H200 before the float64 normalisation: 5% of pixels differed from the
    CPU). The flows must be bit-identical.
    """
    g = torch.Generator().manual_seed(3)
    basis = torch.randn(2, 64, generator=g, dtype=torch.float64)
    ft = (torch.randn(64 * 64, 2, generator=g, dtype=torch.float64) @ basis).T.reshape(1, 64, 64, 64)
    fr = (torch.randn(64 * 64, 2, generator=g, dtype=torch.float64) @ basis).T.reshape(1, 64, 64, 64)
    ft, fr = ft.float(), fr.float()
    want = M.argmax_flows(ft, fr)
    for seed in range(4):
        perm = torch.randperm(64, generator=torch.Generator().manual_seed(seed))
        got = M.argmax_flows(ft[:, perm], fr[:, perm])
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), seed
