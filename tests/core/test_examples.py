"""The example workflows are laid out for reading, and each UI file matches its API twin.

Read from the files alone (no ComfyUI): every example has an API twin and a JPEG thumbnail of
the same name, and its name reads as a title (the template browser shows it as typed); each
thumbnail is the square picture ``scripts/make_thumbnails.py`` draws (the SD examples' ones are
illustrations and carry the illustration banner); the nodes of
the UI file are exactly the twin's; every node sits in one titled group that opens with a Note;
no two nodes overlap; every wire runs from left to right (or down a column), so none crosses the
canvas backwards; every seed is fixed, and the DreamMatcher sampler and its baseline share
theirs. The browser tier converts each UI file back to API format with the frontend itself and
compares it with the twin, and opens the template browser to check that every card shows its
thumbnail; the e2e tier runs the twins.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
import make_thumbnails  # noqa: E402

EXAMPLES = REPO / "example_workflows"
UI_FILES = sorted(EXAMPLES.glob("*.json"))
GENERATION_GROUPS = {"1 Reference", "2 Appearance matching", "3 Generate", "Compare"}
SAMPLERS = {"KSampler", "DM_MatchingGuidanceSampler"}


def _load(path: Path) -> tuple[dict, dict]:
    ui = json.loads(path.read_text(encoding="utf-8"))
    api = json.loads((EXAMPLES / "api" / path.name).read_text(encoding="utf-8"))
    return ui, api


def _box(node: dict) -> tuple[float, float, float, float]:
    """x0, y0, x1, y1 of a node including its title bar (30 px above ``pos``)."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - 30, x + w, y + h


def _inside(inner: tuple, outer: list) -> bool:
    gx, gy, gw, gh = outer
    return inner[0] >= gx and inner[1] >= gy and inner[2] <= gx + gw and inner[3] <= gy + gh


def test_there_are_the_examples_users_need():
    names = {p.stem for p in UI_FILES}
    assert {"DreamMatcher - AMA with KSampler", "DreamMatcher - Full method with matching guidance",
            "DreamMatcher - Inspect features and matches", "DreamMatcher - AMA on SDXL"} <= names, names


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_template_name_reads_as_a_title(path):
    """The card shows the file name as typed: "DreamMatcher - <what it does>", no snake_case."""
    assert path.stem.startswith("DreamMatcher - "), path.stem
    assert "_" not in path.stem, path.stem


def _banner_rgb(img) -> tuple[float, float, float]:
    """Mean colour of the banner's left end (left of any lettering)."""
    import numpy as np

    band = np.asarray(img.convert("RGB").crop((4, img.height - 56, 14, img.height - 8)), dtype=float)
    return tuple(band.reshape(-1, 3).mean(axis=0))


def _close(a, b, tol: float = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_sd_thumbnail_is_the_labelled_illustration(path):
    """SD weights cannot run here, so each SD example's card shows the drawn illustration, which
    says so in its banner; the committed file is that drawing (not a screenshot, not another image)."""
    import numpy as np
    from PIL import Image

    spec = make_thumbnails.ILLUSTRATIONS.get(path.stem)
    assert spec is not None, f"{path.stem}: no illustration in scripts/make_thumbnails.py"
    assert "ILLUSTRATION" in make_thumbnails.BANNER_ILLUSTRATION
    img = Image.open(path.with_suffix(".jpg"))
    assert img.size == (make_thumbnails.SIZE, make_thumbnails.SIZE), "the card's picture box is square"
    assert _close(_banner_rgb(img), make_thumbnails.ACCENT), "no illustration banner"
    drawn = np.asarray(make_thumbnails.illustration(spec), dtype=int)
    # JPEG noise moves pixels by a few levels; another title or picture moves >1% of them a lot
    off = (np.abs(np.asarray(img.convert("RGB"), dtype=int) - drawn).max(axis=2) > 64).mean()
    assert off < 0.005, f"{path.name} is not what make_thumbnails.py draws ({off:.1%} of pixels differ)"


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_example_has_twin_and_thumbnail(path):
    ui, api = _load(path)
    real = {str(n["id"]): n["type"] for n in ui["nodes"] if n["type"] != "Note"}
    assert real == {k: v["class_type"] for k, v in api.items()}, "UI file and API twin disagree"
    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"no thumbnail {thumb.name} for the template browser"
    data = thumb.read_bytes()
    assert data[:3] == b"\xff\xd8\xff", "thumbnail is not a JPEG"
    assert len(data) > 10_000


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_example_is_laid_out_for_reading(path):
    ui, api = _load(path)
    nodes = {n["id"]: n for n in ui["nodes"]}
    groups = ui["groups"]
    titles = {g["title"] for g in groups}
    if any(v["class_type"] in SAMPLERS for v in api.values()):
        assert GENERATION_GROUPS <= titles, titles
    for node in nodes.values():
        homes = [g["title"] for g in groups if _inside(_box(node), g["bounding"])]
        assert len(homes) == 1, f"node {node['id']} ({node['type']}) is in groups {homes}"
    for g in groups:
        notes = [n for n in nodes.values() if n["type"] == "Note" and _inside(_box(n), g["bounding"])]
        assert notes and notes[0]["widgets_values"][0].strip(), f"group {g['title']} has no Note"
    boxes = sorted((_box(n), n["id"]) for n in nodes.values())
    for i, (a, ida) in enumerate(boxes):
        for b, idb in boxes[i + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"nodes {ida} and {idb} overlap"
    for _lid, src, _, dst, _, _ in ui["links"]:
        s, d = _box(nodes[src]), _box(nodes[dst])
        rightward = s[2] < d[0]
        down_a_column = abs(s[0] - d[0]) < 1 and s[3] < d[1]
        assert rightward or down_a_column, (
            f"wire {nodes[src]['type']} -> {nodes[dst]['type']} runs backwards across the canvas")


@pytest.mark.parametrize("path", UI_FILES, ids=lambda p: p.stem)
def test_example_seeds_are_fixed_and_shared(path):
    ui, api = _load(path)
    for n in ui["nodes"]:
        assert "randomize" not in (n.get("widgets_values") or []), f"{n['type']} re-randomises its seed"
    seeds = {v["inputs"]["seed"] for v in api.values() if v["class_type"] in SAMPLERS}
    assert len(seeds) <= 1, f"DreamMatcher and baseline samplers use different seeds: {seeds}"
