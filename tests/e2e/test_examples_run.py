"""Every example workflow's API twin runs on the real server, unchanged but for its size.

The twin is read from ``example_workflows/api/`` (the browser tier checks that each UI file
converts to exactly that twin), then only the checkpoint name (the e2e tier's random SD1.5 or
SDXL checkpoint), the step counts and the image sizes are made small. Every SaveImage node must
save an image, every inspector must show one, and each DreamMatcher image must differ from the
baseline beside it (same seed: any difference is DreamMatcher's doing).
"""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest
from comfy_env import REPO

sys.path.insert(0, str(REPO / "scripts"))
from example_graphs import EXAMPLES  # noqa: E402

TWINS = REPO / "example_workflows" / "api"
INSPECTORS = {"DM_InspectFeatures", "DM_InspectMatch"}


def _smoke(graph: dict, ckpt: str, steps: int, size: int) -> dict:
    g = json.loads(json.dumps(graph))
    for node in g.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = ckpt
        if "steps" in inputs:
            inputs["steps"] = steps
        if node["class_type"] in ("EmptyLatentImage", "ImageScale"):
            inputs["width"] = inputs["height"] = size
    return g


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_twin_runs(name, comfy_server, e2e_models, request):
    from PIL import Image

    example = EXAMPLES[name]
    ckpt = e2e_models.checkpoint if example.checkpoint == "sd15" else request.getfixturevalue("e2e_sdxl")
    twin = json.loads((TWINS / f"{name}.json").read_text(encoding="utf-8"))
    steps, size = example.smoke
    src = comfy_server.comfy_root / "input" / "example.png"
    for node in twin.values():
        if node["class_type"] == "LoadImage":
            shutil.copy(src, comfy_server.base / "input" / node["inputs"]["image"])
    t0 = time.perf_counter()
    try:
        entry = comfy_server.run(_smoke(twin, ckpt, steps, size), timeout=1800)
    finally:
        if example.checkpoint == "sdxl":
            comfy_server.post_json("/free", {"unload_models": True, "free_memory": True})
    print(f"\n[e2e] {name}: ran in {time.perf_counter() - t0:.1f} s ({steps} steps at {size}²)")
    outputs = entry["outputs"]
    saved = {}
    for nid, node in twin.items():
        if node["class_type"] == "SaveImage":
            images = outputs.get(nid, {}).get("images", [])
            assert images, f"{name}: SaveImage {nid} saved nothing"
            img = images[0]
            saved[node["inputs"]["filename_prefix"]] = (
                comfy_server.output_dir / img.get("subfolder", "") / img["filename"])
        if node["class_type"] in INSPECTORS:
            assert outputs.get(nid, {}).get("images"), f"{name}: {node['class_type']} showed nothing"
    baselines = {p: path for p, path in saved.items() if p.endswith("_baseline")}
    for prefix, path in baselines.items():
        dm = Image.open(saved[prefix.removesuffix("_baseline")]).tobytes()
        assert dm != Image.open(path).tobytes(), f"{name}: DreamMatcher image equals its baseline"
