"""Random-weight model files for the e2e tier, written at test time (docs/host.md).

* ``narrow SD1.5 checkpoint``: model_channels 320 with channel_mult (1,1,1,1) and everything else
  SD1.5, so the *unmodified* host detects it as SD15 (detection only checks context_dim,
  model_channels, use_linear_in_transformer, adm_in_channels, use_temporal_attention) while a
  step at 64x64 px costs a fraction of the full model. CLIP-L and the VAE are full size (607 MB
  fp16 in all). It is built from ComfyUI's own classes, so it needs ``comfy``: the build runs in
  a **subprocess** (``python checkpoints.py checkpoint OUT``) with the ComfyUI root on
  ``sys.path``, which keeps ``comfy`` out of the test process. The file is cached in
  ``.host/cache`` under a key that changes whenever this file changes.
* ``narrow SDXL checkpoint``: the SDXL UNet with channel_mult (1,1,1) instead of (1,2,4), so
  every level is 320 wide, and SDXL's own attention depths (0/2/10 per level, 10 in the middle),
  because detection compares the per-block ``transformer_depth`` list with SDXL's exactly. Block
  ids and transformer indices are therefore those of a real SDXL. CLIP-L, OpenCLIP bigG and the
  VAE are full size (the host builds the text encoders from fixed configs): 2.4 GB in fp16.
  Built and cached like the SD1.5 file.
* ``detect``: what ComfyUI's own model detection makes of a checkpoint, run in a subprocess
  on the file's header only.
* ``kohya LoRA`` and ``TI embedding``: plain safetensors files; only torch is needed.

Every weight is seeded, so the files (and hence the test images) are reproducible.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

#: Bump to force a rebuild of cached checkpoints (the source hash below also does it).
VERSION = "narrow-sd15-v1"
SDXL_VERSION = "narrow-sdxl-v1"
SEED = 1234

NARROW_SD15_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    adm_in_channels=None, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], channel_mult=[1, 1, 1, 1],
    transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
    use_temporal_resblock=False, use_temporal_attention=False,
)

#: SDXL as ComfyUI detects it, except channel_mult (detection does not compare it). The input
#: depths must stay [0, 0, 2, 2, 10, 10]: ``supported_models.SDXL.unet_config`` lists them, and a
#: shallower list would match no model (or SSD-1B / Vega, which share SDXL's context and adm).
NARROW_SDXL_UNET = dict(
    use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False,
    num_classes="sequential", adm_in_channels=2816, in_channels=4, out_channels=4, model_channels=320,
    num_res_blocks=[2, 2, 2], transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], channel_mult=[1, 1, 1],
    transformer_depth_middle=10, use_linear_in_transformer=True, context_dim=2048,
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


def sdxl_cache_key(comfy_root: Path) -> str:
    """SDXL_VERSION plus a hash of everything that shapes the narrow SDXL file (as ``cache_key``)."""
    parts = [SDXL_VERSION, repr(NARROW_SDXL_UNET), repr(SD_VAE_DDCONFIG), str(SEED),
             inspect.getsource(_init_weights), inspect.getsource(_build_sdxl_checkpoint),
             _host_version(comfy_root)]
    digest = hashlib.sha1("\n".join(parts).encode()).hexdigest()[:10]
    return f"{SDXL_VERSION}-{digest}"


def _host_version(comfy_root: Path) -> str:
    version_file = comfy_root / "comfyui_version.py"
    return version_file.read_text() if version_file.is_file() else str(comfy_root)


# --------------------------------------------------------------------------------------------
# In the test process (torch + safetensors only)
# --------------------------------------------------------------------------------------------


def narrow_sd15(dest: Path, comfy_root: Path, python: str, cache_dir: Path | None) -> Path:
    """Write (or link from the cache) the narrow SD1.5 checkpoint to ``dest``.

    The build needs ComfyUI's classes, so it runs in a subprocess of ``python`` with
    ``comfy_root`` on its path. With ``cache_dir`` the file is built once per cache key and
    hard- or sym-linked into ``dest``; older cached versions are removed.
    """
    return _link_cached(dest, cache_key(comfy_root), "checkpoint", "narrow SD1.5 checkpoint",
                        comfy_root, python, cache_dir, keep=2, timeout=600)


def narrow_sdxl(dest: Path, comfy_root: Path, python: str, cache_dir: Path | None) -> Path:
    """Write (or link from the cache) the narrow SDXL checkpoint to ``dest``.

    Built like ``narrow_sd15``. The file is about 2 GB (the text encoders are full size), so
    the cache keeps the two most recently used builds instead of one: the key contains the
    ComfyUI version, and alternating between the two tested hosts must not rebuild each time.
    """
    return _link_cached(dest, sdxl_cache_key(comfy_root), "sdxl-checkpoint", "narrow SDXL checkpoint",
                        comfy_root, python, cache_dir, keep=2, timeout=1800)


def _link_cached(dest: Path, key: str, kind: str, label: str, comfy_root: Path, python: str,
                 cache_dir: Path | None, *, keep: int, timeout: float) -> Path:
    """Build ``<cache_dir>/<key>.safetensors`` once, then link it to ``dest``.

    Files of the same family (the key without version and digest) are pruned after a build, keeping
    the ``keep`` most recently used ones; a use refreshes the file's mtime. Without a cache
    the file is built straight into ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if cache_dir is None:
        _build_in_subprocess(dest, kind, label, comfy_root, python, timeout)
        return dest
    cache_dir.mkdir(parents=True, exist_ok=True)
    cached = cache_dir / f"{key}.safetensors"
    if cached.is_file():
        os.utime(cached)
    else:
        tmp = cache_dir / f".{cached.name}.{os.getpid()}.tmp"
        try:
            _build_in_subprocess(tmp, kind, label, comfy_root, python, timeout)
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        family = key.split("-v")[0]  # "narrow-sdxl-v1-<digest>" -> "narrow-sdxl": every version
        others = [p for p in cache_dir.glob(f"{family}-*.safetensors") if p != cached]
        others.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        for old in others[keep - 1:]:
            old.unlink(missing_ok=True)
    if dest.exists() or dest.is_symlink():
        dest.unlink()
    try:
        os.link(cached, dest)
    except OSError:
        dest.symlink_to(cached)
    return dest


def _build_in_subprocess(out: Path, kind: str, label: str, comfy_root: Path, python: str,
                         timeout: float) -> None:
    # One OpenMP thread: robust on a busy 2-core machine (see server_fixture.server_threads).
    threads = os.environ.get("DM_SERVER_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"
    t0 = time.perf_counter()
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), kind, str(out), str(comfy_root)],
        cwd=str(comfy_root), capture_output=True, text=True, timeout=timeout,
        env=dict(os.environ, OMP_NUM_THREADS=threads),
    )
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(
            f"building the {label} failed (rc {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    peak = _marked_json(proc.stdout, _PEAK_MARK).get("peak_rss_mb", float("nan"))
    print(f"[e2e] built {label} in {time.perf_counter() - t0:.1f} s "
          f"({out.stat().st_size / 1e9:.2f} GB, builder peak RSS {peak / 1024:.1f} GiB) -> {out}")


_PEAK_MARK = "DM_BUILD "
_DETECT_MARK = "DM_DETECT "


def _marked_json(stdout: str, mark: str) -> dict:
    """The JSON object on the last stdout line starting with ``mark`` (ComfyUI may print too)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(mark):
            return json.loads(line[len(mark):])
    return {}


def safetensors_header(path: Path) -> dict[str, dict]:
    """The JSON header of a safetensors file: ``{name: {dtype, shape, data_offsets}}``.

    Read with the standard library (a little-endian u64 length, then JSON), so a 2 GB file
    can be inspected without loading it. ``__metadata__`` is dropped.
    """
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def detect(path: Path, comfy_root: Path, python: str) -> dict:
    """How the host itself classifies the checkpoint at ``path``.

    Runs ComfyUI's ``model_detection`` in a subprocess on meta tensors shaped from the file's
    header, so it costs an import, not a load. Returns ``config`` (the supported_models
    class), ``latent_format``, ``model_type``, ``clip`` (the text-encoder class) and
    ``unet_config`` (the JSON-able part), or ``{"config": None}`` when nothing matched. The
    server log cannot tell these apart: SSD-1B or Vega would also load as ``SDXL``.
    """
    proc = subprocess.run(
        [python, str(Path(__file__).resolve()), "detect", str(path), str(comfy_root)],
        cwd=str(comfy_root), capture_output=True, text=True, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    found = _marked_json(proc.stdout, _DETECT_MARK)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"detection failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                           f"{proc.stderr[-6000:]}")
    return found


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


def _build_sdxl_checkpoint(out: str) -> None:
    """Build the narrow SDXL file one component at a time.

    The UNet and the text encoders are created directly in fp16 (in fp32 they alone would
    take 4.4 GB), each is converted to the checkpoint layout by the host's own
    ``process_*_for_saving`` and dropped before the next is built, so the peak stays near the
    file size (3.3 GiB resident for the 2.4 GB file, measured). The text encoders go through
    the converter a saved SDXL checkpoint goes through (CLIP-L under
    ``conditioner.embedders.0``, bigG in OpenCLIP layout under
    ``conditioner.embedders.1.model``), which the loader's ``process_clip_state_dict``
    reverses; every weight is initialised, so nothing is left as ``torch.empty``.
    """
    import gc

    import torch
    from comfy.cli_args import args

    args.cpu = True
    import comfy.ldm.models.autoencoder
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils

    torch.manual_seed(SEED)
    cpu, half = torch.device("cpu"), torch.float16
    config = comfy.supported_models.SDXL(dict(NARROW_SDXL_UNET))
    config.set_inference_dtype(half, None)
    sd: dict[str, torch.Tensor] = {}

    unet = config.get_model({}, "", device=cpu).diffusion_model
    _init_weights(unet, SEED)
    sd.update(config.process_unet_state_dict_for_saving(unet.state_dict()))
    del unet
    gc.collect()

    clip = comfy.sdxl_clip.SDXLClipModel(device=cpu, dtype=half)
    _init_weights(clip, SEED + 10)
    sd.update(config.process_clip_state_dict_for_saving(clip.state_dict()))
    del clip
    gc.collect()

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _init_weights(vae, SEED + 20)
    sd.update({f"first_stage_model.{k}": v.half() for k, v in vae.state_dict().items()})
    del vae
    gc.collect()

    sd = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, out, metadata={"dreammatcher_test": SDXL_VERSION})


def _detect(path: str) -> None:
    """Print (marked) what ``comfy.model_detection`` makes of the file's keys and shapes."""
    import torch
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_detection

    dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "I64": torch.int64}
    sd = {k: torch.empty(v["shape"], dtype=dtypes.get(v["dtype"], torch.float32), device="meta")
          for k, v in safetensors_header(Path(path)).items()}
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    config = comfy.model_detection.model_config_from_unet(sd, prefix)
    found: dict = {"config": None}
    if config is not None:
        target = config.clip_target(state_dict=sd)
        found = {
            "config": type(config).__name__,
            "latent_format": type(config.latent_format).__name__,
            "model_type": config.model_type(sd, prefix).name,
            "clip": None if target is None else target.clip.__name__,
            "unet_config": {k: v for k, v in config.unet_config.items()
                            if isinstance(v, (bool, int, float, str, list, type(None)))},
        }
    print(_DETECT_MARK + json.dumps(found), flush=True)


_BUILDERS = {"checkpoint": _build_checkpoint, "sdxl-checkpoint": _build_sdxl_checkpoint, "detect": _detect}

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in _BUILDERS:
        raise SystemExit(f"usage: checkpoints.py {{{'|'.join(_BUILDERS)}}} PATH COMFY_ROOT")
    sys.path.insert(0, sys.argv[3])
    _BUILDERS[sys.argv[1]](sys.argv[2])
    if sys.argv[1] != "detect":
        import resource

        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        print(_PEAK_MARK + json.dumps({"peak_rss_mb": round(peak_mb, 1)}), flush=True)
