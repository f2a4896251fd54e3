"""e2e: the full paper pipeline with matching guidance on a real server.

LoadImage → VAEEncode → DM_InvertReference → DM_AMAPatch → DM_MatchingGuidanceSampler → VAEDecode →
SaveImage on the random narrow SD1.5 checkpoint. The guided image must differ from the same graph
with guidance_scale 0 (which is plain DDIM with the AMA patch), and both must be real images.
"""

from __future__ import annotations

import numpy as np
from images import render_png, write_reference_png

STEPS = 6
SIZE = 64
TARGET = "a photo of a dog on the beach"


def _graph(m, *, scale: float, mode: str, prefix: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m.checkpoint}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": TARGET}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a dog"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "dm_e2e_guidance_ref.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["1", 0], "reference": ["11", 0], "reference_positive": ["5", 0], "steps": STEPS,
            "scheduler": "ddim_uniform", "cfg": 1.0, "reference_negative": ["4", 0]}},
        "14": {"class_type": "DM_AMAPatch", "inputs": {
            "model": ["1", 0], "reference": ["12", 0], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "layer_preset": "paper (decoder 32²+64²)", "custom_layers": ""}},
        "15": {"class_type": "DM_MatchingGuidanceSampler", "inputs": {
            "model": ["14", 0], "reference": ["12", 0], "seed": 11, "steps": STEPS, "cfg": 5.0,
            "scheduler": "ddim_uniform", "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["6", 0], "denoise": 1.0, "guidance_scale": scale, "guidance_start": 0.0,
            "guidance_end": 1.0, "mode": mode}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": prefix}},
    }


def _render(server, graph) -> np.ndarray:
    return render_png(server, graph, SIZE)


def test_invert_ama_guidance_decode_save(comfy_server, e2e_models):
    server, m = comfy_server, e2e_models
    write_reference_png(server.base / "input" / "dm_e2e_guidance_ref.png", SIZE, box=(12, 52, 20, 44), seed=7)
    off = _render(server, _graph(m, scale=0.0, mode="exact", prefix="dm_e2e_mg_off"))
    exact = _render(server, _graph(m, scale=1000.0, mode="exact", prefix="dm_e2e_mg_exact"))
    fast = _render(server, _graph(m, scale=1000.0, mode="fast", prefix="dm_e2e_mg_fast"))
    d_exact = float(np.abs(exact - off).mean())
    d_fast = float(np.abs(fast - off).mean())
    print(f"\n[e2e] guidance vs none mean |pixel diff|: exact {d_exact:.2f}, fast {d_fast:.2f}")
    assert exact.std() > 2.0 and fast.std() > 2.0
    assert d_exact > 0.0 and d_fast > 0.0
