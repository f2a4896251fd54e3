"""Correspondences of one AMA run: descriptors and argmax flows per step, chunk slot, row and grid.

Matching at step ``t`` uses the decoder features captured at step ``t - 1`` (the official timing):
the descriptor (the core's ``features.describe``: per-layer co-PCA, resize to each side's finest
grid, concatenation, L2) is built once per (step, chunk slot, row); flows and the cycle error once
per pair of grids, then shared by every AMA layer at that resolution. ``docs/method.md`` ("Decoder
features and co-PCA descriptors", "Semantic matching") has the maths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...dreammatcher_core import features as core_features
from ...dreammatcher_core import matching as core_matching

NON_FINITE = ("DreamMatcher AMA: the decoder features hold NaN or Inf, so nothing can be matched. The "
              "model overflowed in its compute dtype: try fp32 or bf16 weights, or a lower cfg.")


def descriptor(tgt: list[torch.Tensor], ref: list[torch.Tensor],
               pca_dim: int, *, check_finite: bool = True,
               pca_solver: str = "exact") -> tuple[torch.Tensor, torch.Tensor]:
    """The matching descriptor of one target row and the reference: ``(desc_t, desc_r)``.

    ``tgt``/``ref``: the same decoder layers, ``[1, C_l, H_l, W_l]`` each. The one recipe the AMA
    patch and the Semantic Match inspector use. ``check_finite`` and ``pca_solver`` as in the core's
    ``describe``.
    """
    desc_r, desc_t = core_features.describe(ref, tgt, pca_dim=pca_dim, check_finite=check_finite,
                                            pca_solver=pca_solver)
    return desc_t, desc_r


@dataclass
class Correspondence:
    """Where each target cell of one row finds its reference cell, at one resolution, and how far
    to trust it (what ``current_correspondence`` returns)."""

    flow_t2r: torch.Tensor  # [1, 2, Ht, Wt]
    flow_r2t: torch.Tensor  # [1, 2, Hr, Wr]
    cycle_err: torch.Tensor  # [1, 1, Ht, Wt]
    confidence: torch.Tensor | None = None  # [1, 1, Ht, Wt]
    mask: torch.Tensor | None = None  # [1, 1, Ht, Wt]
    sigma: float = 0.0
    step: int = -1


def chunk_slots(cou: list[int]) -> list[tuple[int, int]]:
    """``(chunk type, occurrence of that type)`` per chunk of ``cond_or_uncond`` (e.g. [1, 0] ->
    [(1, 0), (0, 0)]); the key under which a chunk's features and correspondences are stored."""
    occ: dict[int, int] = {}
    slots = []
    for ty in cou:
        slots.append((ty, occ.get(ty, 0)))
        occ[ty] = occ.get(ty, 0) + 1
    return slots


class CorrespondenceCache:
    """Feature banks, descriptors and flows of one run (nothing outlives it).

    ``ref_feats[step][chunk type][layer]`` and ``tgt_feats[step][(slot, row)][layer]`` are filled by
    the run's output-block hook; :meth:`get` turns the previous step's into a correspondence.
    """

    def __init__(self, feature_layers: tuple[int, ...], pca_dim: int, sigmas: list[float],
                 stats: dict, pca_solver: str = "exact") -> None:
        self.layers = tuple(feature_layers)
        self.pca_dim = int(pca_dim)
        self.pca_solver = pca_solver
        self.sigmas = sigmas
        self.stats = stats
        self.ref_feats: dict[int, dict[int, dict]] = {}
        self.tgt_feats: dict[int, dict] = {}
        self.desc: dict = {}
        self.flows: dict = {}
        #: (target grid, reference grid) pairs matched so far in this run (see :meth:`prefetch`).
        self.grids: set = set()
        #: One device flag per descriptor of the current step: were its features finite? Read back
        #: together once per step (:meth:`check_finite`) instead of once per layer and row.
        self.finite: list[torch.Tensor] = []

    def check_finite(self) -> None:
        """Raise the NaN/Inf error if a descriptor since the last check had non-finite features.

        WHY deferred: a check per PCA and per matched grid read a value back to the host several times
        per step, and on a GPU each read stalls the CPU until the queued kernels finish. Checked at the
        start of the next step and at the end of the run, one read per step reports the same fault.
        """
        if not self.finite:
            return
        ok = bool(torch.stack(self.finite).all())
        self.finite.clear()
        if not ok:
            raise ValueError(NON_FINITE)

    def begin_step(self, step: int) -> None:
        """Drop features older than the previous step and correspondences of other steps (after the
        previous step's NaN/Inf check)."""
        self.check_finite()
        for bank in (self.ref_feats, self.tgt_feats):
            for k in [k for k in bank if k < step - 1]:
                del bank[k]
        self.desc = {k: v for k, v in self.desc.items() if k[0] == step}
        self.flows = {k: v for k, v in self.flows.items() if k[0] == step}

    def clear(self) -> None:
        for d in (self.ref_feats, self.tgt_feats, self.desc, self.flows):
            d.clear()

    def descriptor(self, step: int, slot: tuple[int, int], r: int):
        key = (step, slot, r)
        if key not in self.desc:
            ref = self.ref_feats.get(step - 1, {}).get(slot[0])
            tgt = self.tgt_feats.get(step - 1, {}).get((slot, r))
            if ref is None or tgt is None or any(k not in ref or k not in tgt for k in self.layers):
                self.desc[key] = None
            else:
                feats = [tgt[k] for k in self.layers] + [ref[k] for k in self.layers]
                # The finite flag stays on the device (read once per step, see check_finite); the PCA
                # gets the features with any NaN/Inf zeroed, so the linear-algebra libraries never see
                # them (finite values pass through unchanged, bit for bit).
                self.finite.append(torch.stack([torch.isfinite(f).all() for f in feats]).all())
                safe = [torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0) for f in feats]
                n = len(self.layers)
                self.desc[key] = descriptor(safe[:n], safe[n:], self.pca_dim, check_finite=False,
                                            pca_solver=self.pca_solver)
                self.stats["descriptors"] += 1
        return self.desc[key]

    def prefetch(self, step: int, cou: list[int], rows: int) -> None:
        """Compute this step's correspondences *before* the step's UNet passes are queued.

        They depend only on the previous step's features, so computing them here gives the same
        results as computing them lazily at the first AMA layer. WHY: the PCA's eigen-solver and the
        exact tie checks synchronise with the GPU; done mid-UNet, every synchronisation made the CPU
        wait for the queued layers and then the GPU wait for the next launches (an H200 profile showed
        the GPU idle most of an AMA step). The grids are those matched at earlier steps of this run
        (the first matched step stays lazy).
        """
        if not self.grids:
            return
        b = rows // max(1, len(cou))
        for slot in chunk_slots(cou):
            for r in range(b):
                for hw_t, hw_r in sorted(self.grids):
                    before = self.stats["flows"]
                    self.get(step, slot, r, hw_t, hw_r)
                    self.stats["prefetched"] += self.stats["flows"] - before

    def get(self, step: int, slot, r: int, hw_t, hw_r) -> Correspondence | None:
        """The correspondence of ``(slot, r)`` at ``step`` between grids ``hw_t`` and ``hw_r`` (cached),
        or None without previous-step features."""
        key = (step, slot, r, tuple(hw_t), tuple(hw_r))
        self.grids.add((tuple(hw_t), tuple(hw_r)))
        if key not in self.flows:
            desc = self.descriptor(step, slot, r)
            if desc is None:
                self.flows[key] = None
            else:
                dt = core_features.resize_descriptor(desc[0].float(), hw_t)
                dr = core_features.resize_descriptor(desc[1].float(), hw_r)
                # finite by construction once the descriptor's flag holds (checked per step)
                f_t2r, f_r2t = core_matching.argmax_flows(dt, dr, check_finite=False)
                err = core_matching.cycle_error(f_t2r, f_r2t, integral=True)  # argmax flows are integral
                self.flows[key] = Correspondence(f_t2r, f_r2t, err, sigma=self.sigmas[step], step=step)
                self.stats["flows"] += 1
        return self.flows[key]
