"""Source of truth for the example workflows (API format).

``scripts/make_examples.py`` turns each graph into the UI-format file in ``example_workflows/``
through the real frontend (``app.loadApiJson`` then ``graph.serialize``) and writes the API twin
to ``example_workflows/api/``; the e2e tier runs the API twins on a random checkpoint.
"""

from __future__ import annotations

CKPT = "v1-5-pruned-emaonly.safetensors"
REF_PROMPT = "a photo of sks dog"
TARGET_PROMPT = "a photo of sks dog swimming in a pool"
SUBJECT = "sks dog"


def _common(steps: int = 50, size: int = 512) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "2": {"class_type": "LoadImage", "inputs": {"image": "example.png"}},
        "3": {"class_type": "ImageScale", "inputs": {
            "image": ["2", 0], "upscale_method": "bilinear", "width": size, "height": size,
            "crop": "center"}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["3", 0], "vae": ["1", 2]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": REF_PROMPT, "clip": ["1", 1]}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "7": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["1", 0], "reference": ["4", 0], "reference_positive": ["5", 0], "steps": steps,
            "scheduler": "ddim_uniform", "cfg": 1.0, "inversion_conditioning": ["6", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": TARGET_PROMPT, "clip": ["1", 1]}},
        "9": {"class_type": "DM_SemanticMatch", "inputs": {
            "lambda_c": 0.4, "mask_mode": "soft", "subject": SUBJECT, "clip": ["1", 1],
            "target_prompt": TARGET_PROMPT}},
        "10": {"class_type": "DM_AMAPatch", "inputs": {
            "model": ["1", 0], "reference": ["7", 0], "strength": 1.0, "start_percent": 0.08,
            "end_percent": 1.0, "layer_preset": "paper (decoder 32²+64²)", "custom_layers": "",
            "match": ["9", 0]}},
        "11": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
    }


def ama(steps: int = 50, size: int = 512) -> dict:
    """AMA patch + stock KSampler (paper Table 5 row IV)."""
    g = _common(steps, size)
    g["12"] = {"class_type": "KSampler", "inputs": {
        "model": ["10", 0], "seed": 42, "steps": steps, "cfg": 7.5, "sampler_name": "ddim",
        "scheduler": "ddim_uniform", "positive": ["8", 0], "negative": ["6", 0], "latent_image": ["11", 0],
        "denoise": 1.0}}
    g["14"] = {"class_type": "SaveImage",
               "inputs": {"images": ["13", 0], "filename_prefix": "dreammatcher/ama"}}
    # what AMA did per step (coverage, mask area, gate > 0.5), between the sampler and the decoder
    g["15"] = {"class_type": "DM_AMADiagnostics", "inputs": {"model": ["10", 0], "latent": ["12", 0]}}
    g["13"]["inputs"]["samples"] = ["15", 0]
    return g


def full(steps: int = 50, size: int = 512) -> dict:
    """AMA patch + Matching Guidance Sampler (the paper's full method, Table 5 row V)."""
    g = _common(steps, size)
    g["12"] = {"class_type": "DM_MatchingGuidanceSampler", "inputs": {
        "model": ["10", 0], "reference": ["7", 0], "seed": 42, "steps": steps, "cfg": 7.5,
        "scheduler": "ddim_uniform", "positive": ["8", 0], "negative": ["6", 0], "latent_image": ["11", 0],
        "denoise": 1.0, "guidance_scale": 50.0, "guidance_start": 0.08, "guidance_end": 1.0, "mode": "fast",
        "match": ["9", 0]}}
    g["14"] = {"class_type": "SaveImage",
               "inputs": {"images": ["13", 0], "filename_prefix": "dreammatcher/full"}}
    return g


EXAMPLES = {
    "dreammatcher_ama_ksampler": ama,
    "dreammatcher_full_matching_guidance": full,
}
