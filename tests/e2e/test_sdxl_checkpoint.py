"""e2e: the random narrow SDXL checkpoint is an SDXL checkpoint to the unmodified host.

The SDXL tests can only be trusted if the host treats the test file as it treats a real SDXL:
the same supported-models class (hence latent format and text encoders), every weight loaded
from the file, and a stock graph that samples and decodes. Two layers of evidence:

- ComfyUI's own ``model_detection``, run on the file's header (``checkpoints.detect``), names the
  class and the latent format. The server log cannot: SSD-1B and Segmind Vega share SDXL's
  context and adm widths and also load as ``SDXL``, which the negative control shows;
- a stock graph on the real server (CheckpointLoaderSimple, CLIPTextEncode x2, EmptyLatentImage
  256x256, KSampler 4 euler steps, VAEDecode, SaveImage, plus SaveLatent) completes, its log has
  the load lines and no missing-key warning, and the sampled latent is finite and varied.

What a real SDXL checkpoint cannot carry either: CLIP-L's ``text_projection`` and
``logit_scale`` (the SDXL layout has no key that maps to them; the host reports them missing at
debug level only, and SDXL uses bigG's pooled output, never CLIP-L's projection).
"""

from __future__ import annotations

import json
import re
import struct
import time
from pathlib import Path

import checkpoints
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

STEPS = 4
SIZE = 256  # pixels -> 32x32 latent
SDXL_UNET = "model.diffusion_model."
#: Log lines the host writes (at warning level or above) when a checkpoint is incomplete or
#: was not recognised as a checkpoint.
LOAD_PROBLEMS = ("unet missing", "unet unexpected", "clip missing", "Missing VAE keys",
                 "This is not a checkpoint file", "no CLIP/text encoder weights", "no match {")


def sdxl_graph(ckpt: str, *, seed: int, prefix: str) -> dict:
    """The stock SDXL text-to-image graph at 256x256, also saving the sampled latent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a sks dog"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": STEPS, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
        "8": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0],
                                                     "filename_prefix": f"latents/{prefix}"}},
    }


def _drop_caches(server) -> None:
    """Make the next prompt load the checkpoint again, so its load lines land in the log.

    An earlier test may have loaded the same file (the loader's output is cached by its
    inputs). ``/free`` flags are applied by the worker after the prompt it is running, so a
    trivial prompt is run after posting them.
    """
    server.post_json("/free", {"unload_models": True, "free_memory": True})
    server.run({"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1,
                                                            "color": 0}},
                "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}}})


def _cached_nodes(entry: dict) -> list[str]:
    return sum((m[1].get("nodes", []) for m in entry["status"]["messages"] if m[0] == "execution_cached"), [])


def _saved_latents(server, entry: dict) -> list[Path]:
    return [server.output_dir / f.get("subfolder", "") / f["filename"]
            for out in entry.get("outputs", {}).values() for f in out.get("latents", [])]


def _peak_rss_gib(server) -> float:
    """The server's peak resident memory so far (Linux ``VmHWM``; NaN elsewhere), for the report."""
    try:
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
    except OSError:
        return float("nan")
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) / 2**20 if found else float("nan")


def _write_header_only(path: Path, header: dict[str, dict]) -> None:
    """A safetensors header without data: all that ``checkpoints.detect`` reads."""
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_host_detects_the_narrow_checkpoint_as_sdxl(comfy_server, e2e_sdxl, tmp_path):
    """ComfyUI's detection picks the SDXL class (latent format SDXL, EPS, SDXL text encoders).

    Also pins what makes the file narrow (every level 320 wide) and what keeps it SDXL (the
    attention depths, context and adm widths), that it carries all three components in fp16,
    and, as a negative control, that the same file with SSD-1B's depths is *not* SDXL to the
    host even though it would load as the same model class.
    """
    server = comfy_server
    path = server.models_dir / "checkpoints" / e2e_sdxl
    header = checkpoints.safetensors_header(path)
    found = checkpoints.detect(path, server.comfy_root, server.python)
    print(f"\n[e2e] {e2e_sdxl}: {path.stat().st_size / 1e9:.2f} GB, {len(header)} tensors; detected "
          f"{found['config']} / {found['latent_format']} / {found['model_type']} / {found['clip']}")
    assert (found["config"], found["latent_format"], found["model_type"], found["clip"]) == (
        "SDXL", "SDXL", "EPS", "SDXLClipModel"), found
    unet = found["unet_config"]
    assert unet["channel_mult"] == [1, 1, 1] and unet["model_channels"] == 320, unet
    assert unet["transformer_depth"] == [0, 0, 2, 2, 10, 10] and unet["transformer_depth_middle"] == 10
    assert (unet["context_dim"], unet["adm_in_channels"], unet["use_linear_in_transformer"]) == (
        2048, 2816, True), unet

    for prefix in (SDXL_UNET, "conditioner.embedders.0.transformer.text_model.",
                   "conditioner.embedders.1.model.", "first_stage_model."):
        assert any(k.startswith(prefix) for k in header), f"no {prefix}* tensors"
    bigg = "conditioner.embedders.1.model.transformer.resblocks."
    bigg_blocks = {k[len(bigg):].split(".")[0] for k in header if k.startswith(bigg)}
    assert len(bigg_blocks) == 32, "OpenCLIP bigG must be full depth (the host builds it from a fixed config)"
    dtypes = {v["dtype"] for k, v in header.items() if not k.endswith("position_ids")}
    assert dtypes == {"F16"}, dtypes

    shallow = re.compile(re.escape(SDXL_UNET) + r"input_blocks\.[78]\.1\.transformer_blocks\.[4-9]\.")
    ssd1b = tmp_path / "ssd1b_depths.safetensors"
    _write_header_only(ssd1b, {k: v for k, v in header.items() if not shallow.match(k)})
    other = checkpoints.detect(ssd1b, server.comfy_root, server.python)
    assert other["config"] == "SSD1B", other


def test_stock_sdxl_graph_on_the_real_server(comfy_server, e2e_sdxl):
    """The stock SDXL graph loads every weight, samples 4 steps at 256x256 and decodes.

    The log segment of this prompt must show the load (``model_type EPS``, the SDXL model
    and its text encoders being loaded) and none of the host's missing-key warnings. A NaN
    in any weight or in the conditioning would reach the sampled latent, so the latent
    (saved by SaveLatent, unclamped, unlike the PNG) must be finite and varied; the PNG must
    not be flat. The models are released afterwards: they hold about 6 GB in the server.
    """
    server = comfy_server
    _drop_caches(server)
    start = len(server.log_text())
    try:
        t0 = time.perf_counter()
        entry = server.run(sdxl_graph(e2e_sdxl, seed=20240611, prefix="dm_e2e_sdxl"), timeout=900)
        run_s, peak_gib = time.perf_counter() - t0, _peak_rss_gib(server)
        log = server.log_text()[start:]
        assert "1" not in _cached_nodes(entry), "the checkpoint loader did not run"
        assert "model_type EPS" in log, log[-3000:]
        for model_class in ("SDXL", "SDXLClipModel"):
            assert re.search(rf"Requested to load {model_class}\s*$", log, re.M), log[-3000:]
        problems = [ln for ln in log.splitlines() if any(p in ln for p in LOAD_PROBLEMS)]
        assert not problems, "\n".join(ln[:500] for ln in problems)

        images = server.output_images(entry)
        assert len(images) == 1 and images[0].suffix == ".png", entry.get("outputs")
        with Image.open(images[0]) as im:
            assert im.size == (SIZE, SIZE)
            img = np.asarray(im.convert("RGB"), dtype=np.int16)
        latents = _saved_latents(server, entry)
        assert len(latents) == 1, entry.get("outputs")
        latent = load_file(str(latents[0]))["latent_tensor"]
    finally:
        server.post_json("/free", {"unload_models": True, "free_memory": True})

    steps = re.findall(r"(\d+\.\d+)s/it", log)
    print(f"\n[e2e] SDXL stock graph in {run_s:.1f} s (last {steps[-1] if steps else '?'} s/step; "
          f"server peak RSS {peak_gib:.1f} GiB): latent std {float(latent.std()):.1f}, "
          f"image std {img.std():.1f}")
    assert tuple(latent.shape) == (1, 4, SIZE // 8, SIZE // 8)
    assert bool(torch.isfinite(latent).all()), "the sampled latent has NaN/inf"
    assert float(latent.std()) > 0.0
    assert img.std() > 2.0, f"degenerate image (std {img.std():.2f})"
