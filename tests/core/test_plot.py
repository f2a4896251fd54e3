"""Tests for nodes/plot.py, the pack's charts drawn with Pillow: the text is there, the lines sit at
their values, and both of Pillow's default fonts (scalable and the old bitmap one) lay out.

``nodes/plot.py`` imports nothing from the pack, so it is loaded from its file: no ComfyUI needed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[2] / "nodes" / "plot.py"


def _load():
    spec = importlib.util.spec_from_file_location("dm_plot_under_test", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


P = _load()
BLUE, ORANGE, GREEN = (0.10, 0.45, 0.85), (0.95, 0.55, 0.05), (0.15, 0.65, 0.25)
TICKS = [(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)]


def _series(n: int = 5) -> list:
    return [P.Series("coverage", BLUE, [1.0] * n, 5.0), P.Series("mask area", ORANGE, [0.0] * n, 3.0),
            P.Series("gate > 0.5", GREEN, [0.5] * n, 1.5)]


def _chart(x=range(1, 6), series=None, **kw):
    args = dict(title="A title", x_label="sampling step", y_label="fraction of grid", y_ticks=TICKS,
                grid=(0.0, 0.5, 1.0))
    args.update(kw)
    return P.line_chart(list(x), _series(len(x)) if series is None else series, **args)


def _dark(img: torch.Tensor, box) -> int:
    """Grey pixels darker than mid-grey (text ink, not a coloured line) inside ``box`` of ``[1, H, W, 3]``."""
    left, top, right, bottom = box
    region = img[0, top:bottom, left:right]
    grey = (region.amax(-1) - region.amin(-1)) < 0.15
    return int(((region.mean(-1) < 0.55) & grey).sum())


def _rows_near(img: torch.Tensor, col: int, colour, tol: float = 0.08) -> list[int]:
    c = torch.tensor(colour)
    return [y for y in range(img.shape[1]) if float((img[0, y, col] - c).abs().max()) < tol]


@pytest.fixture
def bitmap_font(monkeypatch):
    """Pillow as it was before 10.1: ``load_default()`` takes no size and gives the bitmap font."""
    from PIL import ImageFont

    bitmap = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else None
    if bitmap is None:
        pytest.skip("this Pillow has no separate bitmap loader to imitate old Pillow with")

    def old_load_default(*args, **kwargs):
        if args or kwargs:
            raise TypeError("load_default() takes no arguments")
        return bitmap

    monkeypatch.setattr(ImageFont, "load_default", old_load_default)


def test_an_image_of_the_requested_size_in_range():
    c = _chart(size=(400, 250))
    assert c.image.shape == (1, 250, 400, 3) and c.image.dtype == torch.float32
    assert 0.0 <= float(c.image.min()) and float(c.image.max()) <= 1.0
    assert c.legend == ("coverage", "mask area", "gate > 0.5")
    with pytest.raises(ValueError, match="at least"):
        _chart(size=(120, 80))


def test_each_line_is_drawn_at_its_value():
    c = _chart()
    img = c.image
    col = int(c.to_pixel(3.5, 0.0)[0])  # between two points, away from the dots
    for colour, value in ((BLUE, 1.0), (ORANGE, 0.0), (GREEN, 0.5)):
        rows = _rows_near(img, col, colour)
        want = c.to_pixel(3.5, value)[1]
        assert rows, (colour, value)
        assert all(abs(y + 0.5 - want) <= 3.0 for y in rows), (colour, value, rows, want)
    # the x axis runs from the first to the last value: the points sit at the plot's two edges
    left, _top, right, _bottom = c.area
    assert c.to_pixel(1, 0)[0] == pytest.approx(left) and c.to_pixel(5, 0)[0] == pytest.approx(right)


LABELLED = ("title", "legend", "x_label", "y_label", "x_ticks", "y_ticks")


def test_text_is_in_every_label_area_and_not_on_a_blank_chart(monkeypatch):
    from PIL import ImageDraw

    labelled = _chart()
    ink = {part: _dark(labelled.image, labelled.boxes[part]) for part in LABELLED}
    assert all(n > 15 for n in ink.values()), ink
    assert ink["title"] > 100 and ink["legend"] > 60, ink
    # the blank comparison: the same chart, laid out the same, with every word left undrawn has no
    # ink in those areas (so the counts above are the text, not lines, frames or swatches)
    monkeypatch.setattr(ImageDraw.ImageDraw, "text", lambda self, *a, **k: None)
    blank = _chart()
    assert blank.boxes == labelled.boxes
    assert {part: _dark(blank.image, blank.boxes[part]) for part in LABELLED} == dict.fromkeys(LABELLED, 0)
    assert not torch.equal(blank.image, labelled.image)
    # and a chart given no words at all has no title, legend or axis label areas
    bare = _chart(title="", x_label="", y_label="", series=[], x=[])
    assert not {"title", "legend", "x_label", "y_label"} & set(bare.boxes)


def test_the_legend_shows_each_colour_and_its_label():
    c = _chart()
    left, top, right, bottom = c.boxes["legend"]
    region = c.image[0, top:bottom, left:right].reshape(-1, 3)
    for colour in (BLUE, ORANGE, GREEN):
        near = (region - torch.tensor(colour)).abs().max(-1).values < 0.08
        assert int(near.sum()) > 20, colour
    assert _dark(c.image, c.boxes["legend"]) > 60  # three labels of ink (swatches are not grey)
    # the legend sits above the plot, so it never hides a line at 1
    assert bottom <= c.boxes["plot"][1]


def test_parts_do_not_overlap_and_stay_inside_the_image():
    for size in ((512, 320), (300, 180)):
        c = _chart(size=size)
        w, h = size
        for name, (left, top, right, bottom) in c.boxes.items():
            assert 0 <= left < right <= w and 0 <= top < bottom <= h, (name, size)
        b = c.boxes
        assert b["title"][3] <= b["legend"][1] <= b["legend"][3] <= b["plot"][1]
        assert b["y_label"][2] <= b["y_ticks"][0] <= b["y_ticks"][2] <= b["plot"][0]
        assert b["plot"][3] <= b["x_ticks"][1] <= b["x_ticks"][3] <= b["x_label"][1]


def test_a_long_legend_wraps_instead_of_running_off_the_image():
    long = [P.Series(f"a rather long legend label number {i}", BLUE, [0.5] * 3) for i in range(3)]
    c = _chart(x=[1, 2, 3], series=long, size=(320, 260))
    one_row = _chart(x=[1, 2, 3], series=long[:1], size=(320, 260))
    lh = one_row.boxes["legend"][3] - one_row.boxes["legend"][1]
    assert c.boxes["legend"][2] <= 320 and c.boxes["legend"][3] - c.boxes["legend"][1] > 1.5 * lh


def test_bitmap_font_of_old_pillow_still_gives_every_label(bitmap_font):
    f, scalable = P.font(14)
    assert not scalable
    c = _chart()
    assert c.image.shape == (1, 320, 512, 3)
    for part in ("title", "legend", "x_label", "y_label", "x_ticks", "y_ticks"):
        assert _dark(c.image, c.boxes[part]) > 10, part
    col = int(c.to_pixel(3.5, 0.0)[0])
    rows = _rows_near(c.image, col, GREEN)
    assert rows and all(abs(y + 0.5 - c.to_pixel(3.5, 0.5)[1]) <= 3.0 for y in rows)


def test_no_data_gives_axes_and_the_note():
    c = _chart(x=[], series=[], note="nothing to plot")
    left, top, right, bottom = (int(v) for v in c.area)
    inner = (left + 5, top + 5, right - 5, bottom - 5)
    assert _dark(c.image, inner) > 20  # the note, in the middle of the axes
    assert _dark(_chart(x=[], series=[]).image, inner) == 0


def test_a_single_point_is_a_dot_in_the_middle():
    c = _chart(x=[4], series=[P.Series("one", BLUE, [0.75], 2.0)])
    cx, cy = c.to_pixel(4, 0.75)
    left, _t, right, _b = c.area
    assert cx == pytest.approx((left + right) / 2)
    assert torch.allclose(c.image[0, int(cy), int(cx)], torch.tensor(BLUE), atol=0.08)


def test_nice_ticks():
    assert P.nice_ticks(1, 7) == [1, 2, 3, 4, 5, 6, 7]
    assert P.nice_ticks(1, 50) == [10, 20, 30, 40, 50]
    assert P.nice_ticks(0, 1, most=5, integer=False) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert P.nice_ticks(3, 3) == [3]
    assert len(P.nice_ticks(0, 999)) <= 8
