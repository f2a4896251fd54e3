"""``make demo``'s page: /?miniworld_demo opens the demo workflow, and queuing it from the page
produces the reference | baseline | AMA | AMA + guidance images."""

from __future__ import annotations

import time

from conftest import open_frontend


def test_demo_page_opens_and_runs_the_demo_workflow(miniworld_server):
    with open_frontend(miniworld_server, path="/?miniworld_demo") as (page, errors):
        page.wait_for_function(
            "() => window.app.graph._nodes.some(n => n.type === 'MW_LoadModel')", timeout=60_000
        )
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
        print(f"\n[browser] demo workflow queued from the page ran in {elapsed:.1f} s")
        assert not [e for e in errors if "miniworld" in e.lower() or "dreammatcher" in e.lower()], errors
