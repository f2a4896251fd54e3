"""The hover check of the Semantic Match inspector panel, shared by the classic and the Vue renderer
tests: hover a target pixel, read the marker the extension draws on the reference back from the page."""

from __future__ import annotations

_REF_PIXELS_JS = """() => {
    const c = document.querySelector('.dm-inspector canvas.dm-ref');
    return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);
}"""
_MARKER_JS = """() => {
    const root = document.querySelector('.dm-inspector');
    const c = root.querySelector('canvas.dm-ref');
    const ctx = c.getContext('2d');
    const x = Math.round(parseFloat(root.dataset.markerX));
    const y = Math.round(parseFloat(root.dataset.markerY));
    return {ds: {...root.dataset}, px: Array.from(ctx.getImageData(x, y, 1, 1).data),
            after: Array.from(ctx.getImageData(0, 0, c.width, c.height).data),
            info: root.querySelector('.dm-info').textContent};
}"""
#: The marker colours of the extension: trusted (cycle-consistent) and untrusted matches.
TRUSTED, UNTRUSTED = [0x30, 0xFF, 0x60], [0xFF, 0x40, 0x40]


def hover_target(page) -> dict:
    """Hover 30 % across, half-way down the panel's target image; the marker state afterwards.

    Returns ``{"before": reference pixels, "hit": element class at the point, "ds": panel dataset,
    "px": marker pixel, "after": reference pixels, "info": the panel's text}``.
    """
    tgt_canvas = page.locator(".dm-inspector canvas.dm-tgt")
    tgt_canvas.wait_for(state="visible", timeout=30_000)
    before = page.evaluate(_REF_PIXELS_JS)
    box = tgt_canvas.bounding_box()
    assert box and box["width"] > 10 and box["height"] > 10, box
    hx, hy = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
    hit = page.evaluate("([x, y]) => document.elementFromPoint(x, y)?.className", [hx, hy])
    page.mouse.move(hx - 5, hy - 5)
    page.mouse.move(hx, hy, steps=3)
    page.wait_for_function("() => document.querySelector('.dm-inspector').dataset.markerCell", timeout=10_000)
    return {"before": before, "hit": hit, **page.evaluate(_MARKER_JS)}


def assert_marker(state: dict, errors: list[str]) -> None:
    """The marker is drawn in the confidence colour at the matched pixel, the reference view changed,
    and the pack's extension raised nothing in the page."""
    ds = state["ds"]
    assert ds["confidence"] in ("0", "1"), ds
    assert state["px"][:3] == (TRUSTED if ds["confidence"] == "1" else UNTRUSTED), state["px"]
    assert sum(1 for a, b in zip(state["before"], state["after"], strict=True) if a != b) > 0
    assert not [e for e in errors if "dreammatcher" in e.lower()], errors
