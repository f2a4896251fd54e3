"""Matching descriptors: joint (co-)PCA of reference and target UNet features (docs/method.md, "Decoder
features and co-PCA descriptors").

The official code projects each decoder layer with ``torch.pca_lowrank(q=256)``, which is randomised and
consumes the global RNG (docs/method.md, "Paper, official code and this pack").  By default the PCA here
is exact: the eigen-decomposition of the covariance (or a thin SVD when there are fewer pixels than
channels), with a fixed sign convention, so the same inputs always give the same descriptor and the global
RNG is never touched.  The top-``dim`` subspace is the one ``pca_lowrank`` approximates, so the
descriptors agree with the official ones up to that approximation and per-component signs (which cosine
similarity does not see as long as ref and tgt share the basis, and they do).

``solver="lowrank"`` is the faster alternative (docs/method.md, "A faster PCA"): randomised subspace
iteration on the same covariance, with its own seeded generator (drawn on the CPU, so the test matrix is
the same on every device), then an eigen-decomposition of a ``(dim + 8)``-square matrix instead of the
``C``-square one.  On a GPU the full eigen-solver dominates the matching time; on a CPU it does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PCA_SOLVERS", "pca_basis", "co_pca", "describe", "resize_descriptor"]

#: ``exact`` (full eigen-decomposition, the default) or ``lowrank`` (seeded randomised subspace iteration).
PCA_SOLVERS = ("exact", "lowrank")
#: Extra directions the low-rank solver iterates on beyond ``dim`` (a standard oversampling), its power
#: iterations on the covariance, and the seed of its test matrix.
LOWRANK_OVERSAMPLE = 8
LOWRANK_ITERS = 2
LOWRANK_SEED = 0


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half/bfloat16 are upcast: the covariance of 8192 pixels overflows/underflows in half precision and the
    # official code also runs co_pca in float32.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fix_signs(vecs: Tensor) -> Tensor:
    """Make the largest-|value| entry of every column positive (first such entry on exact ties).

    Eigenvectors are only defined up to sign; without a convention, two runs (or two devices) may return
    opposite projections.  ``argmax`` returns the first maximal index, so the convention is total.
    """
    pivot = vecs.abs().argmax(dim=0)
    signs = torch.sign(vecs.gather(0, pivot.unsqueeze(0)))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vecs * signs


def _lowrank_eigh(cov: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of the symmetric PSD ``cov`` by randomised subspace iteration (descending).

    A Gaussian test matrix of ``k + LOWRANK_OVERSAMPLE`` columns, drawn from a generator seeded with
    ``LOWRANK_SEED`` on the CPU (the same numbers on every device, the global RNG untouched), is pushed
    through ``cov`` ``LOWRANK_ITERS + 1`` times with a QR re-orthonormalisation each time; the
    Rayleigh-Ritz step then solves the small projected problem exactly. Each iteration sharpens the
    subspace by the ratio of the eigenvalues inside and outside it, so the top directions come out to
    float precision and the last few of the ``k`` are the least accurate.
    """
    c = cov.shape[0]
    q = min(c, k + LOWRANK_OVERSAMPLE)
    gen = torch.Generator().manual_seed(LOWRANK_SEED)
    basis = torch.randn(c, q, generator=gen, dtype=cov.dtype)
    if cov.is_cuda:  # from pinned memory the copy is queued, not waited for
        basis = basis.pin_memory().to(cov.device, non_blocking=True)
    else:
        basis = basis.to(cov.device)
    for _ in range(LOWRANK_ITERS + 1):
        basis, _ = torch.linalg.qr(cov @ basis)
    evals, evecs = torch.linalg.eigh(basis.T @ cov @ basis)  # ascending
    return evals.flip(0)[:k], (basis @ evecs.flip(1))[:, :k]


def pca_basis(rows: Tensor, dim: int, *, check_finite: bool = True,
              solver: str = "exact") -> tuple[Tensor, Tensor, Tensor]:
    """PCA of ``rows [N, C]``: ``(mean [C], components [C, k], variances [k])``, ``k = min(dim, C, N)``.

    Components are orthonormal columns sorted by decreasing variance, with :func:`_fix_signs` applied.
    Work dtype: float64 for float64 input, float32 otherwise.  When ``N >= C`` the ``C x C`` covariance is
    decomposed; otherwise the thin SVD of the centred rows (same non-zero spectrum, cheaper).
    ``k`` is clipped to the structural rank bound ``min(C, N)``, not to the numerical rank, so the output
    width is predictable from the shapes alone (directions beyond the numerical rank have ~zero variance
    and project to ~zero).  The result does not depend on the order of the rows up to floating-point
    rounding of the sums.  ``check_finite=False`` skips the NaN/Inf check, a read back to the host (a GPU
    synchronisation), for callers that check once elsewhere.  ``solver="lowrank"`` replaces the full
    eigen-decomposition by :func:`_lowrank_eigh` (same shapes and sign convention; the thin-SVD case for
    fewer pixels than channels stays exact).
    """
    if solver not in PCA_SOLVERS:
        raise ValueError(f"solver must be one of {PCA_SOLVERS}; got '{solver}'")
    if rows.dim() != 2:
        raise ValueError(f"rows must be [N, C], got {tuple(rows.shape)}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    n, c = rows.shape
    if n == 0:
        raise ValueError("cannot fit a PCA on zero rows")
    x = rows.to(_work_dtype(rows.dtype))
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError("features contain NaN or Inf")
    mean = x.mean(dim=0)
    xc = x - mean
    k = min(dim, c, n)
    if n >= c and solver == "lowrank" and k + LOWRANK_OVERSAMPLE < c:
        evals, evecs = _lowrank_eigh(xc.T @ xc, k)
    elif n >= c:
        cov = xc.T @ xc
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0)[:k], evecs.flip(1)[:, :k]
    else:
        # Fewer pixels than channels: the thin SVD of the centred rows is cheaper than a C x C eigh and
        # gives the same non-zero spectrum.
        _, sing, vh = torch.linalg.svd(xc, full_matrices=False)
        evals, evecs = (sing * sing)[:k], vh[:k].T
    evecs = _fix_signs(evecs)
    variances = evals.clamp_min(0) / max(n - 1, 1)
    return mean, evecs, variances


def _pixels(feat: Tensor) -> Tensor:
    """``[C, H, W]`` -> ``[H*W, C]`` (row-major pixel order)."""
    return feat.reshape(feat.shape[0], -1).T


def co_pca(feat_a: Tensor, feat_b: Tensor, dim: int, *, check_finite: bool = True,
           solver: str = "exact") -> tuple[Tensor, Tensor]:
    """Joint PCA of two feature maps, projected separately: ``([B,k,Ha,Wa], [B,k,Hb,Wb])``.

    Per batch item (the official code runs one co-PCA per CFG branch), the pixels of both maps are
    stacked, centred with their *shared* mean and projected onto the top ``k = min(dim, C, Na+Nb)``
    principal directions (no whitening, as official).  Exact and deterministic (see :func:`pca_basis`).
    Returns the input dtype; the sizes of ``a`` and ``b`` may differ.  Unbatched ``[C,H,W]`` inputs are
    accepted too and give unbatched ``[k,H,W]`` outputs.
    """
    if feat_a.dim() == 3 and feat_b.dim() == 3:
        pa, pb = co_pca(feat_a.unsqueeze(0), feat_b.unsqueeze(0), dim, check_finite=check_finite,
                        solver=solver)
        return pa[0], pb[0]
    if feat_a.dim() != 4 or feat_b.dim() != 4:
        raise ValueError(
            f"co_pca expects [B,C,H,W] inputs, got {tuple(feat_a.shape)} and {tuple(feat_b.shape)}"
        )
    if feat_a.shape[:2] != feat_b.shape[:2]:
        raise ValueError(
            f"co_pca inputs must share batch and channels: {tuple(feat_a.shape)} vs {tuple(feat_b.shape)}"
        )
    b, _, ha, wa = feat_a.shape
    hb, wb = feat_b.shape[2:]
    out_a, out_b = [], []
    with torch.no_grad():
        for i in range(b):
            pa, pb = _pixels(feat_a[i]), _pixels(feat_b[i])
            rows = torch.cat([pa, pb], dim=0)
            mean, comps, _ = pca_basis(rows, dim, check_finite=check_finite, solver=solver)
            work = comps.dtype
            proj_a = (pa.to(work) - mean) @ comps
            proj_b = (pb.to(work) - mean) @ comps
            out_a.append(proj_a.T.reshape(-1, ha, wa))
            out_b.append(proj_b.T.reshape(-1, hb, wb))
    return torch.stack(out_a).to(feat_a.dtype), torch.stack(out_b).to(feat_b.dtype)


def resize_descriptor(desc: Tensor, size: tuple[int, int]) -> Tensor:
    """Resize a descriptor ``[B,C,H,W]`` to an attention layer's grid ``size = (h, w)``.

    Bilinear with ``align_corners=False`` as the official ``attn_batch_match`` (docs/method.md, "Decoder
    features and co-PCA descriptors"):
    halving a 64x64 descriptor is then an exact 2x2 average.  It is *not* re-normalised: the matcher
    computes cosine similarity, which re-normalises anyway (as the official code does).
    """
    h, w = int(size[0]), int(size[1])
    if desc.shape[-2:] == (h, w):
        return desc
    work = _work_dtype(desc.dtype)
    return F.interpolate(desc.to(work), size=(h, w), mode="bilinear", align_corners=False).to(desc.dtype)


def _largest_grid(feats: Sequence[Tensor]) -> tuple[int, int]:
    best = max(feats, key=lambda f: f.shape[-2] * f.shape[-1])  # first of the largest on ties
    return int(best.shape[-2]), int(best.shape[-1])


def describe(
    feats_ref: Sequence[Tensor],
    feats_tgt: Sequence[Tensor],
    *,
    pca_dim: int = 256,
    grid: tuple[int, int] | None = None,
    grid_ref: tuple[int, int] | None = None,
    grid_tgt: tuple[int, int] | None = None,
    check_finite: bool = True,
    pca_solver: str = "exact",
) -> tuple[Tensor, Tensor]:
    """Official matching descriptor (docs/method.md, "Decoder features and co-PCA descriptors"):
    ``(desc_ref [B,D,Hr,Wr], desc_tgt [B,D,Ht,Wt])``.

    ``feats_ref[l]`` and ``feats_tgt[l]`` are the same decoder layer ``l`` of the two branches
    (``[B, C_l, H, W]``; official: ``up_blocks[1]`` 1280@32 and ``up_blocks[2]`` 640@64 of SD1.x).

    1. Each layer is resized bilinearly (``align_corners=True``, the official ``pre_interpolation``) to
       its side's grid *before* the PCA, as the official code does (PCA of resized pixels differs slightly
       from resizing PCA outputs, because the mean/covariance see interpolated pixels).  The grid of a side
       is ``grid_ref``/``grid_tgt``, else ``grid``, else the largest grid among that side's layers, so the
       two sides may have different sizes and aspect ratios.
    2. Per layer, :func:`co_pca` to ``pca_dim`` channels, jointly over ref and tgt pixels.
    3. Channels are concatenated finest layer first (largest native H*W first; stable for equal sizes).
       For SD1.x this gives the official ``[PCA(up_feat3), PCA(up_feat2)]`` (512 channels).  The paper
       (E.1) describes a single 1920 -> 256 PCA instead; the code is followed.
    4. Every pixel is L2-normalised over all channels jointly.
    The descriptors are returned in the dtype of the first reference layer.  The function is symmetric:
    ``describe(a, b)`` returns the descriptors in argument order, so callers may pass the target first.
    ``check_finite=False`` skips the per-layer NaN/Inf checks and ``pca_solver`` picks the PCA's solver
    (see :func:`pca_basis`).
    """
    if len(feats_ref) != len(feats_tgt) or not feats_ref:
        raise ValueError("describe needs the same, non-zero number of reference and target layers")
    g_ref = grid_ref or grid or _largest_grid(feats_ref)
    g_tgt = grid_tgt or grid or _largest_grid(feats_tgt)
    order = sorted(range(len(feats_ref)), key=lambda i: -(feats_ref[i].shape[-2] * feats_ref[i].shape[-1]))
    out_dtype = feats_ref[0].dtype
    parts_ref, parts_tgt = [], []
    with torch.no_grad():
        for i in order:
            fr, ft = feats_ref[i], feats_tgt[i]
            fr = _resize_ac(fr, g_ref)
            ft = _resize_ac(ft, g_tgt)
            pr, pt = co_pca(fr, ft, pca_dim, check_finite=check_finite, solver=pca_solver)
            parts_ref.append(pr)
            parts_tgt.append(pt)
        desc_ref = F.normalize(torch.cat(parts_ref, dim=1), dim=1, eps=1e-12)
        desc_tgt = F.normalize(torch.cat(parts_tgt, dim=1), dim=1, eps=1e-12)
    return desc_ref.to(out_dtype), desc_tgt.to(out_dtype)


def _resize_ac(feat: Tensor, size: tuple[int, int]) -> Tensor:
    if feat.dim() != 4:
        raise ValueError(f"features must be [B,C,H,W], got {tuple(feat.shape)}")
    if tuple(feat.shape[-2:]) == tuple(size):
        return feat.to(_work_dtype(feat.dtype))
    work = feat.to(_work_dtype(feat.dtype))
    return F.interpolate(work, size=tuple(size), mode="bilinear", align_corners=True)
