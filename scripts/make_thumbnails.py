"""Draw the template browser's thumbnails: what each example workflow makes, readable on a card.

The frontend shows a custom-node template as a card about 250 px wide with a square picture box
that holds ``<name>.jpg`` (the file beside ``<name>.json``). A screenshot of the whole graph is
unreadable there, so each thumbnail shows the reference, an arrow and the result, under a short
title. Everything is drawn at 2x and reduced, with Pillow and its bundled default font (what ComfyUI
already ships), so the pictures depend on no system font.

* The SD1.5 and SDXL examples cannot be run on real weights here: their thumbnails are drawn
  *illustrations* (a cartoon dog and a pool, for the examples' "sks dog" prompts) and say so in a
  banner; no model output is passed off as an SD image.
* The miniature-world demo's thumbnail uses the images the shipped model really makes: the
  rendered reference and the AMA result, from one run of the demo workflow on a real server,
  enlarged nearest-neighbour.

Run: ``.venv/bin/python scripts/make_thumbnails.py`` (illustrations only, no server) or with
``--miniworld`` (also runs the demo, a minute or two on two CPU cores).
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parents[1]
EXAMPLES_DIR = REPO / "example_workflows"
DEMO_DIR = REPO / "scripts" / "miniworld" / "example_workflows"

SIZE = 512  #: side of the written thumbnail (the card's picture box is square)
SS = 2  #: drawn at SS x SIZE, then reduced: smooth edges without antialiasing primitives
BANNER_ILLUSTRATION = "ILLUSTRATION, not a model output"
BANNER_REAL = "real output of the shipped model"

BG = (30, 32, 44)
PANEL = (52, 56, 78)
ACCENT = (255, 186, 73)
TEXT = (236, 238, 245)
MUTED = (170, 176, 196)


@dataclass(frozen=True)
class Illustration:
    """One drawn thumbnail: the title, what the two panels are, and which variant of the cartoon."""

    title: str
    left: str
    right: str
    #: one line under the panels: what changed between them
    caption: str
    #: "generate": dog -> dog in a pool; "guidance": the same with matched points marked on both;
    #: "inspect": reference and target joined by match lines
    kind: str
    badge: str = "SD1.5"


POOL = "same dog, new prompt: swimming in a pool"

#: Keyed by the example's file name (``scripts/example_graphs.py``'s ``EXAMPLES``).
ILLUSTRATIONS: dict[str, Illustration] = {
    "DreamMatcher - AMA with KSampler": Illustration(
        "AMA + KSampler", "reference", "result", POOL, "generate"),
    "DreamMatcher - Full method with matching guidance": Illustration(
        "AMA + matching guidance", "reference", "result", POOL, "guidance"),
    "DreamMatcher - Inspect features and matches": Illustration(
        "Inspect features & matches", "reference", "target", "matched points, colour by colour", "inspect"),
    "DreamMatcher - AMA on SDXL": Illustration(
        "AMA on SDXL", "reference", "result", POOL, "generate", badge="SDXL"),
}


def _font(px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=px * SS)


def _s(*v: float) -> tuple[int, ...]:
    return tuple(round(x * SS) for x in v)


def _fit_font(d: ImageDraw.ImageDraw, text: str, width: float, largest: int, smallest: int):
    """The largest font (in thumbnail pixels) at which ``text`` fits ``width``."""
    for px in range(largest, smallest - 1, -1):
        font = _font(px)
        if d.textlength(text, font=font) <= width * SS:
            return font
    return _font(smallest)


def _text(d: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, fill, anchor="la",
          bold: bool = False) -> None:
    d.text(_s(*xy), text, font=font, fill=fill, anchor=anchor,
           stroke_width=SS // 2 if bold else 0, stroke_fill=fill)


def _frame(title: str, left: str, right: str, caption: str, badge: str, banner: str,
           banner_fill) -> tuple[Image.Image, tuple]:
    """The common layout; returns the canvas and the two panel boxes (thumbnail pixels)."""
    img = Image.new("RGB", _s(SIZE, SIZE), BG)
    d = ImageDraw.Draw(img)
    _text(d, (24, 20), "DreamMatcher", _font(24), ACCENT, bold=True)
    bfont = _font(22)
    bw = d.textlength(badge, font=bfont) / SS + 20
    d.rounded_rectangle(_s(SIZE - 24 - bw, 16, SIZE - 24, 48), radius=8 * SS, outline=MUTED, width=2 * SS)
    _text(d, (SIZE - 24 - bw / 2, 33), badge, bfont, MUTED, anchor="mm")
    _text(d, (24, 60), title, _fit_font(d, title, SIZE - 48, 44, 30), TEXT, bold=True)
    panels = ((24, 124, 224, 324), (SIZE - 224, 124, SIZE - 24, 324))
    for box in panels:
        d.rounded_rectangle(_s(*box), radius=12 * SS, fill=PANEL)
    # the arrow between the panels
    y, x0, x1 = 224, panels[0][2] + 8, panels[1][0] - 8
    d.line(_s(x0, y, x1 - 14, y), fill=ACCENT, width=10 * SS)
    d.polygon([_s(x1 - 22, y - 18), _s(x1, y), _s(x1 - 22, y + 18)], fill=ACCENT)
    lfont = _font(26)
    for box, label in zip(panels, (left, right), strict=True):
        _text(d, ((box[0] + box[2]) / 2, 334), label, lfont, TEXT, anchor="mt")
    _text(d, (SIZE / 2, 400), caption, _fit_font(d, caption, SIZE - 40, 24, 16), MUTED, anchor="mm")
    d.rectangle(_s(0, SIZE - 64, SIZE, SIZE), fill=banner_fill)
    _text(d, (SIZE / 2, SIZE - 32), banner, _fit_font(d, banner, SIZE - 40, 26, 18), (20, 20, 24),
          anchor="mm", bold=True)
    return img, panels


def _finish(img: Image.Image) -> Image.Image:
    return img.resize((SIZE, SIZE), Image.LANCZOS)


# ---- the cartoon (illustrations only) --------------------------------------------------------------
WHITE = (246, 242, 232)
BROWN = (150, 88, 44)
DARK = (40, 30, 26)
COLLAR = (214, 52, 60)
TABLE = (118, 124, 150)
WATER = (64, 150, 214)
WATER_LIGHT = (150, 210, 240)


def _dog(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """A front-facing cartoon dog (white, one brown eye patch, brown ears, red collar), head of radius
    ``r`` centred at (cx, cy). Returns three landmarks (patch, nose, collar) for match marks."""
    d.rounded_rectangle(_s(cx - 0.9 * r, cy + 0.6 * r, cx + 0.9 * r, cy + 2.1 * r),
                        radius=round(0.5 * r * SS), fill=WHITE, outline=DARK, width=2 * SS)
    d.ellipse(_s(cx + 0.1 * r, cy + 1.1 * r, cx + 0.7 * r, cy + 1.7 * r), fill=BROWN)
    for side in (-1, 1):  # floppy ears
        ex = cx + side * 0.75 * r
        d.ellipse(_s(ex - 0.35 * r, cy - 0.7 * r, ex + 0.35 * r, cy + 0.5 * r), fill=BROWN, outline=DARK,
                  width=2 * SS)
    d.ellipse(_s(cx - r, cy - r, cx + r, cy + r), fill=WHITE, outline=DARK, width=2 * SS)
    d.ellipse(_s(cx - 0.62 * r, cy - 0.55 * r, cx - 0.05 * r, cy + 0.05 * r), fill=BROWN)  # eye patch
    for ex in (-0.33, 0.33):
        d.ellipse(_s(cx + ex * r - 0.1 * r, cy - 0.32 * r, cx + ex * r + 0.1 * r, cy - 0.12 * r), fill=DARK)
    d.ellipse(_s(cx - 0.18 * r, cy + 0.15 * r, cx + 0.18 * r, cy + 0.4 * r), fill=DARK)  # nose
    d.arc(_s(cx - 0.3 * r, cy + 0.3 * r, cx + 0.3 * r, cy + 0.7 * r), 20, 160, fill=DARK, width=2 * SS)
    d.rounded_rectangle(_s(cx - 0.7 * r, cy + 0.82 * r, cx + 0.7 * r, cy + 1.02 * r), radius=4 * SS,
                        fill=COLLAR)
    return [(cx - 0.33 * r, cy - 0.25 * r), (cx, cy + 0.27 * r), (cx + 0.45 * r, cy + 0.92 * r)]


def _reference(d: ImageDraw.ImageDraw, box: tuple) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    d.rectangle(_s(x0 + 10, y0 + 144, x1 - 10, y1 - 10), fill=TABLE)
    return _dog(d, (x0 + x1) / 2, y0 + 68, 42)


def _in_pool(img: Image.Image, box: tuple) -> list[tuple[float, float]]:
    """The same dog, now swimming: water to the collar, ripples, a sun. Drawn in its own layer and
    pasted through a rounded mask so nothing spills out of the panel."""
    x0, y0, x1, y1 = box
    layer = Image.new("RGB", img.size, PANEL)
    d = ImageDraw.Draw(layer)
    d.rectangle(_s(x0, y0, x1, y0 + 140), fill=(92, 120, 170))
    d.ellipse(_s(x1 - 62, y0 + 14, x1 - 22, y0 + 54), fill=ACCENT)
    marks = _dog(d, (x0 + x1) / 2 - 16, y0 + 96, 36)
    d.rectangle(_s(x0, y0 + 136, x1, y1), fill=WATER)
    for i, yy in enumerate(range(y0 + 144, y1, 20)):
        for xx in range(x0 - 30 + 18 * (i % 2), x1, 40):
            d.arc(_s(xx, yy, xx + 30, yy + 12), 200, 340, fill=WATER_LIGHT, width=3 * SS)
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).rounded_rectangle(_s(*box), radius=12 * SS, fill=255)
    img.paste(layer, (0, 0), mask)
    return marks


def _target(d: ImageDraw.ImageDraw, box: tuple) -> list[tuple[float, float]]:
    """The inspectors' target: the dog again, smaller and to one side, on grass."""
    x0, y0, x1, y1 = box
    d.rectangle(_s(x0 + 10, y0 + 144, x1 - 10, y1 - 10), fill=(84, 140, 84))
    return _dog(d, (x0 + x1) / 2 + 28, y0 + 88, 32)


MARK_COLOURS = [(98, 214, 170), (236, 96, 132), (120, 170, 255)]


def illustration(spec: Illustration) -> Image.Image:
    """The drawn thumbnail for one SD example, with its "illustration" banner."""
    img, (left, right) = _frame(spec.title, spec.left, spec.right, spec.caption, spec.badge,
                                BANNER_ILLUSTRATION, ACCENT)
    d = ImageDraw.Draw(img)
    a = _reference(d, left)
    b = _target(d, right) if spec.kind == "inspect" else _in_pool(img, right)
    d = ImageDraw.Draw(img)
    if spec.kind == "inspect":
        for (ax, ay), (bx, by), colour in zip(a, b, MARK_COLOURS, strict=True):
            d.line(_s(ax, ay, bx, by), fill=colour, width=3 * SS)
    if spec.kind in ("guidance", "inspect"):
        for pts in (a, b):
            for (px, py), colour in zip(pts, MARK_COLOURS, strict=True):
                d.ellipse(_s(px - 7, py - 7, px + 7, py + 7), fill=colour, outline=DARK, width=SS)
    return _finish(img)


GRID = 32  #: the miniature world's image side
TILE = 192  #: its side in a panel: 6 thumbnail pixels per world pixel


def demo_thumbnail(reference: Image.Image, result: Image.Image, caption: str) -> Image.Image:
    """The demo's thumbnail from its real images, each enlarged nearest-neighbour into a panel."""
    img, panels = _frame("Miniature world demo", "reference", "AMA result", caption, "CPU", BANNER_REAL,
                         (98, 214, 170))
    for box, pic in zip(panels, (reference, result), strict=True):
        # back to the world's own grid (the images come enlarged 8x), then whole-pixel blocks
        grid = pic.convert("RGB").resize((GRID, GRID), Image.NEAREST)
        tile = grid.resize((TILE * SS, TILE * SS), Image.NEAREST)
        img.paste(tile, _s(box[0] + 4, box[1] + 4))
    return _finish(img)


def save(img: Image.Image, dest: Path) -> None:
    img.save(dest, "JPEG", quality=90, optimize=True)


def write_illustrations(names: list[str] | None = None) -> list[Path]:
    """Write ``example_workflows/<name>.jpg`` for the given examples (default: all)."""
    written = []
    for name, spec in ILLUSTRATIONS.items():
        if names is None or name in names:
            dest = EXAMPLES_DIR / f"{name}.jpg"
            save(illustration(spec), dest)
            written.append(dest)
    return written


def demo_images(server, api: dict) -> tuple[Image.Image, Image.Image]:
    """Run the demo graph on ``server`` (one with the miniature world linked) and return its
    rendered reference (the first image of the comparison preview) and its AMA result (the image the
    AMA branch saves)."""
    entry = server.run(api, timeout=900)
    reference = result = None
    for nid, node in api.items():
        images = entry["outputs"].get(nid, {}).get("images", [])
        if node["class_type"] == "PreviewImage" and images:
            first = images[0]
            reference = Image.open(server.base / first.get("type", "temp") / first.get("subfolder", "")
                                   / first["filename"])
        if node["class_type"] == "SaveImage" and node["inputs"]["filename_prefix"].endswith("/dreammatcher"):
            img = images[0]
            result = Image.open(server.output_dir / img.get("subfolder", "") / img["filename"])
    if reference is None or result is None:
        raise RuntimeError("the demo graph gave no comparison preview or no AMA image")
    return reference.copy(), result.copy()


def demo_name() -> str:
    sys.path.insert(0, str(REPO / "scripts"))
    from miniworld import demo_graph

    return getattr(demo_graph, "NAME", "miniworld_demo")


def demo_caption() -> str:
    from miniworld import demo_graph  # demo_name() put scripts/ on the path

    return f'prompt "{demo_graph.TARGET_PROMPT}", look from the reference'


def write_demo() -> Path:
    """Start a server with the miniature world, run the demo's API twin, write its thumbnail."""
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import comfy_root
    from server_fixture import ComfyServer, link_miniworld

    name = demo_name()
    api = json.loads((DEMO_DIR / "api" / f"{name}.json").read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(comfy_root(), Path(tmp))
        server.prepare()
        link_miniworld(server.base)
        server.start()
        try:
            reference, result = demo_images(server, api)
        finally:
            server.stop()
    dest = DEMO_DIR / f"{name}.jpg"
    save(demo_thumbnail(reference, result, demo_caption()), dest)
    return dest


def main() -> None:
    for path in write_illustrations():
        print(f"wrote {path.relative_to(REPO)}")
    if "--miniworld" in sys.argv[1:]:
        print(f"wrote {write_demo().relative_to(REPO)}")


if __name__ == "__main__":
    main()
