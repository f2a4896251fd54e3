"""e2e tier: the pack inside a real ComfyUI server, driven over HTTP.

The stock-graph test is the proof that the test host itself is real: a detected SD1.5
checkpoint, a kohya LoRA and a TI embedding go through ComfyUI's own loaders and sampler and
produce a PNG. ComfyUI prints no positive "applied" line, so application is proven by the
absence of its skip warnings AND by a changed image (docs/host.md, "LoRA and textual
inversion with random weights").
"""

from __future__ import annotations

import numpy as np
import pytest
from images import render_png
from server_fixture import PACK_FOLDER, pack_node_ids

STEPS = 4
SIZE = 64  # pixels -> 8x8 latent


def stock_graph(models, *, seed: int, prompt: str, lora_model: float = 1.0, lora_clip: float = 1.0,
                prefix: str = "dm_e2e") -> dict:
    """CheckpointLoaderSimple -> LoraLoader -> CLIPTextEncode x2 -> KSampler -> VAEDecode -> SaveImage."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": models.checkpoint}},
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": models.lora,
            "strength_model": lora_model, "strength_clip": lora_clip}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": prompt}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "blurry"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["2", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


def _render(server, graph: dict) -> np.ndarray:
    return render_png(server, graph, SIZE, timeout=180)


def _mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


def test_pack_loaded_with_all_nodes(comfy_server):
    """The pack imported cleanly and every node ID its modules declare is in /object_info.

    (The fixture already fails otherwise; this also requires that there is at least one.)
    """
    ids = pack_node_ids()
    assert ids, "no node_id=... found in nodes/*.py: the pack registers no nodes"
    info = comfy_server.get_json("/object_info")
    assert ids <= set(info)
    for node_id in ids:
        assert info[node_id]["python_module"].startswith(f"custom_nodes.{PACK_FOLDER}"), info[node_id]
    assert not comfy_server.pack_import_errors(comfy_server.startup_log)


def test_server_detects_import_failures(comfy_server):
    """Negative control: the log scan does flag a pack import failure."""
    link = comfy_server.pack_link
    fake = [f"Traceback (most recent call last):\n  File \"{link}/__init__.py\", line 1, in <module>\n"
            "ImportError: boom\n", f"Cannot import {link} module for custom nodes: boom\n"]
    log = comfy_server.startup_log
    assert comfy_server.pack_import_errors(log) == []
    errors = comfy_server.pack_import_errors(log + "".join(fake))
    assert len(errors) == 2, errors
    # Another module failing (e.g. ComfyUI's audio extras without torchaudio) is not ours.
    other = comfy_server.comfy_root / "comfy_extras" / "nodes_audio.py"
    noise = (f"Traceback (most recent call last):\n  File \"{other}\", line 4, in <module>\n"
             f"ModuleNotFoundError: x\nCannot import {other} module for custom nodes: x\n"
             "IMPORT FAILED: nodes_audio.py\n")
    assert comfy_server.pack_import_errors(log + noise) == []


def test_stock_graph_with_lora_and_embedding(comfy_server, e2e_models):
    """A stock SD1.5 graph with a LoRA and a TI embedding writes a PNG, and both really apply.

    Six renders with one seed, ordered so that the LoRA strengths (a change re-patches the
    models) change as rarely as possible.
    """
    server, m = comfy_server, e2e_models
    seed = 20240611
    prompt = f"a photo of embedding:{m.embedding} dog"
    plain_prompt = "a photo of dog"  # what the tokenizer sees if the embedding is skipped
    missing_prompt = "a photo of embedding:dm_no_such_embedding dog"

    def render(expect_missing: bool = False, **kw) -> np.ndarray:
        start = len(server.log_text())
        img = _render(server, stock_graph(m, seed=seed, **kw))
        log = server.log_text()[start:]
        assert "lora key not loaded" not in log, "LoRA keys were skipped:\n" + log[-3000:]
        assert ("does not exist" in log) == expect_missing, log[-3000:]
        return img

    full = render(prompt=prompt)
    # A random model still has to give a non-degenerate image, or the comparisons are void.
    assert full.std() > 2.0, f"degenerate image (std {full.std():.2f})"
    no_emb = render(prompt=plain_prompt)
    # Negative control for the embedding proof: a missing embedding is logged and silently
    # dropped, giving bit-for-bit the image of the prompt without it. It also shows that two
    # separately computed renders are identical, so the differences below are not noise.
    missing = render(prompt=missing_prompt, expect_missing=True)
    assert _mean_abs_diff(missing, no_emb) == 0.0
    unet_only = render(prompt=prompt, lora_clip=0.0)
    clip_only = render(prompt=prompt, lora_model=0.0)
    no_lora = render(prompt=prompt, lora_model=0.0, lora_clip=0.0)

    diffs = {
        "LoRA (unet+clip) vs none": _mean_abs_diff(full, no_lora),
        "LoRA unet part vs none": _mean_abs_diff(unet_only, no_lora),
        "LoRA clip part vs none": _mean_abs_diff(clip_only, no_lora),
        "embedding vs same prompt without it": _mean_abs_diff(full, no_emb),
    }
    print("\n[e2e] mean |pixel diff|:", {k: round(v, 2) for k, v in diffs.items()})
    for what, diff in diffs.items():
        assert diff > 1.0, f"{what}: images barely differ ({diff:.3f}); was it applied?"


@pytest.mark.parametrize("node_id", sorted(pack_node_ids()) or ["<none>"])
def test_pack_node_schema_served(comfy_server, node_id):
    """Each pack node's schema is served with a display name, the DreamMatcher category and a
    tooltip on every input (frontend contract)."""
    if node_id == "<none>":
        pytest.skip("the pack declares no node IDs (test_pack_loaded_with_all_nodes fails for that)")
    info = comfy_server.get_json(f"/object_info/{node_id}")[node_id]
    assert info["category"].startswith("DreamMatcher"), info["category"]
    assert info["display_name"]
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            assert opts.get("tooltip"), f"{node_id}.{name} has no tooltip"
