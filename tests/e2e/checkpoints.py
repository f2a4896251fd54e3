"""Random-weight model files for the e2e tier, written at test time (docs/host.md).

* ``narrow SD1.5 checkpoint``: model_channels 320 with channel_mult (1,1,1,1) and everything else
  SD1.5, so the *unmodified* host detects it as SD15 (detection only checks context_dim,
  model_channels, use_linear_in_transformer, adm_in_channels, use_temporal_attention) while a
  step at 64x64 px costs a fraction of the full model. CLIP-L and the VAE are full size (607 MB
  fp16 in all). It is built from ComfyUI's own classes, so it needs ``comfy``: the build runs in
  a **subprocess** (``python checkpoints.py checkpoint OUT``) with the ComfyUI root on
  ``sys.path``, which keeps ``comfy`` out of the test process. The file is cached in
  ``.host/cache`` under a key that changes whenever this file changes.
* ``kohya LoRA`` and ``TI embedding``: plain safetensors files; only torch is needed.

Every weight is seeded, so the files (and hence the test images) are reproducible.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import time
from pathlib import Path

#: Bump to force a rebuild of cached checkpoints (the source hash below also does it).
VERSION = "narrow-sd15-v1"
SEED = 1234

NARROW_SD15_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 1, 1, 1],
    transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
)

#: The standard SD1.x VAE (what comfy.sd.VAE assumes for an ldm-format SD1 checkpoint).
SD_VAE_DDCONFIG = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}

#: Kohya LoRA targets. In the narrow model every UNet attention is 320 wide; attn2's k/v read
#: the 768-wide text context. ``lora_te_`` targets CLIP-L (768 wide).
LORA_UNET_BLOCKS = [
    "down_blocks_0_attentions_0", "down_blocks_1_attentions_1", "mid_block_attentions_0",
    "up_blocks_1_attentions_2", "up_blocks_2_attentions_0", "up_blocks_3_attentions_2",
]
LORA_UNET_LAYERS = {  # name -> (in_features, out_features)
    "attn1_to_q": (320, 320), "attn1_to_k": (320, 320), "attn1_to_v": (320, 320),
    "attn1_to_out_0": (320, 320), "attn2_to_k": (768, 320), "attn2_to_v": (768, 320),
}
LORA_TE_LAYERS = [f"text_model_encoder_layers_{i}_self_attn_{p}_proj" for i in (0, 5, 11) for p in "qv"]


def cache_key(comfy_root: Path) -> str:
    """VERSION plus a hash of everything that shapes the checkpoint file.

    That is the configs, the seed, the builder functions and the ComfyUI version whose
    classes build it; editing the LoRA/TI helpers does not invalidate the 607 MB file.
    """
    version_file = comfy_root / "comfyui_version.py"
    parts = [VERSION, repr(NARROW_SD15_UNET), repr(SD_VAE_DDCONFIG), str(SEED),
             inspect.getsource(_init_weights), inspect.getsource(_build_checkpoint),
             version_file.read_text() if version_file.is_file() else str(comfy_root)]
    digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:10]
    return f"{VERSION}-{digest}"


# --------------------------------------------------------------------------------------------
# In the test process (torch + safetensors only)
# --------------------------------------------------------------------------------------------


def narrow_sd15(dest: Path, comfy_root: Path, python: str, cache_dir: Path | None) -> Path:
    """Write (or link from the cache) the narrow SD1.5 checkpoint to ``dest``.

    The build needs ComfyUI's classes, so it runs in a subprocess of ``python`` with
    ``comfy_root`` on its path. With ``cache_dir`` the file is built once per cache key and
    hard- or sym-linked into ``dest``; older cached versions are removed.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if cache_dir is None:
        _build_in_subprocess(dest, comfy_root, python)
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{cache_key(comfy_root)}.safetensors"
    if not cached.is_file():
        tmp = cache_dir / f".{cached.name}.{os.getpid()}.tmp"
        try:
            _build_in_subprocess(tmp, comfy_root, python)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        for old in cache_dir.glob(f"{VERSION.split('-v')[0]}-*.safetensors"):
            if old != cached:
                old.unlink(missing_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(cached, dest)
    except OSError:
        dest.symlink_to(cached)
    return dest


def _build_in_subprocess(out: Path, comfy_root: Path, python: str) -> None:
    # One OpenMP thread: robust on a busy 2-core machine (see server_fixture.server_threads).
    threads = os.environ.get("DM_SERVER_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "checkpoint", str(out), str(comfy_root)],
        cwd=str(comfy_root), capture_output=True, text=True, timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS=threads),
    )
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"building the narrow SD1.5 checkpoint failed (rc {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    print(f"[e2e] built narrow SD1.5 checkpoint in {time.perf_counter() - t0:.1f} s -> {out}")


def kohya_lora(dest: Path, seed: int = SEED + 1, rank: int = 4) -> list[str]:
    """Write a kohya-named LoRA (UNet and text-encoder keys); return its module names.

    Unlike a freshly initialised training LoRA (``up`` = 0), both factors are random so the
    LoRA visibly changes the model, which is how the tests prove it was applied.
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    names: list[str] = []

    def add(name: str, fan_in: int, fan_out: int) -> None:
        down = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
        up = torch.randn(fan_out, rank, generator=gen) / rank**0.5
        tensors[f"{name}.lora_down.weight"] = down.half()
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.alpha"] = torch.tensor(float(rank)).half()
        names.append(name)

    for block in LORA_UNET_BLOCKS:
        for layer, (fan_in, fan_out) in LORA_UNET_LAYERS.items():
            add(f"lora_unet_{block}_transformer_blocks_0_{layer}", fan_in, fan_out)
    for layer in LORA_TE_LAYERS:
        add(f"lora_te_{layer}", 768, 768)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dest))
    return names


def ti_embedding(dest: Path, vectors: int = 2, seed: int = SEED + 2) -> None:
    """Write a textual-inversion embedding ``{"emb_params": randn(n, 768)}``."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": torch.randn(vectors, 768, generator=gen)}, str(dest))


# --------------------------------------------------------------------------------------------
# In the subprocess (ComfyUI importable)
# --------------------------------------------------------------------------------------------


def _init_weights(module, seed: int) -> None:
    """comfy's ops leave weights as ``torch.empty``: initialise every parameter, seeded.

    Norm layers get identity affine parameters; other matrices/kernels variance-preserving
    ``N(0, 1/fan_in)`` (so signals neither vanish nor explode through the random network and
    the output image depends visibly on the conditioning); biases small noise.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    norm_params: set[int] = set()
    for m in module.modules():
        if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            norm_params.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if id(p) in norm_params:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif p.ndim <= 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)


def _build_checkpoint(out: str) -> None:
    import torch
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.models.autoencoder
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils

    torch.manual_seed(SEED)
    cpu = torch.device("cpu")
    config = comfy.supported_models.SD15(dict(NARROW_SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    unet = config.get_model({}, "", device=cpu).diffusion_model
    clip = comfy.sd1_clip.SD1ClipModel(device=cpu, dtype=torch.float32)
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    for i, part in enumerate((unet, clip, vae)):
        _init_weights(part, SEED + 10 * i)

    sd: dict[str, torch.Tensor] = {}
    sd.update(config.process_unet_state_dict_for_saving(unet.state_dict()))
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    sd.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, out, metadata={"dreammatcher_test": VERSION})


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "checkpoint":
        raise SystemExit("usage: checkpoints.py checkpoint OUT COMFY_ROOT")
    sys.path.insert(0, sys.argv[3])
    _build_checkpoint(sys.argv[2])
