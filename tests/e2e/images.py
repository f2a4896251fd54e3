"""Image helpers shared by the e2e tests: deterministic reference PNGs in, rendered PNGs out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_reference_png(path: Path, size: int, *, box: tuple[int, int, int, int] | None = None,
                        seed: int = 0) -> None:
    """A colour-gradient image, optionally with a flat random-colour ``box`` (y0, y1, x0, x1)."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.stack([xx * 4, yy * 4, 255 - xx * 2], -1) % 256
    if box is not None:
        y0, y1, x0, x1 = box
        img[y0:y1, x0:x1] = np.random.default_rng(seed).integers(0, 255, size=3)
    Image.fromarray(img.astype(np.uint8)).save(path)


def render_png(server, graph: dict, size: int, *, timeout: float = 300) -> np.ndarray:
    """Run ``graph``, require exactly one saved ``size``x``size`` PNG and return its RGB pixels."""
    entry = server.run(graph, timeout=timeout)
    paths = server.output_images(entry)
    assert len(paths) == 1, entry.get("outputs")
    assert paths[0].suffix == ".png" and paths[0].is_file(), paths[0]
    with Image.open(paths[0]) as im:
        assert im.size == (size, size)
        return np.asarray(im.convert("RGB"), dtype=np.int16)
