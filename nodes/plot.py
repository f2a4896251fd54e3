"""Charts a person can read, as ComfyUI IMAGEs: a title, axes with labelled ticks, a legend.

Drawn with Pillow and the font that ships inside Pillow, on purpose:

* **Pillow** is a dependency of ComfyUI itself (it loads and saves every image), so every host already
  has it. A plotting library (matplotlib: tens of MB, a font cache built on first use) would be a new
  install through ComfyUI-Manager for three lines and a legend.
* **The built-in font** (``ImageFont.load_default``) needs no font file on the user's system. Pillow
  10.1 and newer, built with FreeType (every wheel on PyPI), give a scalable font for
  ``load_default(size=...)``; older Pillow has no ``size`` argument and only a small fixed bitmap font.
  :func:`font` handles both, and the layout is measured from the font actually loaded, never from the
  requested size, so labels do not overlap on either. The pack's hosts ship Pillow 13 (ComfyUI
  0.3.75 and 0.28.2 environments alike); the fallback is tested by forcing it.

Layering: this module imports nothing from the pack (Pillow, torch and the standard library only), so
it sits in the lowest node-side layer. The core (``dreammatcher_core``) stays pure torch/einops/numpy
and hands over the numbers; the node layer decides how they look.

Everything is drawn at twice the output size and reduced by box averaging (smooth lines and text);
with the bitmap fallback font, at the output size directly (a bitmap glyph does not scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["Chart", "Series", "font", "line_chart", "nice_ticks"]

RGB = tuple[float, float, float]
Box = tuple[int, int, int, int]  # left, top, right, bottom (right/bottom exclusive), output pixels

INK = (34, 34, 34)
MUTED = (110, 110, 110)
AXIS = (90, 90, 90)
GRID = (205, 205, 205)
FRAME = (170, 170, 170)
PAPER = (255, 255, 255)
LEGEND_FILL = (246, 246, 246)

TITLE_SIZE = 17
LABEL_SIZE = 14
TICK_SIZE = 13


def font(size: float) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, bool]:
    """``(font, scalable)``: Pillow's own font at ``size`` pixels if this Pillow can scale it.

    Pillow < 10.1 rejects the ``size`` argument (TypeError); a Pillow without FreeType returns its bitmap
    font for any size. Either way the caller gets the bitmap font and ``scalable`` False.
    """
    try:
        f = ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default(), False
    return f, isinstance(f, ImageFont.FreeTypeFont)


@dataclass(frozen=True)
class Series:
    """One line of a chart: its legend label, colour (RGB in [0, 1]), values and width (output px)."""

    label: str
    colour: RGB
    values: Sequence[float]
    width: float = 2.0


@dataclass(frozen=True)
class Chart:
    """A drawn chart: the IMAGE ``[1, H, W, 3]`` and where its parts are, for tests and overlays.

    ``boxes`` maps ``title``, ``legend``, ``plot``, ``x_label``, ``y_label``, ``x_ticks`` and
    ``y_ticks`` to ``(left, top, right, bottom)`` in output pixels (absent parts are left out).
    """

    image: torch.Tensor
    boxes: dict[str, Box]
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    area: tuple[float, float, float, float]  # the axes' left, top, right, bottom in output pixels
    legend: tuple[str, ...] = field(default=())

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Where the data point ``(x, y)`` lands, in output pixels (pixel ``i`` spans ``[i, i + 1)``)."""
        left, top, right, bottom = self.area
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        return left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top)


def nice_ticks(lo: float, hi: float, most: int = 8, integer: bool = True) -> list[float]:
    """At most ``most`` evenly spaced round values from ``lo`` to ``hi``.

    The spacing is 1, 2 or 5 times a power of ten (also 2.5 when ``integer`` is false), as people count.
    """
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, most - 1)
    mag = 10 ** math.floor(math.log10(raw))
    steps = (1, 2, 5, 10) if integer else (1, 2, 2.5, 5, 10)
    step = next(m * mag for m in steps if m * mag >= raw)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + 1e-9 * step:
        out.append(round(v, 10))
        v += step
    return out


def _rgb(c: RGB) -> tuple[int, int, int]:
    return tuple(int(round(255 * min(1.0, max(0.0, v)))) for v in c)


def _size(draw: ImageDraw.ImageDraw, text: str, f) -> tuple[int, int, int]:
    """``(width, height, top offset)`` of ``text`` as drawn at the origin."""
    if not text:
        return 0, 0, 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=f)
    return right - left, bottom - top, top


def _fmt_tick(v: float) -> str:
    return f"{v:g}"


def line_chart(
    x: Sequence[float],
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    y_range: tuple[float, float] = (0.0, 1.0),
    y_ticks: Sequence[tuple[float, str]] | None = None,
    grid: Sequence[float] = (),
    x_ticks: Sequence[tuple[float, str]] | None = None,
    note: str = "",
    size: tuple[int, int] = (512, 320),
) -> Chart:
    """A line chart of ``series`` against ``x`` as a ComfyUI IMAGE with title, axes and legend.

    ``size`` is ``(width, height)``. ``grid`` gives the y values of horizontal grid lines. Without
    ``x_ticks``, round ticks are picked (:func:`nice_ticks`, integers); a single x value is drawn in
    the middle of a span of one either side. Series are drawn in order with their own widths, so a
    wide line under a narrow one stays visible where two coincide; points get a dot when there are few.
    ``note`` is written in the middle of the plot area (e.g. why there is nothing to plot).
    """
    width, height = size
    if width < 200 or height < 140:
        raise ValueError(f"a chart with labels needs at least 200x140 pixels, got {width}x{height}")
    probe, scalable = font(LABEL_SIZE)
    u = 2 if scalable else 1  # supersampling factor
    f_title = font(TITLE_SIZE * u)[0] if scalable else probe
    f_label = font(LABEL_SIZE * u)[0] if scalable else probe
    f_tick = font(TICK_SIZE * u)[0] if scalable else probe
    W, H = width * u, height * u
    img = Image.new("RGB", (W, H), PAPER)
    draw = ImageDraw.Draw(img)
    pad, gap = 8 * u, 5 * u
    boxes: dict[str, tuple[int, int, int, int]] = {}

    # ---- title band
    y = pad
    if title:
        tw, th, toff = _size(draw, title, f_title)
        # a half-pixel stroke reads as semi-bold (Pillow's font has no bold face); none for bitmap text
        draw.text((pad, y - toff), title, fill=INK, font=f_title, stroke_width=u // 2, stroke_fill=INK)
        boxes["title"] = (pad, y, pad + tw, y + th)
        y += th + 2 * gap

    # ---- legend: a framed box of swatch + label entries, wrapped into rows that fit the width
    labels = tuple(s.label for s in series)
    if series:
        sw, inner, between = 22 * u, 6 * u, 16 * u
        lh = max(_size(draw, "Ag", f_label)[1], 4 * u)
        entries = [(s, _size(draw, s.label, f_label)) for s in series]
        rows: list[list] = [[]]
        row_w = 0
        limit = W - 2 * pad - 2 * inner
        for s, (ew, _eh, _eo) in entries:
            need = sw + inner + ew
            if rows[-1] and row_w + between + need > limit:
                rows.append([])
                row_w = 0
            row_w += (between if rows[-1] else 0) + need
            rows[-1].append((s, ew))
        box_w = max(sum(sw + inner + ew for _, ew in r) + between * (len(r) - 1) for r in rows) + 2 * inner
        box_h = len(rows) * lh + (len(rows) - 1) * gap + 2 * inner
        x0 = pad
        draw.rectangle([x0, y, x0 + box_w, y + box_h], fill=LEGEND_FILL, outline=FRAME, width=u)
        _, _, aoff = _size(draw, "Ag", f_label)
        ry = y + inner
        for r in rows:
            rx = x0 + inner
            for s, ew in r:
                mid = ry + lh // 2
                draw.line([(rx, mid), (rx + sw, mid)], fill=_rgb(s.colour),
                          width=max(3 * u, round(s.width * u)))
                draw.text((rx + sw + inner, ry - aoff), s.label, fill=INK, font=f_label)
                rx += sw + inner + ew + between
            ry += lh + gap
        boxes["legend"] = (x0, y, x0 + box_w + 1, y + box_h + 1)
        y += box_h + 2 * gap

    # ---- axes geometry
    if x_ticks is None:
        if len(x) == 0:
            ticks_x = []
        else:
            ticks_x = [(v, _fmt_tick(v)) for v in nice_ticks(min(x), max(x))]
    else:
        ticks_x = list(x_ticks)
    if len(x):
        xr = (float(min(x)), float(max(x)))
        if xr[1] - xr[0] < 1e-12:
            xr = (xr[0] - 1.0, xr[0] + 1.0)
    else:
        xr = (0.0, 1.0)
    if y_ticks is None:
        y_ticks = [(v, _fmt_tick(v)) for v in nice_ticks(y_range[0], y_range[1], most=5, integer=False)]
    tick = 4 * u
    ylw = max((_size(draw, t, f_tick)[0] for _, t in y_ticks), default=0)
    _, ylab_h, _ = _size(draw, y_label, f_label)
    _, xt_h, _ = _size(draw, "0123456789", f_tick)
    _, xlab_h, _ = _size(draw, x_label, f_label)
    last_w = _size(draw, ticks_x[-1][1], f_tick)[0] if ticks_x else 0
    left = pad + (ylab_h + 2 * gap if y_label else 0) + ylw + gap + tick
    right = W - pad - max(0, last_w // 2)
    bottom = H - pad - (xlab_h + gap if x_label else 0) - xt_h - gap - tick
    top = y + max(u, _size(draw, "0", f_tick)[1] // 2)
    if bottom - top < 30 * u or right - left < 60 * u:
        raise ValueError(f"{width}x{height} pixels leave no room for the plot under its labels")

    def px(xv: float) -> float:
        return left + (xv - xr[0]) / (xr[1] - xr[0]) * (right - left)

    def py(yv: float) -> float:
        return bottom - (yv - y_range[0]) / (y_range[1] - y_range[0]) * (bottom - top)

    # grid, frame, ticks
    for g in grid:
        draw.line([(left, py(g)), (right, py(g))], fill=GRID, width=u)
    draw.line([(left, top), (left, bottom)], fill=AXIS, width=u)
    draw.line([(left, bottom), (right, bottom)], fill=AXIS, width=u)
    yt_box = [W, H, 0, 0]
    for v, text in y_ticks:
        yy = py(v)
        draw.line([(left - tick, yy), (left, yy)], fill=AXIS, width=u)
        tw, th, toff = _size(draw, text, f_tick)
        tx, ty = left - tick - gap - tw, round(yy - th / 2)
        draw.text((tx, ty - toff), text, fill=INK, font=f_tick)
        yt_box = [min(yt_box[0], tx), min(yt_box[1], ty), max(yt_box[2], tx + tw), max(yt_box[3], ty + th)]
    xt_box = [W, H, 0, 0]
    for v, text in ticks_x:
        xx = px(v)
        draw.line([(xx, bottom), (xx, bottom + tick)], fill=AXIS, width=u)
        tw, th, toff = _size(draw, text, f_tick)
        tx, ty = round(xx - tw / 2), bottom + tick + gap
        draw.text((tx, ty - toff), text, fill=INK, font=f_tick)
        xt_box = [min(xt_box[0], tx), min(xt_box[1], ty), max(xt_box[2], tx + tw), max(xt_box[3], ty + th)]
    if x_label:
        tw, th, toff = _size(draw, x_label, f_label)
        tx = max(pad, min(W - pad - tw, round((left + right - tw) / 2)))
        ty = H - pad - th
        draw.text((tx, ty - toff), x_label, fill=MUTED, font=f_label)
        boxes["x_label"] = (tx, ty, tx + tw, ty + th)
    if y_label:
        tw, th, toff = _size(draw, y_label, f_label)
        strip = Image.new("RGB", (tw, th), PAPER)
        ImageDraw.Draw(strip).text((0, -toff), y_label, fill=MUTED, font=f_label)
        strip = strip.rotate(90, expand=True)  # reads bottom to top
        sx = pad
        sy = max(0, min(H - strip.height, round((top + bottom - strip.height) / 2)))
        img.paste(strip, (sx, sy))
        boxes["y_label"] = (sx, sy, sx + strip.width, sy + strip.height)

    # lines and dots
    dots = 0 < len(x) <= 40
    for s in series:
        col = _rgb(s.colour)
        pts = [(px(float(a)), py(float(b))) for a, b in zip(x, s.values, strict=True)]
        w = max(u, round(s.width * u))
        if len(pts) > 1:
            draw.line(pts, fill=col, width=w, joint="curve")
        if dots or len(pts) == 1:
            r = w * 0.5 + 1.5 * u
            for cx, cy in pts:
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    if note:
        tw, th, toff = _size(draw, note, f_label)
        draw.text((round((left + right - tw) / 2), round((top + bottom - th) / 2) - toff), note, fill=MUTED,
                  font=f_label)

    # back to the output size; boxes from drawing units to output pixels (rounded outwards)
    if u > 1:
        img = img.resize((width, height), Image.BOX)
    boxes["plot"] = (left, top, right + 1, bottom + 1)
    if ticks_x:
        boxes["x_ticks"] = tuple(xt_box)
    if y_ticks:
        boxes["y_ticks"] = tuple(yt_box)
    out_boxes = {k: (b[0] // u, b[1] // u, -(-b[2] // u), -(-b[3] // u)) for k, b in boxes.items()}
    image = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).float().div(255.0).unsqueeze(0)
    area = (left / u, top / u, right / u, bottom / u)
    return Chart(image, out_boxes, xr, (float(y_range[0]), float(y_range[1])), area, labels)
