"""e2e: the full DreamMatcher graph on a real server.

LoadImage → VAEEncode → DM_InvertReference → DM_AMAPatch (+ DM_SemanticMatch with a TI subject)
→ stock KSampler → VAEDecode → SaveImage, on the random narrow SD1.5 checkpoint with a LoRA and
a textual-inversion embedding. The AMA image must differ from the same graph without the patch.
"""

from __future__ import annotations

import numpy as np
from images import render_png, write_reference_png

STEPS = 6
SIZE = 64


def _graph(m, *, ama: bool, prefix: str) -> dict:
    target = f"a photo of embedding:{m.embedding} dog on the beach"
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m.checkpoint}},
        "2": {"class_type": "LoraLoader", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_name": m.lora, "strength_model": 1.0,
            "strength_clip": 1.0}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": target}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": ""}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1],
                                                         "text": f"a photo of embedding:{m.embedding} dog"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "dm_e2e_reference.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["2", 0], "reference": ["11", 0], "reference_positive": ["5", 0], "steps": STEPS,
            "scheduler": "ddim_uniform", "cfg": 1.0, "reference_negative": ["4", 0]}},
        "13": {"class_type": "DM_SemanticMatch", "inputs": {
            "lambda_c": 0.4, "mask_mode": "soft", "subject": f"embedding:{m.embedding}", "clip": ["2", 1],
            "target_prompt": target}},
        "14": {"class_type": "DM_AMAPatch", "inputs": {
            "model": ["2", 0], "reference": ["12", 0], "strength": 1.0, "start_percent": 0.0,
            "end_percent": 1.0, "layer_preset": "paper (decoder 32²+64²)", "custom_layers": "",
            "match": ["13", 0]}},
        "15": {"class_type": "KSampler", "inputs": {
            "model": ["14", 0] if ama else ["2", 0], "positive": ["3", 0], "negative": ["4", 0],
            "latent_image": ["6", 0], "seed": 11, "steps": STEPS, "cfg": 5.0, "sampler_name": "ddim",
            "scheduler": "ddim_uniform", "denoise": 1.0}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": prefix}},
    }
    if not ama:
        for k in ("10", "11", "12", "13", "14"):
            del g[k]
    return g


def _render(server, graph) -> np.ndarray:
    return render_png(server, graph, SIZE)


def test_ama_graph_with_lora_and_ti_subject(comfy_server, e2e_models):
    server, m = comfy_server, e2e_models
    write_reference_png(server.base / "input" / "dm_e2e_reference.png", SIZE, box=(16, 48, 16, 48), seed=5)
    log_start = len(server.log_text())
    ama = _render(server, _graph(m, ama=True, prefix="dm_e2e_ama"))
    plain = _render(server, _graph(m, ama=False, prefix="dm_e2e_plain"))
    log = server.log_text()[log_start:]
    assert "lora key not loaded" not in log and "does not exist" not in log, log[-3000:]
    diff = float(np.abs(ama - plain).mean())
    print(f"\n[e2e] AMA vs plain mean |pixel diff| {diff:.2f}")
    assert ama.std() > 2.0
    assert diff > 0.5
