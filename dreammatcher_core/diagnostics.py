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
and :func:`plot_figures` make them readable (text and a ComfyUI IMAGE).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepFigures", "StepLog", "gate_figures", "format_table", "format_summary", "plot_figures"]

#: Names of the three figures, in the order of :func:`gate_figures` and the plot's colours.
FIGURES = ("confidence_coverage", "mask_area", "gate_above_half")
#: Line colours of :func:`plot_figures` (RGB in [0, 1]), one per figure.
COLOURS = ((0.10, 0.45, 0.85), (0.95, 0.55, 0.05), (0.15, 0.65, 0.25))


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


def _segment(img: Tensor, x0: float, y0: float, x1: float, y1: float, colour: Tensor, width: int) -> None:
    """Draw a line segment into ``img [H,W,3]`` in place (dense sampling; ``width`` pixels thick)."""
    h, w = img.shape[:2]
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
    t = torch.linspace(0.0, 1.0, n)
    xs = (x0 + (x1 - x0) * t).round().long()
    ys = (y0 + (y1 - y0) * t).round().long()
    r = width // 2
    for dy in range(-r, width - r):
        for dx in range(-r, width - r):
            yy, xx = (ys + dy).clamp(0, h - 1), (xs + dx).clamp(0, w - 1)
            img[yy, xx] = colour


def plot_figures(steps: Sequence[StepFigures], height: int = 160, width: int = 320) -> Tensor:
    """The three figures against the step as a ComfyUI IMAGE ``[1, height, width, 3]`` (white background).

    Grid lines at 0, 0.5 and 1; colours :data:`COLOURS` in :data:`FIGURES` order (blue coverage,
    orange mask area, green gate > 0.5). A single step is drawn as a short horizontal tick.
    """
    if height < 16 or width < 16:
        raise ValueError("the plot needs at least 16x16 pixels")
    img = torch.ones(height, width, 3)
    pad = 6
    top, bottom, left, right = pad, height - 1 - pad, pad, width - 1 - pad
    for level in (0.0, 0.5, 1.0):
        y = bottom - level * (bottom - top)
        grey = torch.tensor([0.75, 0.75, 0.75]) if level == 0.5 else torch.tensor([0.45, 0.45, 0.45])
        _segment(img, left, y, right, y, grey, 1)
    if steps:
        first, last = steps[0].step, steps[-1].step
        span = max(1, last - first)

        def x_of(step: int) -> float:
            return left + (step - first) / span * (right - left) if last > first else (left + right) / 2

        for name, colour in zip(FIGURES, COLOURS, strict=True):
            col = torch.tensor(colour)
            pts = [(x_of(s.step), bottom - float(getattr(s, name)) * (bottom - top)) for s in steps]
            if len(pts) == 1:
                x, y = pts[0]
                _segment(img, x - 4, y, x + 4, y, col, 3)
            for (xa, ya), (xb, yb) in zip(pts, pts[1:], strict=False):
                _segment(img, xa, ya, xb, yb, col, 2)
    return img.unsqueeze(0)
