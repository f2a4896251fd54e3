"""Dense argmax matching, warping and cycle consistency (docs/method.md, "Semantic matching",
"Cycle-consistency confidence").

Conventions (shared by the whole package and by the nodes):

* Feature maps are ``[B, C, H, W]``; a pixel ``(x, y)`` has the row-major flat index ``y * W + x``, which
  is also ComfyUI's token index for an attention layer on an ``H x W`` grid.
* A flow is a float tensor ``[B, 2, H, W]`` defined on the grid it starts from.  Channel 0 is the x
  (column) offset and channel 1 the y (row) offset, in pixels of the grid it points into:
  ``flow_t2r[b, :, y, x] = (x_r - x, y_r - y)``.  This is the official code's layout (``corr_to_matches``
  builds ``(x_s - x_t, y_s - y_t)``), so flows can be compared with it directly.
* Out-of-range samples read zeros, as ``grid_sample(padding_mode="zeros")`` does in the official ``warp``.

Exactness of the argmax
-----------------------
The issue demands that the matches are bit-identical whatever the chunk size.  A float32 matmul does *not*
give that: BLAS picks different kernels (and so different summation orders) for different numbers of
rows, and on this machine a 1-row or 7-row chunk already differs from a 4096-row chunk in the last bit,
which flips the argmax of near-ties.  So the *definition* of the similarity used for the argmax is made
order independent:

* every feature vector is L2-normalised once (float32, or float64 for float64 input) and then rounded to
  integers ``q = round(v * 2**26)``;
* the similarity is the integer dot product ``q_t . q_r`` computed in float64.  By Cauchy-Schwarz every
  partial sum is bounded by ``|q_t| |q_r| <= 2**52 (1 + tiny)``, so every product and every partial sum is
  an integer below ``2**53`` and hence exact in float64, in *any* summation order, on any device.

That is the cosine similarity of the official code up to the quantisation, which moves a similarity by at
most ``sqrt(C) * 2**-26`` (3e-7 at C = 512, typically far less): the same order as the rounding noise of
the official float32 cost volume.  It also makes ties well defined: they resolve to the lowest flat index.

Doing every dot product in float64 would cost about twice the float32 matmul, so on back-ends whose
float32 matmul is IEEE (not TF32/bf16) a float32 *screening* pass is used instead.  Its rounding error
has the rigorous bound ``delta`` (see :func:`_screening_bound`), so a row (or column) whose float32 maximum
beats every other entry by more than ``2 * delta`` has provably the same argmax as the exact integer
similarity.  For the few others, the entries within ``2 * delta`` of the maximum are re-evaluated exactly
(:func:`_screened_indices`).  The result is therefore identical to the exact path whatever the chunk
size, and it costs one float32 matmul plus a few exact dot products in the common case.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "argmax_flows",
    "match_indices",
    "flows_from_indices",
    "flow_to_indices",
    "auto_chunk_size",
    "warp",
    "warp_tokens",
    "cycle_error",
    "confidence",
]

#: Fractional bits kept by the quantisation of the unit-normalised features (see the module docstring).
QUANT_BITS = 26
#: Bytes of the float32 similarity chunk when ``chunk_size`` is None.  Few, large chunks beat many small
#: ones: each chunk costs a handful of multi-threaded reductions, and on a busy machine every parallel
#: region pays a scheduling delay.  At 128x128 the whole call stays far below the 512 MB target
#: (``benchmarks/bench_core.py`` measures it).
AUTO_CHUNK_BYTES = 64 * 2**20
#: Bytes of one quantised key tile in the exact recomputation of ambiguous rows/columns.
_KEY_TILE_BYTES = 16 * 2**20


# --------------------------------------------------------------------------------------------- helpers
def _check_feature_pair(feat_tgt: Tensor, feat_ref: Tensor) -> None:
    if feat_tgt.dim() != 4 or feat_ref.dim() != 4:
        raise ValueError(
            f"features must be [B,C,H,W]; got target {tuple(feat_tgt.shape)} "
            f"and reference {tuple(feat_ref.shape)}"
        )
    if feat_tgt.shape[:2] != feat_ref.shape[:2]:
        raise ValueError(
            "target and reference features must share batch size and channels; got "
            f"{tuple(feat_tgt.shape)} and {tuple(feat_ref.shape)}"
        )
    if feat_tgt.device != feat_ref.device:
        raise ValueError(f"features are on different devices: {feat_tgt.device} and {feat_ref.device}")
    if not (feat_tgt.is_floating_point() and feat_ref.is_floating_point()):
        raise TypeError("features must be floating point tensors")


def _unit_rows(feat: Tensor, check_finite: bool = True) -> Tensor:
    """``[C, H, W]`` -> ``[H*W, C]`` unit rows (float32, or float64 for float64 input), never aliasing input.

    The result is the transposed view of a contiguous ``[C, H*W]`` buffer: BLAS takes it as a transposed
    operand, so no layout copy is needed (fewer passes over memory, and fewer multi-threaded regions).
    Zero vectors stay zero (their similarity to everything is 0, so they tie everywhere and resolve to
    index 0).  Non-finite values are rejected: torch's max treats NaN as the maximum, which would make
    the matches meaningless without any error.  Checking the per-pixel norms is enough (a NaN or Inf
    component makes the norm non-finite) and reads ``C`` times less memory than checking every value.
    """
    c = feat.shape[0]
    dtype = torch.float64 if feat.dtype == torch.float64 else torch.float32
    # The normalisation runs in float64 and is rounded once to the work dtype. WHY: a float32 sum of
    # squares depends on the summation order, which differs between CPU and CUDA kernels; a last-bit
    # difference in a unit row changes its quantised integers and can flip near-ties, so the same
    # features matched differently on CPU and GPU (measured on an H200: 5% of pixels for rank-2
    # descriptors). In float64 the order only moves bits far below float32's rounding.
    cols = feat.reshape(c, -1).to(torch.float64)
    # sum of squares over the contiguous channel axis: vectorised across pixels, several times faster on
    # CPU than ``vector_norm`` over dim 0
    norm = (cols * cols).sum(dim=0, keepdim=True).sqrt_()
    if check_finite and not bool(torch.isfinite(norm).all()):
        raise ValueError("features contain NaN or Inf")
    return (cols / norm.clamp_min_(torch.finfo(dtype).tiny)).to(dtype).T


def _quantise(unit: Tensor) -> Tensor:
    """Integer-valued float64 copy of unit rows; dot products of these are exact in any order.

    Scaling by a power of two and rounding are exact in the rows' own dtype (for float32, every value
    ``>= 2**23`` is already an integer), so doing them before the cast to float64 gives the same integers
    as doing them in float64, with cheaper float32 arithmetic.
    """
    q = unit * float(2**QUANT_BITS)
    return q.round_().to(torch.float64)


def _screening_bound(channels: int, input_is_f64: bool) -> float:
    """Rigorous bound on |float32 screening similarity - exact similarity / 2**52| for unit vectors.

    * float32 dot product, any summation order: ``gamma_C * sum|a_k b_k| <= gamma_C |a||b|`` with
      ``gamma_C = C u / (1 - C u)``, ``u = 2**-24`` (Higham, Thm 3.1), and ``|a||b| <= 1 + 4u``;
    * quantisation: ``|a.b - qa.qb 2**-52| <= sqrt(C) 2**-27 (|b| + |qa| 2**-26) <= 2.01 sqrt(C) 2**-27``;
    * float64 input rounded to float32 for screening: at most ``2u`` more;
    * slack for rounding the threshold ``max - 2 delta`` itself: ``4u``.
    The bound is deliberately pessimistic (observed errors are ~100x smaller); a larger bound only sends
    more rows to the exact path, it can never change a result.
    """
    u = 2.0**-24
    cu = channels * u
    if cu >= 0.5:
        return math.inf
    gamma = cu / (1.0 - cu)
    bound = gamma * (1.0 + 4.0 * u) + 2.01 * math.sqrt(channels) * 2.0**-27 + 4.0 * u
    if input_is_f64:
        bound += 2.0 * u
    return bound


def _ieee_fp32_matmul(device: torch.device) -> bool:
    """True when float32 matmuls on ``device`` are plain IEEE float32 (no TF32 / bf16 shortcuts).

    Only then does the screening bound hold.  Unknown back-ends use the exact float64 path.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return False
    ok = ("none", "ieee")
    if device.type == "cpu":
        mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
        return getattr(mkldnn, "fp32_precision", "none") in ok
    if device.type == "cuda":
        matmul = torch.backends.cuda.matmul
        return (not getattr(matmul, "allow_tf32", False)) and getattr(matmul, "fp32_precision", "none") in ok
    return False


def auto_chunk_size(n_ref: int, budget_bytes: int | None = None) -> int:
    """Rows per chunk used when ``chunk_size`` is None: a float32 chunk of ``n_ref`` columns fits the budget.

    With the default 64 MB: all rows up to 64x64 (4096 x 4096), 1024 rows at 128x128.  The exact float64
    path (used where float32 matmuls are not IEEE) uses the same rows, i.e. twice the bytes.
    """
    budget = AUTO_CHUNK_BYTES if budget_bytes is None else budget_bytes
    return max(1, budget // (4 * max(1, n_ref)))


def _row_chunks(n: int, chunk: int) -> range:
    return range(0, n, chunk)


def _argmax_with_value(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """``(value, first index)`` of the maximum along ``dim``.

    ``Tensor.max(dim)`` would do, but on CPU its dim-0 variant enters an OpenMP region even for tiny
    inputs and, on a busy 2-core machine, costs milliseconds per call; ``argmax`` + ``gather`` does not.
    ``argmax`` is documented to return the first maximal index, which is the tie rule we need.
    """
    idx = x.argmax(dim=dim)
    return x.gather(dim, idx.unsqueeze(dim)).squeeze(dim), idx


# --------------------------------------------------------------------------------------------- matching
def _exact_indices(ut: Tensor, ur: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Exact argmax in both directions, one pass (the reference definition of a match).

    Used where the float32 screening bound cannot be trusted (TF32/bf16 matmuls, unknown back-ends).
    The target rows are quantised per chunk; the quantised reference (``Nr x C`` float64) is kept.
    """
    nt, nr = ut.shape[0], ur.shape[0]
    row_idx = torch.empty(nt, dtype=torch.long, device=ut.device)
    col_val = torch.full((nr,), -math.inf, dtype=torch.float64, device=ut.device)
    col_idx = torch.zeros(nr, dtype=torch.long, device=ut.device)
    qr_t = _quantise(ur).T
    for start in _row_chunks(nt, chunk):
        sim = _quantise(ut[start : start + chunk]) @ qr_t
        row_idx[start : start + sim.shape[0]] = sim.argmax(dim=1)
        val, idx = _argmax_with_value(sim, 0)  # first maximal row within the chunk
        better = val > col_val  # strict: an earlier chunk keeps the tie
        col_val = torch.where(better, val, col_val)
        col_idx = torch.where(better, idx + start, col_idx)
    return row_idx, col_idx


def _exact_argmax(queries: Tensor, keys: Tensor, max_rows: int, max_entries: int) -> Tensor:
    """First exact argmax over all ``keys`` for each of ``queries`` (unit rows), tiled.

    Tiles have at most ``max_rows`` query rows and ``max_entries`` entries, and quantised key tiles at most
    ``_KEY_TILE_BYTES``, so no full quantised copy of either side is ever made.  Key tiles are visited in
    order with a strict running maximum, so ties keep the lowest key index.
    """
    a, n, c = queries.shape[0], keys.shape[0], queries.shape[1]
    out = torch.empty(a, dtype=torch.long, device=queries.device)
    q_tile = max(1, min(a, max_rows))
    k_tile = max(1, min(n, max_entries // q_tile, _KEY_TILE_BYTES // (8 * max(1, c))))
    for qs in range(0, a, q_tile):
        q = _quantise(queries[qs : qs + q_tile])
        best_val = torch.full((q.shape[0],), -math.inf, dtype=torch.float64, device=q.device)
        best_idx = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        for ks in range(0, n, k_tile):
            val, idx = _argmax_with_value(q @ _quantise(keys[ks : ks + k_tile]).T, 1)
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx + ks, best_idx)
        out[qs : qs + q.shape[0]] = best_idx
    return out


#: Column-block width for the per-row maxima and row-block height for the per-column maxima.
_ROW_BLOCK = 64
_COL_BLOCK = 16
_NEG_INF = -math.inf


def _block_max(sim: Tensor, dim: int, block: int) -> Tensor:
    """Maxima of consecutive blocks of ``block`` entries along ``dim`` (a shorter last block included).

    ``amax`` is vectorised and ~20x faster than ``argmax``/``max(dim)`` on CPU; reducing blocks first
    leaves only small tensors for the index and runner-up bookkeeping.
    """
    n = sim.shape[dim]
    n0 = (n // block) * block
    parts = []
    if dim == 1:
        m = sim.shape[0]
        if n0:
            parts.append(sim[:, :n0].view(m, n0 // block, block).amax(dim=2))
        if n0 < n:
            parts.append(sim[:, n0:].amax(dim=1, keepdim=True))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    w = sim.shape[1]
    if n0:
        parts.append(sim[:n0].view(n0 // block, block, w).amax(dim=1))
    if n0 < n:
        parts.append(sim[n0:].amax(dim=0, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _top_rows(sim: Tensor, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per row of ``sim [m, n]``: (max, first argmax, ambiguous = runner-up within ``margin`` of the max).

    ``argmax`` returns the first maximal index, so the first block holding the maximum and the first
    position inside it give the first argmax of the row.  Few, small operations on purpose: each op on
    more than ~32k elements is an OpenMP region, and on a busy machine every region costs a scheduling
    delay.
    """
    n = sim.shape[1]
    bm = _block_max(sim, 1, _ROW_BLOCK)
    bwin = bm.argmax(dim=1, keepdim=True)
    cols = bwin * _ROW_BLOCK + torch.arange(_ROW_BLOCK, device=sim.device)
    if n % _ROW_BLOCK:
        vals = sim.gather(1, cols.clamp_max(n - 1))
        vals.masked_fill_(cols >= n, _NEG_INF)
    else:
        vals = sim.gather(1, cols)
    jin = vals.argmax(dim=1, keepdim=True)
    rv = vals.gather(1, jin)
    vals.scatter_(1, jin, _NEG_INF)
    bm.scatter_(1, bwin, _NEG_INF)
    runner_up = torch.maximum(vals.amax(dim=1, keepdim=True), bm.amax(dim=1, keepdim=True))
    return rv.squeeze(1), (bwin * _ROW_BLOCK + jin).squeeze(1), (runner_up >= rv - margin).squeeze(1)


def _top_cols(sim: Tensor, cbm: Tensor, cols: Tensor | None, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per column (all, or the subset ``cols``) of ``sim [m, n]``: (max, first argmax row, ambiguous).

    ``cbm`` are the row-block maxima of ``sim`` (:func:`_block_max` along dim 0); with ``cols=None`` it is
    modified in place.
    """
    m = sim.shape[0]
    if cols is not None:
        cbm = cbm[:, cols]
        colidx = cols.unsqueeze(0)
    else:  # ``cbm`` is overwritten below: the caller hands it over
        colidx = torch.arange(sim.shape[1], device=sim.device).unsqueeze(0)
    bwin = cbm.argmax(dim=0, keepdim=True)
    rows = bwin * _COL_BLOCK + torch.arange(_COL_BLOCK, device=sim.device).unsqueeze(1)
    if m % _COL_BLOCK:
        vals = sim[rows.clamp_max(m - 1), colidx]
        vals.masked_fill_(rows >= m, _NEG_INF)
    else:
        vals = sim[rows, colidx]
    iin = vals.argmax(dim=0, keepdim=True)
    cv = vals.gather(0, iin)
    vals.scatter_(0, iin, _NEG_INF)
    cbm.scatter_(0, bwin, _NEG_INF)
    runner_up = torch.maximum(vals.amax(dim=0, keepdim=True), cbm.amax(dim=0, keepdim=True))
    return cv.squeeze(0), (bwin * _COL_BLOCK + iin).squeeze(0), (runner_up >= cv - margin).squeeze(0)


#: Ambiguous rows/columns with at most this many candidates (entries within the margin of the maximum)
#: are resolved from their candidates alone; more (e.g. flat or duplicated features) fall back to a full
#: exact row/column.
_MAX_CANDIDATES = 64
#: Candidate pairs evaluated exactly at once (``pairs x C`` float64 per side).
_PAIR_BLOCK = 4096


def _counts(*masks: Tensor) -> list[int]:
    """The number of ``True`` entries of each mask, read back to the host together.

    WHY: every ``nonzero`` (or boolean index) is a read back to the host, which on a GPU stalls the CPU
    until the queued kernels finish. Reading all the counts in one transfer and then taking the indices
    with ``nonzero_static`` (which needs no read) costs one synchronisation instead of one per mask.
    """
    return torch.stack([m.sum() for m in masks]).tolist()


def _nonzero(mask: Tensor, count: int) -> Tensor:
    """``mask.nonzero()`` for a mask with ``count`` ``True`` entries (from :func:`_counts`), without a read.

    Torch builds without a ``nonzero_static`` kernel for the mask's device fall back to ``nonzero``: the
    same indices in the same (row-major) order, at the price of a read.
    """
    try:
        return torch.nonzero_static(mask, size=count)
    except (AttributeError, NotImplementedError):
        return mask.nonzero()


def _where(mask: Tensor, count: int) -> Tensor:
    """Indices of the ``True`` entries of a 1-D ``mask`` (``count`` of them, from :func:`_counts`)."""
    return _nonzero(mask, count).squeeze(1)


def _near_pairs(near: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """Split the ``True`` entries of ``near`` by their count along ``dim``.

    Returns ``(pairs [P, 2] of (row, col) positions in lines with <= _MAX_CANDIDATES entries,
    indices of the lines with more)``; a line is a row for ``dim=1`` and a column for ``dim=0``.
    """
    many = near.sum(dim=dim) > _MAX_CANDIDATES
    few = near & ~(many.unsqueeze(1) if dim == 1 else many.unsqueeze(0))
    n_few, n_many = _counts(few, many)
    return _nonzero(few, n_few), _where(many, n_many)


def _exact_pairs(ut: Tensor, ur: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """Exact integer similarities ``q_t[rows] . q_r[cols]`` (float64, order independent; module docstring).

    ``index_select`` rather than advanced indexing: on the transposed unit-row views the latter takes a
    slow multi-threaded path on CPU.
    """
    out = torch.empty(rows.numel(), dtype=torch.float64, device=ut.device)
    for s0 in range(0, rows.numel(), _PAIR_BLOCK):
        r, c = rows[s0 : s0 + _PAIR_BLOCK], cols[s0 : s0 + _PAIR_BLOCK]
        qt, qr = _quantise(ut.index_select(0, r)), _quantise(ur.index_select(0, c))
        out[s0 : s0 + r.numel()] = (qt * qr).sum(dim=1)
    return out


def _resolve(group: Tensor, other: Tensor, value: Tensor, size: int) -> Tensor:
    """Per group id, the lowest ``other`` index among its candidates of maximal exact ``value``.

    ``scatter_reduce`` with amax/amin is order independent for these exact values, so the result does not
    depend on how the candidates were collected.  Groups without candidates get ``-1``.
    """
    best = torch.full((size,), _NEG_INF, dtype=value.dtype, device=value.device)
    best.scatter_reduce_(0, group, value, reduce="amax")
    top = value == best[group]
    big = torch.iinfo(torch.long).max
    win = torch.full((size,), big, dtype=torch.long, device=value.device)
    # candidates below the maximum contribute ``big``, the neutral element (no boolean index: no host read)
    win.scatter_reduce_(0, group, torch.where(top, other, torch.full_like(other, big)), reduce="amin")
    return torch.where(win == big, torch.full_like(win, -1), win)


def _screened_indices(ut: Tensor, ur: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """float32 screening + exact resolution of ambiguous rows/columns (see the module docstring).

    Per chunk of target rows the float32 similarities go into one reused buffer (a fresh multi-MB
    allocation per chunk costs page faults that are as slow as the matmul).  A row or column is
    *ambiguous* when its runner-up is within ``margin = 2 * delta`` of its maximum.  The exact argmax of
    an ambiguous line is provably among its *candidates*, the entries within the margin of its float32
    maximum, so only those are evaluated exactly (or, past ``_MAX_CANDIDATES``, the whole line).

    Rows are complete inside a chunk.  Columns keep a running maximum across chunks; a column is also
    ambiguous when a later chunk comes within the margin of it.  Only columns whose chunk maximum can
    matter (``>= running max - margin``) are examined, ~``N log(#chunks)`` in total for distinct features,
    and every such chunk maximum (plus, in a chunk-ambiguous column, its near-ties) is kept as a
    candidate: any entry within the margin of the final maximum was one of those when its chunk was seen.
    """
    nt, nr, c = ut.shape[0], ur.shape[0], ut.shape[1]
    device = ut.device
    margin = 2.0 * _screening_bound(c, ut.dtype == torch.float64)
    st, sr_t = ut.to(torch.float32), ur.to(torch.float32).T

    row_idx = torch.empty(nt, dtype=torch.long, device=device)
    row_cand: list[Tensor] = []  # (target row, reference col) candidate pairs of ambiguous rows
    row_full: list[Tensor] = []  # ambiguous rows with too many candidates
    col_val = torch.full((nr,), _NEG_INF, dtype=torch.float32, device=device)
    col_idx = torch.zeros(nr, dtype=torch.long, device=device)
    col_amb = torch.zeros(nr, dtype=torch.bool, device=device)
    col_cand: list[Tensor] = []  # (target row, reference col) candidate pairs of columns
    col_full: list[Tensor] = []
    buf = torch.empty((min(chunk, nt), nr), dtype=torch.float32, device=device)
    for start in _row_chunks(nt, chunk):
        m = min(chunk, nt - start)
        sim = buf[:m]
        torch.matmul(st[start : start + m], sr_t, out=sim)

        rv, ri, ramb = _top_rows(sim, margin)
        row_idx[start : start + m] = ri
        cbm = _block_max(sim, 0, _COL_BLOCK)
        if start == 0:
            cols = torch.arange(nr, device=device)  # every column is new
        else:
            relevant = cbm.amax(dim=0) >= col_val - margin
            cols = _where(relevant, _counts(relevant)[0])
        # one host read for both kinds of ambiguity (see _counts); the column side is empty without cols
        cv = ci = None
        if cols.numel():
            cv, ci, chunk_amb = _top_cols(sim, cbm, None if start == 0 else cols, margin)
            n_rows, n_cols = _counts(ramb, chunk_amb)
        else:
            n_rows, n_cols = _counts(ramb)[0], 0
        if n_rows:
            amb_rows = _where(ramb, n_rows)
            near = sim[amb_rows] >= (rv[amb_rows] - margin).unsqueeze(1)
            pairs, many = _near_pairs(near, 1)
            row_cand.append(torch.stack([amb_rows[pairs[:, 0]] + start, pairs[:, 1]], dim=1))
            row_full.append(amb_rows[many] + start)
        if cv is None:
            continue
        col_cand.append(torch.stack([ci + start, cols], dim=1))
        if n_cols:
            amb_cols = _where(chunk_amb, n_cols)
            near = sim[:, cols[amb_cols]] >= (cv[amb_cols] - margin).unsqueeze(0)
            pairs, many = _near_pairs(near, 0)
            col_cand.append(torch.stack([pairs[:, 0] + start, cols[amb_cols[pairs[:, 1]]]], dim=1))
            col_full.append(cols[amb_cols[many]])
        old_val, old_idx = col_val[cols], col_idx[cols]
        # relevant => either clearly better (old maximum irrelevant now) or within the margin (ambiguous)
        clearly_better = cv > old_val + margin
        amb = torch.where(clearly_better, chunk_amb, torch.ones_like(chunk_amb))
        take = cv > old_val
        col_val[cols] = torch.where(take, cv, old_val)
        col_idx[cols] = torch.where(take, ci + start, old_idx)
        col_amb[cols] = amb
    del buf

    # Rows: exact similarities of the candidates; rows with too many go through the full exact argmax.
    if row_cand:
        pairs = torch.cat(row_cand)
        if pairs.numel():
            win = _resolve(pairs[:, 0], pairs[:, 1], _exact_pairs(ut, ur, pairs[:, 0], pairs[:, 1]), nt)
            row_idx = torch.where(win >= 0, win, row_idx)
    full = torch.cat(row_full) if row_full else torch.empty(0, dtype=torch.long, device=device)
    if full.numel():
        row_idx[full] = _exact_argmax(ut.index_select(0, full), ur, chunk, chunk * nr)

    # Columns: only the finally ambiguous ones need resolving (one host read for both counts).
    if col_cand:
        full_mask = torch.zeros(nr, dtype=torch.bool, device=device)
        if col_full:
            full_mask[torch.cat(col_full)] = True
        full_mask &= col_amb
        pairs = torch.cat(col_cand)
        keep = col_amb[pairs[:, 1]] & ~full_mask[pairs[:, 1]]
        n_keep, n_full = _counts(keep, full_mask)
        if n_keep:
            pairs = pairs.index_select(0, _where(keep, n_keep))
            win = _resolve(pairs[:, 1], pairs[:, 0], _exact_pairs(ut, ur, pairs[:, 0], pairs[:, 1]), nr)
            col_idx = torch.where(win >= 0, win, col_idx)
        if n_full:
            full = _where(full_mask, n_full)
            col_idx[full] = _exact_argmax(ur.index_select(0, full), ut, chunk, chunk * nr)
    return row_idx, col_idx


def match_indices(
    feat_tgt: Tensor, feat_ref: Tensor, *, chunk_size: int | None = None, check_finite: bool = True
) -> tuple[Tensor, Tensor]:
    """Flat argmax-cosine matches in both directions.

    Returns ``(idx_t2r [B, Ht*Wt], idx_r2t [B, Hr*Wr])`` (int64): ``idx_t2r[b, y*Wt + x]`` is the flat
    reference index ``y_r*Wr + x_r`` matched to target pixel ``(x, y)``; ``idx_r2t`` is the converse.
    Flat indices are what an exact gather (e.g. of attention values in ComfyUI's token layout) needs, so
    callers that never need a flow can skip :func:`flows_from_indices`.

    ``chunk_size`` bounds the number of similarity-matrix rows (target pixels) materialised at once;
    ``None`` picks :func:`auto_chunk_size`.  The result does not depend on it, bit for bit (module
    docstring).  ``check_finite=False`` skips the NaN/Inf check of the features, which reads a value back
    to the host (a GPU synchronisation); callers that check their inputs once elsewhere pass it.
    Ties resolve to the lowest flat index.  The official code recomputes the full
    ``HtWt x HrWr`` cost volume in every AMA layer; here it never exists.
    """
    _check_feature_pair(feat_tgt, feat_ref)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    b = feat_tgt.shape[0]
    n_ref = feat_ref.shape[2] * feat_ref.shape[3]
    chunk = auto_chunk_size(n_ref) if chunk_size is None else chunk_size
    screen = _ieee_fp32_matmul(feat_tgt.device)
    out_t2r, out_r2t = [], []
    with torch.no_grad():
        for i in range(b):
            ut, ur = _unit_rows(feat_tgt[i], check_finite), _unit_rows(feat_ref[i], check_finite)
            if screen:
                t2r, r2t = _screened_indices(ut, ur, chunk)
            else:
                t2r, r2t = _exact_indices(ut, ur, chunk)
            out_t2r.append(t2r)
            out_r2t.append(r2t)
    return torch.stack(out_t2r), torch.stack(out_r2t)


def flows_from_indices(
    idx_t2r: Tensor, idx_r2t: Tensor, tgt_hw: tuple[int, int], ref_hw: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """Turn flat match indices into float32 flows ``([B,2,Ht,Wt], [B,2,Hr,Wr])`` (module conventions)."""
    return _flow_from_flat(idx_t2r, tgt_hw, ref_hw), _flow_from_flat(idx_r2t, ref_hw, tgt_hw)


def _flow_from_flat(idx: Tensor, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> Tensor:
    hs, ws = src_hw
    _, wd = dst_hw
    if idx.dim() != 2 or idx.shape[1] != hs * ws:
        raise ValueError(f"indices {tuple(idx.shape)} do not match a {hs}x{ws} grid")
    ys, xs = torch.meshgrid(
        torch.arange(hs, device=idx.device), torch.arange(ws, device=idx.device), indexing="ij"
    )
    dx = (idx % wd).view(-1, hs, ws) - xs
    dy = torch.div(idx, wd, rounding_mode="floor").view(-1, hs, ws) - ys
    return torch.stack([dx, dy], dim=1).to(torch.float32)


def argmax_flows(
    feat_tgt: Tensor, feat_ref: Tensor, *, chunk_size: int | None = None, check_finite: bool = True
) -> tuple[Tensor, Tensor]:
    """Argmax-of-cosine-similarity flows ``(flow_t2r [B,2,Ht,Wt], flow_r2t [B,2,Hr,Wr])``.

    The two grids may differ in size and aspect.  This is the official ``correlation_to_flow_w_argmax``
    (docs/method.md, "Semantic matching") without the cost volume: see :func:`match_indices` for chunking,
    exactness and ties.
    """
    idx_t2r, idx_r2t = match_indices(feat_tgt, feat_ref, chunk_size=chunk_size, check_finite=check_finite)
    return flows_from_indices(
        idx_t2r, idx_r2t, (feat_tgt.shape[2], feat_tgt.shape[3]), (feat_ref.shape[2], feat_ref.shape[3])
    )


# --------------------------------------------------------------------------------------------- warping
def _is_integral(flow: Tensor, integral: bool | None = None) -> bool:
    """Whether ``flow`` takes the exact gather path.

    ``integral=None`` inspects the values (two host synchronisations on a GPU); ``True``/``False`` is the
    caller's guarantee, e.g. flows straight from :func:`argmax_flows` are always integral. WHY the
    switch: the AMA runtime warps every AMA layer of every row at every step, and each check stalled
    the CPU until the GPU had caught up (measured on an H200).
    """
    if integral is not None:
        return bool(integral)
    return bool(torch.isfinite(flow).all()) and bool(torch.equal(flow, torch.round(flow)))


def flow_to_indices(flow: Tensor, ref_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Integer flow ``[B,2,H,W]`` -> ``(flat reference index [B, H*W], in-range mask [B, H*W])``.

    Out-of-range targets get index 0 and ``False``; callers must zero them (zeros padding).
    """
    hr, wr = ref_hw
    b, _, h, w = flow.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, device=flow.device), torch.arange(w, device=flow.device), indexing="ij"
    )
    fl = torch.round(flow).to(torch.long)
    xr = xs + fl[:, 0]
    yr = ys + fl[:, 1]
    valid = (xr >= 0) & (xr < wr) & (yr >= 0) & (yr < hr)
    idx = torch.where(valid, yr * wr + xr, torch.zeros_like(xr))
    return idx.reshape(b, h * w), valid.reshape(b, h * w)


def _expand_factor(x_batch: int, flow_batch: int) -> int:
    if flow_batch < 1 or x_batch % flow_batch:
        raise ValueError(
            f"x batch {x_batch} must be a multiple of the flow batch {flow_batch} "
            "(x item i uses flow item i // (x_batch // flow_batch))"
        )
    return x_batch // flow_batch


def warp(x_ref: Tensor, flow_t2r: Tensor, *, integral: bool | None = None) -> Tensor:
    """Sample ``x_ref [B*k, C, Hr, Wr]`` at ``p + flow_t2r(p)`` for every target pixel ``p``.

    Returns ``[B*k, C, Ht, Wt]``.

    * Batch convention: the x batch may be ``k`` times the flow batch; x item ``i`` uses flow item
      ``i // k`` (``flow.repeat_interleave(k, 0)``).  This is the official batch-major ``b*heads + head``
      layout, so values with heads folded into the batch (``[B*heads, d, H, W]``) can be warped by the
      per-image flow without copying it.
    * Integer flows (all argmax flows) are an exact gather, bit for bit, with zeros outside the reference.
      The official code runs ``grid_sample`` here, which gives the same values up to rounding of the
      bilinear weights; the gather is exact and cheaper (docs/method.md, "Paper, official code and this
      pack").
    * Fractional flows sample bilinearly exactly like the official ``warp``: ``grid_sample`` with
      ``align_corners=True`` (pixel centres at ``2v/(size-1) - 1``) and ``padding_mode="zeros"``.
      Half/bfloat16 inputs are sampled in float32 and cast back (the official code warps in float32).
    Differentiable with respect to ``x_ref`` on both paths (the flow is treated as data).
    ``integral=True`` promises integer flows (skips the check, see :func:`_is_integral`).
    """
    if x_ref.dim() != 4 or flow_t2r.dim() != 4 or flow_t2r.shape[1] != 2:
        raise ValueError(
            f"expected x [B,C,H,W] and flow [B,2,H,W]; got {tuple(x_ref.shape)}, {tuple(flow_t2r.shape)}"
        )
    k = _expand_factor(x_ref.shape[0], flow_t2r.shape[0])
    bk, c, hr, wr = x_ref.shape
    ht, wt = flow_t2r.shape[2], flow_t2r.shape[3]
    flow = flow_t2r.to(x_ref.device)
    if _is_integral(flow, integral):
        idx, valid = flow_to_indices(flow, (hr, wr))
        tokens = x_ref.reshape(bk, c, hr * wr).transpose(1, 2)
        out = _gather_tokens(tokens, idx, valid, k)  # [B*k, Ht*Wt, C]
        return out.transpose(1, 2).reshape(bk, c, ht, wt)
    return _bilinear_warp(x_ref, flow, k)


def _gather_tokens(tokens: Tensor, idx: Tensor, valid: Tensor, k: int) -> Tensor:
    """tokens ``[B*k, Nr, D]``, idx/valid ``[B, Nt]`` -> ``[B*k, Nt, D]``: exact gather, zeros if invalid."""
    bk, nr, d = tokens.shape
    if k > 1:
        idx = idx.repeat_interleave(k, dim=0)
        valid = valid.repeat_interleave(k, dim=0)
    offsets = torch.arange(bk, device=tokens.device).unsqueeze(1) * nr
    flat = tokens.reshape(bk * nr, d).index_select(0, (idx + offsets).reshape(-1))
    out = flat.reshape(bk, -1, d)
    # The select always runs: checking ``valid.all()`` first would read a value back to the host, which on
    # a GPU stalls the CPU for the sake of skipping one cheap elementwise op.
    return torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))


def _bilinear_warp(x_ref: Tensor, flow: Tensor, k: int) -> Tensor:
    orig_dtype = x_ref.dtype
    work = torch.float64 if orig_dtype == torch.float64 else torch.float32
    x = x_ref.to(work)
    hr, wr = x.shape[2], x.shape[3]
    # A size-1 axis has no valid align_corners normalisation (division by zero) and grid_sample would map
    # every coordinate onto its single pixel; one zero pixel of padding keeps zeros-padding semantics.
    pad_w, pad_h = int(wr == 1), int(hr == 1)
    if pad_w or pad_h:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    hp, wp = x.shape[2], x.shape[3]
    ht, wt = flow.shape[2], flow.shape[3]
    ys, xs = torch.meshgrid(
        torch.arange(ht, device=x.device, dtype=work),
        torch.arange(wt, device=x.device, dtype=work),
        indexing="ij",
    )
    fl = flow.to(work)
    gx = 2.0 * (xs + fl[:, 0]) / (wp - 1) - 1.0
    gy = 2.0 * (ys + fl[:, 1]) / (hp - 1) - 1.0
    grid = torch.stack([gx, gy], dim=-1)
    if k > 1:
        grid = grid.repeat_interleave(k, dim=0)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(orig_dtype)


def warp_tokens(tokens_ref: Tensor, flow_t2r: Tensor, ref_hw: tuple[int, int] | None = None, *,
                integral: bool | None = None) -> Tensor:
    """:func:`warp` for ComfyUI's token layout: ``[B*k, Hr*Wr, D]`` -> ``[B*k, Ht*Wt, D]``.

    Token ``y*W + x`` is pixel ``(x, y)``.  The channel axis ``D`` may hold all heads (``heads*dim_head``):
    the flow is per pixel, not per head, so the gather moves whole tokens and never splits heads.
    ``ref_hw`` defaults to the target grid (it must then have the same token count). ``integral`` as in
    :func:`warp`.
    """
    if tokens_ref.dim() != 3:
        raise ValueError(f"tokens must be [B, N, D], got {tuple(tokens_ref.shape)}")
    ht, wt = flow_t2r.shape[2], flow_t2r.shape[3]
    hr, wr = (ht, wt) if ref_hw is None else ref_hw
    if hr * wr != tokens_ref.shape[1]:
        raise ValueError(f"reference grid {hr}x{wr} does not hold {tokens_ref.shape[1]} tokens; pass ref_hw")
    k = _expand_factor(tokens_ref.shape[0], flow_t2r.shape[0])
    flow = flow_t2r.to(tokens_ref.device)
    if _is_integral(flow, integral):
        idx, valid = flow_to_indices(flow, (hr, wr))
        return _gather_tokens(tokens_ref, idx, valid, k)
    bk, _, d = tokens_ref.shape
    grid_x = tokens_ref.transpose(1, 2).reshape(bk, d, hr, wr)
    return _bilinear_warp(grid_x, flow, k).reshape(bk, d, ht * wt).transpose(1, 2)


# --------------------------------------------------------------------------------------------- cycles
def cycle_error(flow_t2r: Tensor, flow_r2t: Tensor, *, integral: bool | None = None) -> Tensor:
    """Forward-backward error ``[B,1,Ht,Wt]``: ``|F_t2r(p) + F_r2t(p + F_t2r(p))|`` in target pixels.

    That is the distance between p and the point reached by going to its reference match and back
    (official ``warp(F_r2t, F_t2r)`` form, docs/method.md, "Semantic matching").  A match that leaves the
    reference grid reads
    a zero backward flow (zeros padding), exactly like the official code.  The norm is computed as
    ``sqrt(dx*dx + dy*dy)`` so integer Pythagorean cases are exact. ``integral`` as in :func:`warp`.
    """
    if flow_t2r.dim() != 4 or flow_r2t.dim() != 4 or flow_t2r.shape[1] != 2 or flow_r2t.shape[1] != 2:
        raise ValueError("flows must be [B,2,H,W]")
    if flow_t2r.shape[0] != flow_r2t.shape[0]:
        raise ValueError(f"flow batch sizes differ: {flow_t2r.shape[0]} vs {flow_r2t.shape[0]}")
    back = warp(flow_r2t.to(flow_t2r.dtype), flow_t2r, integral=integral)
    d = (flow_t2r + back).to(torch.float64)
    # float64 then one rounding: float32 sqrt kernels may differ in the last bit between devices, and
    # the confidence thresholds this value, so CPU and GPU must agree (float64 sqrt is IEEE everywhere)
    return torch.sqrt(d[:, 0:1] * d[:, 0:1] + d[:, 1:2] * d[:, 1:2]).to(flow_t2r.dtype)


def confidence(cycle_err: Tensor, fg_mask: Tensor, lambda_c: float) -> Tensor:
    """Binary cycle-consistency confidence ``[B,1,Ht,Wt]`` (paper Eq. 8, threshold as the official code).

    ``1.0`` where ``cycle_err < lambda_c * sqrt(Ht*Wt) * mean(fg_mask[b])``, else ``0.0``, per batch item.
    The official threshold is ``cc_thres * H * fg_ratio`` on square grids (docs/method.md,
    "Cycle-consistency confidence"); ``sqrt(H*W)``
    is the same on squares and the natural side length for any aspect ratio.  The comparison is strict,
    so an empty mask (mean 0) makes every pixel unconfident, as in the official code.
    """
    if cycle_err.dim() != 4 or cycle_err.shape[1] != 1:
        raise ValueError(f"cycle_err must be [B,1,H,W], got {tuple(cycle_err.shape)}")
    if fg_mask.shape[-2:] != cycle_err.shape[-2:] or fg_mask.dim() != 4:
        raise ValueError(
            f"fg_mask {tuple(fg_mask.shape)} must be [B,1,H,W] on the grid of {tuple(cycle_err.shape)}"
        )
    if fg_mask.shape[0] not in (1, cycle_err.shape[0]):
        raise ValueError("fg_mask batch must be 1 or match cycle_err")
    h, w = cycle_err.shape[-2:]
    work = torch.float64 if cycle_err.dtype == torch.float64 else torch.float32
    mean = fg_mask.to(work).mean(dim=(1, 2, 3), keepdim=True)
    thresh = float(lambda_c) * math.sqrt(h * w) * mean
    return (cycle_err.to(work) < thresh).to(cycle_err.dtype)
