"""Regenerate ``example_workflows/`` from ``scripts/example_graphs.py``.

Each API-format graph is loaded into the real ComfyUI frontend (headless Debian chromium) with
``app.loadApiJson`` and serialised back with ``app.graph.serialize()``, so the UI-format files
carry exactly the widget layout the frontend expects. The API twin goes to
``example_workflows/api/``. Run: ``.venv/bin/python scripts/make_examples.py``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from comfy_env import comfy_root  # noqa: E402
from example_graphs import EXAMPLES  # noqa: E402
from server_fixture import ComfyServer  # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    from playwright.sync_api import sync_playwright

    out_dir = REPO / "example_workflows"
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        server = ComfyServer(comfy_root(), Path(tmp))
        server.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                page.goto(server.url, wait_until="domcontentloaded")
                ready = "window.app && window.app.graph && window.app.graph.nodes !== undefined"
                page.wait_for_function(ready, timeout=120_000)
                for name, build in EXAMPLES.items():
                    api = build()
                    (out_dir / "api" / f"{name}.json").write_text(json.dumps(api, indent=1) + "\n")
                    ui = page.evaluate(
                        """async ([api, name]) => {
                            await window.app.loadApiJson(api, name + '.json');
                            const g = window.app.graph;
                            if (g.arrange) g.arrange();
                            return JSON.stringify(g.serialize());
                        }""", [api, name])
                    ui = json.loads(ui)
                    types = sorted({n["type"] for n in ui["nodes"]})
                    assert len(ui["nodes"]) == len(api), (name, len(ui["nodes"]), len(api))
                    (out_dir / f"{name}.json").write_text(json.dumps(ui, indent=1) + "\n")
                    print(f"wrote {name}: {len(ui['nodes'])} nodes ({', '.join(types)})")
                browser.close()
        finally:
            server.stop()


if __name__ == "__main__":
    main()
