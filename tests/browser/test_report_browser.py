"""Browser tier: the per-step AMA diagnostics reach the user in the real frontend.

The graph LoadImage → VAEEncode → DM_InvertReference → DM_AMAPatch → KSampler → DM_AMADiagnostics
runs on the random narrow SD1.5 checkpoint, queued through the page so the websocket ``executed``
messages reach the nodes. ``web/dreammatcher.js`` must then show the diagnostics table on the AMA
Diagnostics node and the reconstruction error on the inverter, read back from the DOM; a
screenshot is saved.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from test_inspector_browser import SHOT_ENV, e2e_models  # noqa: F401  (fixture)

STEPS = 6
SIZE = 64


def _graph(ckpt: str, image: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "LoadImage", "inputs": {"image": image}},
        "6": {"class_type": "VAEEncode", "inputs": {"pixels": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["1", 0], "reference": ["6", 0], "reference_positive": ["2", 0], "steps": STEPS,
            "scheduler": "ddim_uniform", "cfg": 1.0}},
        "8": {"class_type": "DM_AMAPatch", "inputs": {
            "model": ["1", 0], "reference": ["7", 0], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "layer_preset": "paper (decoder 32²+64²)", "custom_layers": ""}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["8", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": 3, "steps": STEPS, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
            "denoise": 1.0}},
        "10": {"class_type": "DM_AMADiagnostics", "inputs": {"model": ["8", 0], "latent": ["9", 0]}},
    }


def check_report(diag: str) -> None:
    """The AMA Diagnostics panel's text: the run's head line, one table row per matched step (window
    from 0: every step but the first, which has no previous-step features; ComfyUI's ddim_uniform can
    give one step more than asked, so the count is read from the head line), and nothing after it."""
    head = re.match(r"AMA run #\d+: (\d+) matched steps \(1\.\.(\d+)\)", diag)
    assert head, diag
    n = int(head.group(1))
    assert n >= STEPS - 1 and int(head.group(2)) == n
    lines = diag.splitlines()
    rows = lines[2:]
    assert len(rows) == n and [int(r.split()[0]) for r in rows] == list(range(1, n + 1))
    assert all(r.split()[2].endswith("%") for r in rows)


def test_diagnostics_and_invert_text_shown_on_the_nodes(frontend, comfy_server, e2e_models):  # noqa: F811
    from images import write_reference_png

    page, errors = frontend
    write_reference_png(comfy_server.base / "input" / "dm_report_ref.png", SIZE, box=(16, 48, 16, 48), seed=2)
    shot_dir = Path(os.environ.get(SHOT_ENV) or comfy_server.base / "screenshots")
    shot_dir.mkdir(parents=True, exist_ok=True)
    page.wait_for_function(
        "() => (window.app.extensions || []).some(e => e.name === 'dreammatcher.report')", timeout=30_000)
    for close in page.locator(".p-dialog-close-button").all():
        if close.is_visible():
            close.click()
    graph = _graph(e2e_models.checkpoint, "dm_report_ref.png")
    page.evaluate("async (g) => { await window.app.loadApiJson(g, 'dm_report.json'); }", graph)
    page.evaluate("""() => {
        const n = window.app.graph._nodes.find(n => n.type === 'DM_AMADiagnostics');
        const right = Math.max(...window.app.graph._nodes.map(m => m.pos[0] + m.size[0]));
        n.pos = [right + 40, 40];
        const ds = window.app.canvas.ds; ds.scale = 0.8; ds.offset = [875 - (right + 40), 90];
        window.app.graph.setDirtyCanvas(true, true);
    }""")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    sel = "pre.dm-report[data-node-type='DM_AMADiagnostics']"
    page.wait_for_selector(sel, state="attached", timeout=240_000)
    page.wait_for_selector("pre.dm-report[data-node-type='DM_InvertReference']", state="attached",
                           timeout=30_000)
    page.evaluate("() => window.app.graph.setDirtyCanvas(true, true)")
    page.wait_for_timeout(500)
    reports = page.evaluate("""() => Object.fromEntries(Array.from(document.querySelectorAll('pre.dm-report'))
        .map(p => [p.dataset.nodeType, p.textContent]))""")
    # the whole table is visible: the panel is as tall as its text (no scrolling needed)
    fits = page.evaluate(f"() => {{ const p = document.querySelector(\"{sel}\"); "
                         "return [p.clientHeight, p.scrollHeight]; }")
    # the panel is not serialised: saved workflows keep the node's widget values unchanged
    widgets = page.evaluate("""() => {
        const n = window.app.graph._nodes.find(n => n.type === 'DM_AMADiagnostics');
        return window.app.graph.serialize().nodes.find(s => s.id === n.id).widgets_values ?? null;
    }""")
    page.screenshot(path=str(shot_dir / "diagnostics_report.png"), full_page=True)
    print(f"\nscreenshot: {shot_dir / 'diagnostics_report.png'}\n{reports['DM_AMADiagnostics']}")
    diag = reports["DM_AMADiagnostics"]
    check_report(diag)
    assert "reconstruction" in reports["DM_InvertReference"].lower(), reports
    assert fits[0] > 0 and fits[1] <= fits[0] + 2, fits
    assert not widgets, widgets
    assert not [e for e in errors if "dreammatcher" in e.lower()], errors
