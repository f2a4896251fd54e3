"""e2e: LoadImage -> VAEEncode -> DM_InvertReference -> DM_SaveReference on a real server.

Runs on the random narrow SD1.5 checkpoint; the saved file is then loaded back in-process with
the core reader and checked against the schedule and the reference latent.
"""

from __future__ import annotations

import torch
from images import write_reference_png

from dreammatcher_core.trajectory import Trajectory

STEPS = 4
SIZE = 64


def test_invert_and_save_reference_on_a_real_server(comfy_server, e2e_models):
    server, m = comfy_server, e2e_models
    write_reference_png(server.base / "input" / "dm_e2e_invert.png", SIZE)
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": m.checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a sks dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "LoadImage", "inputs": {"image": "dm_e2e_invert.png"}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        "6": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["1", 0], "reference": ["5", 0], "reference_positive": ["2", 0], "steps": STEPS,
            "scheduler": "ddim_uniform", "cfg": 1.0, "inversion_conditioning": ["3", 0]}},
        "7": {"class_type": "DM_SaveReference", "inputs": {"reference": ["6", 0],
                                                           "filename_prefix": "dreammatcher/e2e_ref"}},
    }
    entry = server.run(graph, timeout=300)
    folder = server.output_dir / "dreammatcher"
    files = sorted(folder.glob("e2e_ref_*.dm.safetensors"))
    assert files, entry.get("outputs")
    text = entry["outputs"]["7"]["text"][0]
    assert files[-1].name in text
    assert "Reconstruction error" in entry["outputs"]["6"]["text"][0]
    traj = Trajectory.load(files[-1])
    assert traj.latent_format == "SD15" and traj.steps == STEPS
    assert traj.latents.shape == (STEPS + 1, 1, 4, SIZE // 8, SIZE // 8)
    assert float(traj.sigmas[-1]) == 0.0 and torch.isfinite(traj.latents).all()
    print(f"\n[e2e] inversion reconstruction error {traj.meta['recon_error']:.3%}")
