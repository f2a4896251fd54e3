"""Regenerate ``example_workflows/`` from ``scripts/example_graphs.py``.

Each API-format graph is loaded into the real ComfyUI frontend (headless Debian chromium) with
``app.loadApiJson``, laid out by its :class:`example_graphs.Layout` (columns left to right, a
group per stage with a Note at its top, seeds fixed), and serialised back with
``app.graph.serialize()``, so the UI-format files carry exactly the widget layout the frontend
expects. The API twin goes to ``example_workflows/api/``. The template browser's thumbnail,
``example_workflows/<name>.jpg``, is drawn by ``scripts/make_thumbnails.py`` (what the workflow
makes, not the graph: a graph is unreadable at card size), which this script calls.
Run: ``.venv/bin/python scripts/make_examples.py [--only NAME]``; with ``--miniworld`` it writes the
miniature world's demo workflow into ``scripts/miniworld/example_workflows/`` instead (the demo nodes
are loaded for it) and runs it once on the server for the thumbnail's real images.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

import make_thumbnails  # noqa: E402
from comfy_env import comfy_root  # noqa: E402
from example_graphs import EXAMPLES  # noqa: E402
from server_fixture import ComfyServer, link_miniworld  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 2400, "height": 1400}

#: Places every node: column x from the widest node of each column, nodes of one group and column
#: stacked, band-1 groups below the band-0 groups they share columns with; then a Note at the top
#: of each group's first column and the group's rectangle around its members. Fixes every
#: "control after generate" widget so the DreamMatcher image and its baseline share the seed. A
#: group may give a node its size (a preview large enough to read) and its title before placing.
LAYOUT_JS = """([layout]) => {
    const LG = window.LiteGraph;
    const g = window.app.graph;
    const GAP_X = 70, GAP_Y = 40, TITLE = LG.NODE_TITLE_HEIGHT || 30, PAD = 20, HEAD = 40;
    const NOTE_W = 340;
    for (const n of g._nodes) for (const w of (n.widgets || []))
        if (w.name === 'control_after_generate') w.value = 'fixed';
    // notes first, so they take part in the column widths and stacks
    const members = layout.groups.map(grp => {
        const note = LG.createNode('Note');
        note.widgets[0].value = grp.note;
        note.title = 'Note: ' + grp.title;
        g.add(note);
        const lines = Math.ceil(grp.note.length / 46) + 1;
        note.size = [NOTE_W, 28 + 15 * lines];
        const list = [[note, 0]];
        for (const [id, off] of grp.nodes) {
            const node = g.getNodeById(Number(id));
            if (!node) throw new Error('layout names node ' + id + ' that the graph lacks');
            if (grp.sizes[id]) node.size = [...grp.sizes[id]];
            if (grp.titles[id]) node.title = grp.titles[id];
            list.push([node, off]);
        }
        return list;
    });
    const colW = {};
    layout.groups.forEach((grp, i) => {
        for (const [node, off] of members[i]) {
            const c = grp.col + off;
            colW[c] = Math.max(colW[c] || 0, node.size[0]);
        }
    });
    const maxCol = Math.max(...Object.keys(colW).map(Number));
    const colX = [];
    let x = 0;
    for (let c = 0; c <= maxCol; c++) { colX[c] = x; x += (colW[c] || 0) + GAP_X; }
    const bottom = {};  // per band-0 column: lowest y used
    const place = (band) => layout.groups.forEach((grp, i) => {
        if (grp.band !== band) return;
        const cols = members[i].map(([, off]) => grp.col + off);
        let top = 0;
        if (band > 0) top = Math.max(...cols.map(c => bottom[c] || 0)) + 2 * GAP_Y;
        const y = {};
        let minX = Infinity, minY = Infinity, maxX = -Infinity, maxY = -Infinity;
        for (const [node, off] of members[i]) {
            const c = grp.col + off;
            const ny = (y[c] ?? top + HEAD + TITLE);
            node.pos = [colX[c], ny];
            y[c] = ny + node.size[1] + TITLE + GAP_Y;
            minX = Math.min(minX, colX[c]); maxX = Math.max(maxX, colX[c] + node.size[0]);
            minY = Math.min(minY, ny - TITLE); maxY = Math.max(maxY, ny + node.size[1]);
        }
        const group = new LG.LGraphGroup(grp.title);
        group.color = grp.color;
        group.font_size = 28;
        g.add(group);
        group.pos = [minX - PAD, minY - HEAD];
        group.size = [maxX - minX + 2 * PAD, maxY - minY + HEAD + PAD];
        if (band === 0) for (const c of cols) bottom[c] = Math.max(bottom[c] || 0, maxY + PAD);
    });
    place(0);
    place(1);
    g.setDirtyCanvas(true, true);
    return JSON.stringify(g.serialize());
}"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    examples, out_dir = EXAMPLES, REPO / "example_workflows"
    argv = sys.argv[1:]
    if "--only" in argv:  # regenerate one example, leaving the others' files untouched
        name = argv[argv.index("--only") + 1]
        if name not in EXAMPLES:
            raise SystemExit(f"--only: unknown example '{name}'; choose one of {sorted(EXAMPLES)}")
        examples = {name: EXAMPLES[name]}
    miniworld = "--miniworld" in argv
    if miniworld:
        from example_graphs import Example
        from miniworld import demo_graph

        examples = {make_thumbnails.demo_name(): Example(demo_graph.demo, demo_graph.layout(), "miniworld")}
        out_dir = REPO / "scripts" / "miniworld" / "example_workflows"
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(comfy_root(), Path(tmp))
        if miniworld:
            server.prepare()
            link_miniworld(server.base)
        server.start()
        try:
            server.post_json("/settings", {"Comfy.TutorialCompleted": True})
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport=VIEWPORT)
                page.goto(server.url, wait_until="domcontentloaded")
                ready = "window.app && window.app.graph && window.app.graph.nodes !== undefined"
                page.wait_for_function(ready, timeout=120_000)
                page.wait_for_timeout(3000)
                for name, example in examples.items():
                    api = example.build()
                    (out_dir / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
                    page.evaluate("async ([api, name]) => { await window.app.loadApiJson(api, name); }",
                                  [api, name + ".json"])
                    layout = dataclasses.asdict(example.layout)
                    ui = json.loads(page.evaluate(LAYOUT_JS, [layout]))
                    real = [n for n in ui["nodes"] if n["type"] != "Note"]
                    assert len(real) == len(api), (name, len(real), len(api))
                    (out_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
                    if miniworld:
                        reference, result = make_thumbnails.demo_images(server, api)
                        make_thumbnails.save(make_thumbnails.demo_thumbnail(
                            reference, result, make_thumbnails.demo_caption()), out_dir / f"{name}.jpg")
                    else:
                        make_thumbnails.write_illustrations([name])
                    types = sorted({n["type"] for n in real})
                    print(f"wrote {name}: {len(real)} nodes + {len(ui['nodes']) - len(real)} notes, "
                          f"{len(ui['groups'])} groups ({', '.join(types)})")
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
