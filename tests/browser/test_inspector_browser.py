"""Browser tier: the Semantic Match inspector in the real ComfyUI frontend (headless Chromium).

A graph with DM_SemanticMatch (inspector role, on the random narrow SD1.5 checkpoint) is loaded
and queued through the page, so the websocket ``executed`` message reaches the node; then hovering
the node's target image must draw a marker on its reference image. Asserted from the DOM (the
panel's data attributes) and the canvas pixels; a screenshot is saved.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from inspector_hover import assert_marker, hover_target


def _e2e_conftest():
    """The e2e tier's conftest (its ``e2e_models`` fixture writes the narrow SD1.5 checkpoint)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "e2e" / "conftest.py"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("dm_e2e_conftest", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


e2e_models = _e2e_conftest().e2e_models

playwright_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = os.environ.get("DM_CHROMIUM", "/usr/bin/chromium")
#: Screenshots go to DM_SCREENSHOT_DIR (e.g. a CI artifact folder), else into the server's temp base.
SHOT_ENV = "DM_SCREENSHOT_DIR"


def _write_images(input_dir: Path) -> tuple[str, str]:
    """A structured reference and its mirror image, as PNGs in the server's input folder."""
    import numpy as np
    from PIL import Image

    h, w = 64, 96
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([xs / w, ys / h, 0.5 + 0.5 * np.sin(xs / 7.0) * np.cos(ys / 9.0)], -1)
    img[20:44, 10:40] = [0.9, 0.2, 0.1]
    ref = (img * 255).astype(np.uint8)
    Image.fromarray(ref).save(input_dir / "dm_ref.png")
    Image.fromarray(ref[:, ::-1].copy()).save(input_dir / "dm_tgt.png")
    return "dm_ref.png", "dm_tgt.png"


def _graph(ckpt: str, ref: str, tgt: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "LoadImage", "inputs": {"image": ref}},
        "3": {"class_type": "LoadImage", "inputs": {"image": tgt}},
        "4": {"class_type": "DM_SemanticMatch",
              "inputs": {"lambda_c": 0.4, "mask_mode": "none", "subject": "", "target_prompt": "",
                         "noise_percent": 0.1, "seed": 0, "model": ["1", 0], "vae": ["1", 2],
                         "reference_image": ["2", 0], "target_image": ["3", 0]}},
    }


def test_hover_marks_matched_reference_pixel(comfy_server, e2e_models):  # noqa: F811
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    ref, tgt = _write_images(comfy_server.base / "input")
    graph = _graph(e2e_models.checkpoint, ref, tgt)
    shot_dir = Path(os.environ.get(SHOT_ENV) or comfy_server.base / "screenshots")
    shot_dir.mkdir(parents=True, exist_ok=True)
    # a returning user: no first-run templates dialog over the canvas
    comfy_server.post_json("/settings", {"Comfy.TutorialCompleted": True})
    with playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(comfy_server.url, wait_until="domcontentloaded")
            page.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager",
                                   timeout=90_000)
            # our extension was imported by the frontend
            page.wait_for_function(
                "() => (window.app.extensions || []).some(e => e.name === 'dreammatcher.inspector')",
                timeout=30_000)
            page.wait_for_timeout(1000)
            for close in page.locator(".p-dialog-close-button").all():
                if close.is_visible():
                    close.click()
            page.evaluate("async (g) => { await window.app.loadApiJson(g, 'dm_inspector.json'); }", graph)
            page.evaluate("""() => {
                const n = window.app.graph._nodes.find(n => n.type === 'DM_SemanticMatch');
                n.pos = [40, 40];
                n.size = [520, Math.max(n.size[1], 420)];
                const ds = window.app.canvas.ds; ds.scale = 1; ds.offset = [0, 0];
                window.app.graph.setDirtyCanvas(true, true);
            }""")
            page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
            page.wait_for_selector(".dm-inspector[data-ready='1']", state="attached", timeout=240_000)
            # bring the panel on screen and hover the centre of the target image
            page.evaluate("() => window.app.graph.setDirtyCanvas(true, true)")
            page.screenshot(path=str(shot_dir / "inspector_ready.png"), full_page=True)
            state = hover_target(page)
            print("element at hover point:", state["hit"])
            page.screenshot(path=str(shot_dir / "inspector_hover.png"), full_page=True)
        finally:
            browser.close()
    ds = state["ds"]
    print(f"screenshot: {shot_dir / 'inspector_hover.png'}")
    print(f"hover: target cell {ds['targetCell']} -> reference cell {ds['markerCell']}, "
          f"confidence {ds['confidence']}; info '{state['info']}'")
    assert_marker(state, errors)
