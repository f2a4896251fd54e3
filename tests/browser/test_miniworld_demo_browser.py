"""``make demo``'s page, as a new user meets it in a 1280x800 window: /?miniworld_demo opens the demo
workflow in one tab, framed on its results (the comparison and AMA Diagnostics at a readable zoom), and
queuing it from the page produces the reference | baseline | AMA | AMA + guidance images."""

from __future__ import annotations

import time

from conftest import open_frontend

WINDOW = (1280, 800)
#: Below this zoom the canvas draws node text in low quality; the demo must open above it.
READABLE_ZOOM = 0.6

TABS_JS = """() => {
    const w = window.app.extensionManager.workflow;
    return (w.openWorkflows || []).map(x => x.path);
}"""
#: Screen boxes (CSS pixels in the page) of the result nodes, and the canvas's own box and zoom.
FRAME_JS = """() => {
    const c = window.app.canvas, r = c.canvas.getBoundingClientRect();
    const T = window.LiteGraph.NODE_TITLE_HEIGHT || 30;
    const box = (n) => {
        const [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - T]);
        const [x2, y2] = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
        return [r.left + x, r.top + y, r.left + x2, r.top + y2];
    };
    const nodes = window.app.graph._nodes;
    const compare = nodes.find(n => n.type === 'PreviewImage' && /^Compare/.test(n.title || ''));
    const diag = nodes.find(n => n.type === 'DM_AMADiagnostics');
    return {scale: c.ds.scale, compare: compare && box(compare), diagnostics: diag && box(diag),
            compareSize: compare && compare.size, window: [window.innerWidth, window.innerHeight]};
}"""


def _inside(box: list[float], width: int, height: int) -> bool:
    return box[0] >= 0 and box[1] >= 0 and box[2] <= width and box[3] <= height


def test_demo_page_opens_once_framed_and_runs_the_demo_workflow(miniworld_server):
    with open_frontend(miniworld_server, path="/?miniworld_demo", viewport=WINDOW) as (page, errors):
        page.wait_for_function(
            "() => window.app.graph._nodes.some(n => n.type === 'MW_LoadModel')", timeout=60_000
        )
        # the demo replaces the start-up's empty tab once its own load is done
        page.wait_for_function(f"() => ({TABS_JS})().length === 1", timeout=30_000)
        page.wait_for_timeout(3000)  # any late second load would have opened its tab by now
        tabs = page.evaluate(TABS_JS)
        assert [t.split("/")[-1] for t in tabs].count("miniworld_demo.json") == 1 and len(tabs) == 1, tabs
        types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
        assert {
            "MW_LoadModel",
            "MW_RenderSubject",
            "DM_InvertReference",
            "DM_AMAPatch",
            "KSampler",
            "DM_MatchingGuidanceSampler",
            "DM_AMADiagnostics",
        } <= set(types)
        page.wait_for_function(f"() => ({FRAME_JS})().scale < 1", timeout=15_000)  # framed by then
        frame = page.evaluate(FRAME_JS)
        print(f"\n[browser] demo framing: {frame}")
        assert frame["scale"] >= READABLE_ZOOM, frame
        assert _inside(frame["compare"], *WINDOW), f"the comparison is not in the {WINDOW} window: {frame}"
        assert _inside(frame["diagnostics"], *WINDOW), f"AMA Diagnostics is not in the window: {frame}"
        # four 256-pixel images side by side: each at least 160 screen pixels wide
        assert (frame["compare"][2] - frame["compare"][0]) >= 4 * 160, frame

        find_preview = "() => window.app.graph._nodes.find(n => n.type === 'PreviewImage').id"
        preview_id = str(page.evaluate(find_preview))
        before = set(miniworld_server.get_json("/history"))
        t0 = time.perf_counter()
        page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
        entry = None
        while time.perf_counter() - t0 < 600:
            new = {k: v for k, v in miniworld_server.get_json("/history").items() if k not in before}
            done = [v for v in new.values() if v.get("status", {}).get("completed")]
            failed = [v for v in new.values() if v.get("status", {}).get("status_str") == "error"]
            assert not failed, failed[0]["status"]
            if done:
                entry = done[0]
                break
            time.sleep(1)
        assert entry, "the demo workflow queued from the page did not finish within 600 s"
        elapsed = time.perf_counter() - t0
        images = {nid: out.get("images", []) for nid, out in entry["outputs"].items()}
        saved = [img for imgs in images.values() for img in imgs if img.get("type") == "output"]
        # reference | baseline | AMA | AMA + guidance
        assert len(saved) == 3 and len(images.get(preview_id, [])) == 4, images
        for img in saved:
            path = miniworld_server.output_dir / img.get("subfolder", "") / img["filename"]
            assert path.stat().st_size > 0
        # the page shows them: the comparison node holds its four images once the run is done
        page.wait_for_function(
            f"() => (window.app.graph.getNodeById({preview_id}).imgs || []).length === 4", timeout=30_000
        )
        # the inversion at the demo's own settings raises no warning
        invert = next(n for n, v in entry["outputs"].items() if "Reconstruction error" in " ".join(
            v.get("text", [])))
        text = " ".join(entry["outputs"][invert]["text"])
        assert "high:" not in text, text
        print(f"[browser] demo workflow queued from the page ran in {elapsed:.1f} s; {text}")
        assert not [e for e in errors if "miniworld" in e.lower() or "dreammatcher" in e.lower()], errors
