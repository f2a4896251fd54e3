"""The miniature world's demo on the real server: its workflow runs, its nodes fit the pack's, and a
normal install does not show them."""

from __future__ import annotations

import json
import sys

import pytest
from comfy_env import REPO
from server_fixture import ServerError

sys.path.insert(0, str(REPO / "scripts"))
from miniworld import measure, world  # noqa: E402

TWIN = REPO / "scripts" / "miniworld" / "example_workflows" / "api" / "miniworld_demo.json"
DEMO_IDS = {"MW_LoadModel", "MW_RenderSubject", "MW_LatentToImage", "MW_ImageToLatent"}


def _rgb(path):
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((world.SIZE, world.SIZE), Image.NEAREST)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def test_a_normal_install_shows_no_demo_nodes(comfy_server):
    assert not DEMO_IDS & set(comfy_server.get_json("/object_info"))


def test_demo_workflow_runs_and_each_method_changes_the_image(miniworld_server):
    graph = json.loads(TWIN.read_text())
    entry = miniworld_server.run(graph, timeout=600)
    saved = {}
    for nid, node in graph.items():
        if node["class_type"] == "SaveImage":
            images = entry["outputs"].get(nid, {}).get("images", [])
            assert images, f"SaveImage {nid} saved nothing"
            img = images[0]
            saved[node["inputs"]["filename_prefix"].split("/")[-1]] = (
                miniworld_server.output_dir / img.get("subfolder", "") / img["filename"]
            )
    assert set(saved) == {"dreammatcher", "guidance", "baseline"}
    preview = [n for n, node in graph.items() if node["class_type"] == "PreviewImage"][0]
    assert len(entry["outputs"][preview]["images"]) == 4  # reference | baseline | AMA | AMA + guidance
    rgb = {k: _rgb(p) for k, p in saved.items()}
    assert not (rgb["dreammatcher"] == rgb["baseline"]).all()
    ref = world.render(
        world.random_scene(
            __import__("torch").Generator().manual_seed(0),
            world.Subject("circle", "stripes", ("red", "yellow")),
            "left",
        ),
        palette=world.SHIPPED_PALETTE,  # the demo's renderer node draws in the shipped model's colours
    )
    for name, img in rgb.items():
        d = measure.describe(img, world.SHIPPED_PALETTE)
        dist = measure.hist_dist(img, d["mask"], ref, measure.subject_mask(ref), world.SHIPPED_PALETTE)
        print(
            f"\n[demo] {name}: {d['shape']} at {d['position']}, colours {sorted(d['colours'])}, "
            f"{d['texture']}, hist distance to the reference {dist:.2f}"
        )


def test_word_encoder_errors_name_the_vocabulary(miniworld_server):
    graph = {
        "1": {"class_type": "MW_LoadModel", "inputs": {"weights": "miniworld.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "pink circle", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {"model": ["1", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "ddim",
                       "scheduler": "ddim_uniform", "positive": ["2", 0], "negative": ["3", 0],
                       "latent_image": ["4", 0], "denoise": 1.0},
        },
        "6": {"class_type": "MW_LatentToImage", "inputs": {"samples": ["5", 0], "scale": 1}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    with pytest.raises(ServerError, match="unknown word") as err:
        miniworld_server.run(graph)
    assert "stripes" in str(err.value) and "triangle" in str(err.value)


def test_subject_lookup_uses_the_word_encoder(miniworld_server):
    """Match Settings finds 'circle' in 'circle right' through the demo encoder, and names the words
    of the prompt when the subject is missing."""
    graph = json.loads(TWIN.read_text())
    for node in graph.values():
        if node["class_type"] == "DM_MatchSettings":
            node["inputs"]["subject"] = "square"
    with pytest.raises(ServerError, match="not in the target prompt") as err:
        miniworld_server.run(graph, timeout=600)
    assert "circle, right" in str(err.value)
