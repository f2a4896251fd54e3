"""Oracle tests for dreammatcher_core.features: exact co-PCA and the official descriptor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreammatcher_core import features as Fe


def _spectral(b: int, c: int, h: int, w: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    """Features with a clearly decaying spectrum (distinct eigenvalues => unique components)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, c, dtype=dtype)
    basis, _ = torch.linalg.qr(torch.randn(c, c, generator=g, dtype=dtype))
    z = torch.randn(b, h * w, c, generator=g, dtype=dtype) * scales
    return (z @ basis.T + 0.3).transpose(1, 2).reshape(b, c, h, w)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).T


def test_co_pca_is_deterministic_and_shaped():
    a = _spectral(2, 24, 6, 7, seed=1, dtype=torch.float32)
    b = _spectral(2, 24, 5, 9, seed=2, dtype=torch.float32)
    pa, pb = Fe.co_pca(a, b, 10)
    qa, qb = Fe.co_pca(a, b, 10)
    assert pa.shape == (2, 10, 6, 7) and pb.shape == (2, 10, 5, 9)
    assert pa.dtype == torch.float32
    assert torch.equal(pa, qa) and torch.equal(pb, qb)


def test_co_pca_explained_variance_matches_exact_svd():
    dim = 6
    a, b = _spectral(1, 20, 8, 8, seed=3), _spectral(1, 20, 6, 10, seed=4)
    pa, pb = Fe.co_pca(a, b, dim)
    x = torch.cat([_rows(a[0]), _rows(b[0])], dim=0)
    xc = x - x.mean(dim=0)
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    proj = torch.cat([_rows(pa[0]), _rows(pb[0])], dim=0)
    explained = (proj**2).sum()
    expected = (s[:dim] ** 2).sum()
    assert abs(explained - expected) / expected < 1e-5
    # per component, and the spanned subspace itself
    torch.testing.assert_close((proj**2).sum(dim=0), s[:dim] ** 2, rtol=1e-5, atol=0)
    v = torch.linalg.lstsq(xc, proj).solution  # recovered projection matrix [C, dim]
    torch.testing.assert_close(v @ v.T, vh[:dim].T @ vh[:dim], rtol=0, atol=1e-8)
    # shared mean: projections of all pixels are centred jointly, not per input
    torch.testing.assert_close(proj.mean(dim=0), torch.zeros(dim, dtype=torch.float64), rtol=0, atol=1e-10)
    assert pa[0].reshape(dim, -1).mean(dim=1).abs().max() > 1e-3


def test_co_pca_invariant_to_pixel_shuffle():
    a, b = _spectral(1, 16, 7, 6, seed=5), _spectral(1, 16, 4, 8, seed=6)
    pa, pb = Fe.co_pca(a, b, 5)
    g = torch.Generator().manual_seed(7)
    perm_a, perm_b = torch.randperm(42, generator=g), torch.randperm(32, generator=g)
    a_s = a.reshape(1, 16, -1)[:, :, perm_a].reshape(1, 16, 7, 6)
    b_s = b.reshape(1, 16, -1)[:, :, perm_b].reshape(1, 16, 4, 8)
    qa, qb = Fe.co_pca(a_s, b_s, 5)
    torch.testing.assert_close(qa.reshape(1, 5, -1), pa.reshape(1, 5, -1)[:, :, perm_a], rtol=0, atol=1e-10)
    torch.testing.assert_close(qb.reshape(1, 5, -1), pb.reshape(1, 5, -1)[:, :, perm_b], rtol=0, atol=1e-10)


def test_co_pca_sign_convention_and_symmetry():
    a, b = _spectral(1, 12, 5, 5, seed=8), _spectral(1, 12, 5, 5, seed=9)
    mean, comps, var = Fe.pca_basis(torch.cat([_rows(a[0]), _rows(b[0])]), 4)
    pivot = comps.abs().argmax(dim=0)
    assert torch.all(comps[pivot, torch.arange(4)] > 0)
    assert torch.all(var[:-1] >= var[1:])
    # joint PCA is symmetric in its arguments
    pa, pb = Fe.co_pca(a, b, 4)
    qb, qa = Fe.co_pca(b, a, 4)
    torch.testing.assert_close(pa, qa, rtol=0, atol=1e-10)
    torch.testing.assert_close(pb, qb, rtol=0, atol=1e-10)


def test_co_pca_dim_clipped_and_batch_items_independent():
    a, b = _spectral(2, 8, 3, 3, seed=10), _spectral(2, 8, 3, 3, seed=11)
    pa, _ = Fe.co_pca(a, b, 50)
    assert pa.shape[1] == 8  # clipped to C
    tiny_a, tiny_b = _spectral(1, 30, 2, 2, seed=12), _spectral(1, 30, 2, 2, seed=13)
    ta, tb = Fe.co_pca(tiny_a, tiny_b, 256)
    assert ta.shape == (1, 8, 2, 2) and tb.shape == (1, 8, 2, 2)  # clipped to the 8 pixels
    one, _ = Fe.co_pca(a[1:], b[1:], 5)
    both, _ = Fe.co_pca(a, b, 5)
    torch.testing.assert_close(both[1:], one, rtol=0, atol=0)


def test_co_pca_half_input_and_unbatched():
    a = _spectral(1, 16, 4, 4, seed=14, dtype=torch.float32)
    b = _spectral(1, 16, 4, 4, seed=15, dtype=torch.float32)
    ha, hb = Fe.co_pca(a.half(), b.half(), 4)
    assert ha.dtype == torch.float16 and torch.isfinite(ha).all() and torch.isfinite(hb).all()
    ua, ub = Fe.co_pca(a[0], b[0], 4)
    fa, fb = Fe.co_pca(a, b, 4)
    assert ua.shape == (4, 4, 4)
    assert torch.equal(ua, fa[0]) and torch.equal(ub, fb[0])


def test_describe_official_recipe_and_order():
    g = torch.Generator().manual_seed(16)
    coarse_r, fine_r = torch.randn(1, 24, 4, 4, generator=g), torch.randn(1, 12, 8, 8, generator=g)
    coarse_t, fine_t = torch.randn(1, 24, 4, 4, generator=g), torch.randn(1, 12, 8, 8, generator=g)
    dr, dt = Fe.describe([coarse_r, fine_r], [coarse_t, fine_t], pca_dim=5)
    assert dr.shape == (1, 10, 8, 8) and dt.shape == (1, 10, 8, 8)
    torch.testing.assert_close(dr.norm(dim=1), torch.ones(1, 8, 8))
    # manual recipe: resize (align_corners=True) before PCA, finest layer first, joint L2 norm
    up_r = F.interpolate(coarse_r, size=(8, 8), mode="bilinear", align_corners=True)
    up_t = F.interpolate(coarse_t, size=(8, 8), mode="bilinear", align_corners=True)
    p_fine = Fe.co_pca(fine_r, fine_t, 5)
    p_coarse = Fe.co_pca(up_r, up_t, 5)
    exp_r = F.normalize(torch.cat([p_fine[0], p_coarse[0]], dim=1), dim=1)
    exp_t = F.normalize(torch.cat([p_fine[1], p_coarse[1]], dim=1), dim=1)
    torch.testing.assert_close(dr, exp_r)
    torch.testing.assert_close(dt, exp_t)
    # the order of the list does not matter (finest first by size)
    dr2, dt2 = Fe.describe([fine_r, coarse_r], [fine_t, coarse_t], pca_dim=5)
    torch.testing.assert_close(dr2, dr, rtol=0, atol=0)


def test_describe_grids_per_side_any_aspect():
    g = torch.Generator().manual_seed(17)
    ref = [torch.randn(1, 10, 4, 4, generator=g), torch.randn(1, 6, 8, 8, generator=g)]
    tgt = [torch.randn(1, 10, 3, 5, generator=g), torch.randn(1, 6, 6, 10, generator=g)]
    dr, dt = Fe.describe(ref, tgt, pca_dim=4)
    assert dr.shape == (1, 8, 8, 8) and dt.shape == (1, 8, 6, 10)
    dr, dt = Fe.describe(ref, tgt, pca_dim=4, grid=(5, 7))
    assert dr.shape[-2:] == (5, 7) and dt.shape[-2:] == (5, 7)
    dr, dt = Fe.describe(ref, tgt, pca_dim=4, grid_ref=(4, 4), grid_tgt=(3, 9))
    assert dr.shape[-2:] == (4, 4) and dt.shape[-2:] == (3, 9)
    with pytest.raises(ValueError):
        Fe.describe(ref, tgt[:1])


def test_resize_descriptor_official_bilinear():
    d = torch.randn(1, 6, 8, 8, generator=torch.Generator().manual_seed(18))
    half = Fe.resize_descriptor(d, (4, 4))
    torch.testing.assert_close(half, F.avg_pool2d(d, 2))  # align_corners=False halving = 2x2 mean
    assert Fe.resize_descriptor(d, (8, 8)) is d
    assert Fe.resize_descriptor(d.half(), (5, 3)).dtype == torch.float16


def test_lowrank_solver_recovers_the_exact_top_subspace():
    """Oracle: with distinct top variances and a spectral gap after them, the seeded low-rank solver
    finds the same principal directions and variances as the exact eigen-decomposition, with the same
    sign convention (each power iteration shrinks the error by the gap ratio, here 1e-4 per pass)."""
    g = torch.Generator().manual_seed(11)
    scales = torch.cat([torch.logspace(2, 1, 12, dtype=torch.float64), torch.full((84,), 0.01,
                                                                                   dtype=torch.float64)])
    basis, _ = torch.linalg.qr(torch.randn(96, 96, generator=g, dtype=torch.float64))
    x = (torch.randn(256, 96, generator=g, dtype=torch.float64) * scales) @ basis.T + 0.3  # k + 8 < 96
    mean, exact, var = Fe.pca_basis(x, 12)
    mean_l, low, var_l = Fe.pca_basis(x, 12, solver="lowrank")
    assert low.shape == exact.shape == (96, 12) and var_l.shape == (12,)
    torch.testing.assert_close(mean_l, mean, rtol=0, atol=0)
    torch.testing.assert_close(low, exact, rtol=0, atol=1e-6)
    torch.testing.assert_close(var_l, var, rtol=1e-9, atol=0)
    torch.testing.assert_close(low.T @ low, torch.eye(12, dtype=low.dtype), rtol=0, atol=1e-10)


def test_lowrank_solver_is_seeded_and_leaves_the_global_rng_alone():
    x = _rows(_spectral(1, 64, 12, 12, seed=12, dtype=torch.float32)[0])
    state = torch.random.get_rng_state()
    first = Fe.pca_basis(x, 10, solver="lowrank")
    second = Fe.pca_basis(x, 10, solver="lowrank")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_lowrank_solver_falls_back_to_exact_when_dim_is_close_to_channels():
    """No room for oversampling (dim + 8 >= C) or fewer rows than channels: the exact path runs."""
    x = _rows(_spectral(1, 16, 8, 8, seed=13)[0])
    for dim in (8, 12):
        got, want = Fe.pca_basis(x, dim, solver="lowrank"), Fe.pca_basis(x, dim)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    few = _rows(_spectral(1, 64, 3, 3, seed=14)[0])  # 9 rows, 64 channels
    got, want = Fe.pca_basis(few, 4, solver="lowrank"), Fe.pca_basis(few, 4)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_describe_with_the_lowrank_solver_gives_nearly_the_same_descriptor():
    ref = [_spectral(1, 80, 8, 8, seed=15, dtype=torch.float32), _spectral(1, 40, 16, 16, seed=16,
                                                                            dtype=torch.float32)]
    tgt = [_spectral(1, 80, 8, 8, seed=17, dtype=torch.float32), _spectral(1, 40, 16, 16, seed=18,
                                                                            dtype=torch.float32)]
    exact = Fe.describe(ref, tgt, pca_dim=16)
    low = Fe.describe(ref, tgt, pca_dim=16, pca_solver="lowrank")
    for e, lo in zip(exact, low, strict=True):
        assert e.shape == lo.shape
        assert (e * lo).sum(dim=1).min() > 0.999  # per-pixel cosine of the two descriptors
    with pytest.raises(ValueError, match="solver"):
        Fe.describe(ref, tgt, pca_dim=16, pca_solver="fast")


def test_check_finite_false_skips_only_the_check():
    """Without the check, NaN input is no longer refused up front (the eigen-solver may fail on it, or
    NaN comes out); finite input gives the same result bit for bit."""
    bad = _spectral(1, 8, 4, 4, seed=19)
    bad[0, 0, 0, 0] = float("nan")
    good = _spectral(1, 8, 4, 4, seed=20)
    with pytest.raises(ValueError, match="NaN"):
        Fe.co_pca(bad, good, 4)
    try:
        pa, _ = Fe.co_pca(bad, good, 4, check_finite=False)
    except ValueError:
        pytest.fail("check_finite=False still checked")
    except RuntimeError:  # the solver's own failure on NaN
        pass
    else:
        assert not torch.isfinite(pa).all()
    a, b = _spectral(1, 8, 4, 4, seed=21), _spectral(1, 8, 4, 4, seed=22)
    assert all(torch.equal(x, y) for x, y in zip(Fe.co_pca(a, b, 4), Fe.co_pca(a, b, 4, check_finite=False),
                                                  strict=True))
