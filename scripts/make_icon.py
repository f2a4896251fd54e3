"""Draw the pack's icon, ``web/icon.png`` (256x256), the image the Registry and ComfyUI-Manager show.

Two rounded tiles, a reference and a target, with matched points joined by arcs: the semantic
correspondence the method is built on. Run it again after changing the design:
``.venv/bin/python scripts/make_icon.py``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 256
OUT = Path(__file__).resolve().parents[1] / "web" / "icon.png"


def main() -> None:
    img = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    d.rounded_rectangle((8, 8, SIZE - 8, SIZE - 8), radius=44, fill=(28, 30, 46, 255))
    left, right = (28, 70, 118, 186), (138, 70, 228, 186)
    d.rounded_rectangle(left, radius=16, fill=(60, 66, 104, 255))
    d.rounded_rectangle(right, radius=16, fill=(60, 66, 104, 255))
    pairs = [((52, 98), (196, 112), (255, 186, 73)), ((92, 128), (164, 104), (98, 214, 170)),
             ((64, 160), (204, 160), (236, 96, 132))]
    for (x0, y0), (x1, y1), colour in pairs:
        mid = ((x0 + x1) / 2, min(y0, y1) - 58)
        pts = [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t - 4 * t * (1 - t) * (min(y0, y1) - mid[1]))
               for t in [i / 24 for i in range(25)]]
        d.line(pts, fill=colour + (255,), width=5, joint="curve")
        for x, y in ((x0, y0), (x1, y1)):
            d.ellipse((x - 9, y - 9, x + 9, y + 9), fill=colour + (255,), outline=(255, 255, 255, 255),
                      width=2)
    d.text((SIZE // 2, 214), "DreamMatcher", fill=(230, 232, 245, 255), anchor="mm")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    img.save(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
