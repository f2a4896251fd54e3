"""Per-step diagnostics of appearance matching: how much of the target actually gets the reference.

"No effect" is the most common complaint about appearance-transfer tools (the most common complaint in
other packs' trackers). In
DreamMatcher the reference reaches a target cell only where the *gate* ``mask * confidence`` is high,
so three figures per sampling step explain most "nothing happened" runs:

* **confidence coverage**: mean of the (binary) cycle-consistency confidence. Low coverage means the
  correspondence is not cycle-consistent (different subject, pose or layout; too high a noise level);
* **mask area**: mean of the foreground mask. Near 0 means the subject word gets little
  cross-attention (or the user mask is empty); 1 means no mask is applied;
* **gate above 0.5**: the fraction of cells where ``mask * confidence > 0.5``, i.e. where the
  injected value is mostly the warped reference (at strength 1).

This module is pure torch: :func:`gate_figures` reduces one match, :class:`StepLog` collects them
during a run (cheaply: no host synchronisation until :meth:`StepLog.summary`), :func:`format_table`
makes them readable as text, and :func:`curves`, :func:`legend_entries` and :func:`sigma_span` give
the plot its numbers and words. The plot itself (title, axes, ticks, legend) is drawn on the node
side, with Pillow (``nodes/plot.py``): text needs a font library, and the core stays pure torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepFigures", "StepLog", "gate_figures", "format_table", "format_summary", "legend_entries",
           "curves", "sigma_span"]

#: Names of the three figures, in the order of :func:`gate_figures` and the plot's colours.
FIGURES = ("confidence_coverage", "mask_area", "gate_above_half")
#: Their names for people (the plot's legend), in :data:`FIGURES` order.
LABELS = ("confidence coverage", "mask area", "gate > 0.5")
#: What each one measures, in a few words (the legend entries of :func:`legend_entries`).
MEANINGS = ("cycle-consistent share of the target", "subject share of the target",
            "share where mask x confidence > 0.5, i.e. the reference is injected")
#: Line colours of the plot (RGB in [0, 1]) and their names, one per figure.
COLOURS = ((0.10, 0.45, 0.85), (0.95, 0.55, 0.05), (0.15, 0.65, 0.25))
COLOUR_NAMES = ("blue", "orange", "green")


@dataclass(frozen=True)
class StepFigures:
    """The three figures of one sampling step, averaged over the target rows that were matched."""

    step: int
    sigma: float
    confidence_coverage: float
    mask_area: float
    gate_above_half: float
    rows: int

    def as_dict(self) -> dict:
        return {"step": self.step, "sigma": self.sigma, "confidence_coverage": self.confidence_coverage,
                "mask_area": self.mask_area, "gate_above_half": self.gate_above_half, "rows": self.rows}


def gate_figures(confidence: Tensor, mask: Tensor) -> Tensor:
    """``[coverage, mask area, gate > 0.5 fraction]`` of one match as a float32 tensor of 3.

    ``confidence`` and ``mask`` are ``[B,1,H,W]`` (or broadcastable) maps in [0, 1] on the same grid;
    the figures are means over every cell of every item. The result stays on the input's device, so
    recording it costs no synchronisation.
    """
    if confidence.shape[-2:] != mask.shape[-2:]:
        raise ValueError(f"confidence {tuple(confidence.shape)} and mask {tuple(mask.shape)} must share "
                         "a grid")
    c = confidence.detach().to(torch.float32)
    m = mask.detach().to(device=c.device, dtype=torch.float32)
    gate = c * m
    return torch.stack([c.mean(), m.mean(), (gate > 0.5).to(torch.float32).mean()])


class StepLog:
    """Figures recorded during one run, one record per (step, row): the one on the finest grid.

    A row is matched at every AMA resolution, possibly several times (several layers, a split cond
    call); keeping one record per key, from the grid with the most cells (a later record on an equal
    grid replaces the earlier one), keeps the figures independent of how the sampler batches.
    """

    def __init__(self) -> None:
        self._rec: dict[tuple[int, int], tuple[int, float, Tensor]] = {}

    def record(self, step: int, row: int, sigma: float, figures: Tensor, cells: int = 0) -> None:
        """Keep ``figures`` for (step, row) unless a record on a grid of more ``cells`` exists."""
        key = (int(step), int(row))
        if key in self._rec and self._rec[key][0] > cells:
            return
        self._rec[key] = (int(cells), float(sigma), figures.detach())

    def __len__(self) -> int:
        return len(self._rec)

    def summary(self) -> list[StepFigures]:
        """One :class:`StepFigures` per recorded step, in step order (rows averaged)."""
        items = sorted(self._rec.items())
        if not items:
            return []
        # one transfer to the host for the whole run (each is a GPU synchronisation)
        device = items[0][1][2].device
        host = torch.stack([f.to(device=device, dtype=torch.float32) for _, (_c, _s, f) in items]).cpu()
        steps: dict[int, list[tuple[float, Tensor]]] = {}
        for ((step, _row), (_cells, sigma, _f)), figures in zip(items, host, strict=True):
            steps.setdefault(step, []).append((sigma, figures))
        out = []
        for step, recs in steps.items():
            mean = torch.stack([f for _, f in recs]).mean(0).tolist()
            out.append(StepFigures(step, recs[0][0], *mean, rows=len(recs)))
        return out


def format_summary(steps: Sequence[StepFigures]) -> str:
    """One line: the number of matched steps and the means of the three figures over them."""
    if not steps:
        return "no step was matched"
    n = len(steps)
    mean = {k: sum(getattr(s, k) for s in steps) / n for k in FIGURES}
    return (f"{n} matched step{'s' if n != 1 else ''} ({steps[0].step}..{steps[-1].step}): mean confidence "
            f"coverage {mean['confidence_coverage']:.1%}, mask area {mean['mask_area']:.1%}, "
            f"gate > 0.5 {mean['gate_above_half']:.1%}")


def format_table(steps: Sequence[StepFigures]) -> str:
    """A fixed-width table, one line per step, headed by :func:`format_summary`."""
    lines = [format_summary(steps)]
    if steps:
        lines.append(f"{'step':>4} {'sigma':>9} {'coverage':>9} {'mask':>7} {'gate>.5':>8}")
        for s in steps:
            lines.append(f"{s.step:>4} {s.sigma:>9.4f} {s.confidence_coverage:>9.1%} {s.mask_area:>7.1%} "
                         f"{s.gate_above_half:>8.1%}")
    return "\n".join(lines)


def legend_entries() -> list[str]:
    """The plot's legend as text, one entry per figure: its colour, name and what it measures.

    The node returns these as strings beside the image (its UI output's ``legend``), so the plot can be
    read without the documentation, and a screen reader or a colour-blind user gets the same as text.
    """
    rows = zip(COLOUR_NAMES, LABELS, MEANINGS, strict=True)
    return [f"{colour}: {label} ({meaning})" for colour, label, meaning in rows]


def curves(steps: Sequence[StepFigures]) -> list[tuple[str, tuple[float, float, float], list[float]]]:
    """``(label, colour, values)`` per figure, in :data:`FIGURES` order: what a plot of ``steps`` draws.

    The core hands over the numbers and their names; drawing them (axes, text) is the node layer's job,
    because text needs a font library and the core stays pure torch.
    """
    return [(label, colour, [float(getattr(s, name)) for s in steps])
            for name, label, colour in zip(FIGURES, LABELS, COLOURS, strict=True)]


def sigma_span(steps: Sequence[StepFigures]) -> str:
    """``"sigma 14.6 to 0.0292"``: the noise levels of the first and last plotted step ("" without steps)."""
    if not steps:
        return ""
    a, b = steps[0].sigma, steps[-1].sigma
    return f"sigma {a:.3g}" if len(steps) == 1 else f"sigma {a:.3g} to {b:.3g}"
