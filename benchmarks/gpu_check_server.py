"""GPU check through the real ComfyUI server: parity and exact guidance under each memory mode.

``benchmarks/gpu_check.py`` boots ComfyUI inside its own process, which never switches on the
newer hosts' dynamic VRAM (``main.py`` initialises it at start-up, on NVIDIA, by default). This
script starts the unmodified server instead, once per memory mode (the default, i.e. dynamic VRAM
where the host has it, and ``--disable-dynamic-vram``), on the random narrow SD1.5 checkpoint the
e2e tier uses, and per mode checks:

- ``DM_AMAPatch`` at strength 0 + stock KSampler gives latents ``torch.equal`` to stock KSampler;
- ``DM_MatchingGuidanceSampler`` at guidance scale 0 (``exact``) equals stock KSampler ddim;
- ``exact`` guidance at scale 50 (with the AMA patch) runs and changes the result; ``fast`` too;
- each prompt's wall time; the server log's memory-mode lines are kept in the JSON.

Writes ``<out>/gpu_check_server.json`` (and the server logs). ``--cpu`` runs the same path on the
CPU (no dynamic VRAM there), which is how it is proven on machines without a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import checkpoints  # noqa: E402
from comfy_env import comfy_root  # noqa: E402
from images import write_reference_png  # noqa: E402
from server_fixture import ComfyServer  # noqa: E402

CKPT = "dm_narrow_sd15.safetensors"
MODES = {"default": (), "no-dynamic-vram": ("--disable-dynamic-vram",)}


def graph(kind: str, *, size: int, steps: int, prefix: str) -> dict:
    """``kind``: stock | ama0 | mg0-exact | mg50-exact | mg50-fast; ends in SaveLatent."""
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CKPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a dog on a beach"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a dog"}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "10": {"class_type": "LoadImage", "inputs": {"image": "dm_gpu_reference.png"}},
        "11": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["1", 0], "reference": ["11", 0], "reference_positive": ["5", 0], "steps": steps,
            "scheduler": "ddim_uniform", "cfg": 1.0}},
        "14": {"class_type": "DM_AMAPatch", "inputs": {
            "model": ["1", 0], "reference": ["12", 0], "strength": 0.0 if kind == "ama0" else 1.0,
            "start_percent": 0.0, "end_percent": 1.0, "layer_preset": "paper (decoder 32²+64²)",
            "custom_layers": ""}},
        "17": {"class_type": "SaveLatent", "inputs": {"samples": ["15", 0], "filename_prefix": prefix}},
    }
    common = {"positive": ["3", 0], "negative": ["4", 0], "latent_image": ["6", 0], "seed": 42,
              "steps": steps, "cfg": 7.5, "scheduler": "ddim_uniform", "denoise": 1.0}
    if kind in ("stock", "ama0"):
        model = ["1", 0] if kind == "stock" else ["14", 0]
        g["15"] = {"class_type": "KSampler", "inputs": {"model": model, "sampler_name": "ddim", **common}}
        if kind == "stock":
            for k in ("5", "10", "11", "12", "14"):
                del g[k]
        return g
    scale, mode = (0.0, "exact") if kind == "mg0-exact" else (50.0, kind.split("-")[1])
    g["15"] = {"class_type": "DM_MatchingGuidanceSampler", "inputs": {
        "model": ["1", 0] if scale == 0.0 else ["14", 0], "reference": ["12", 0], **common,
        "guidance_scale": scale, "guidance_start": 0.0, "guidance_end": 1.0, "mode": mode}}
    if scale == 0.0:
        del g["14"]
    return g


def load_latent(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))["latent_tensor"]


def check_mode(name: str, flags: tuple[str, ...], *, cpu: bool, size: int, steps: int, work: Path,
               cache: Path) -> dict:
    import torch

    base = work / name
    server = ComfyServer(comfy_root(), base, cpu=cpu, extra_args=flags)
    server.prepare()
    checkpoints.narrow_sd15(server.models_dir / "checkpoints" / CKPT, server.comfy_root, server.python, cache)
    write_reference_png(server.base / "input" / "dm_gpu_reference.png", size, box=(size // 4, 3 * size // 4,
                                                                                   size // 4, 3 * size // 4))
    rec: dict = {"flags": list(flags), "prompts": {}}
    try:
        server.start()
        server.check_pack_loaded()
        rec["startup_s"] = round(server.startup_s, 1)
        words = ("DynamicVRAM", "dynamic", "aimdo", "VRAM", "Device:")
        rec["memory_log"] = [ln.strip() for ln in server.startup_log.splitlines()
                             if any(w in ln for w in words)][:12]
        latents = {}
        for kind in ("stock", "ama0", "mg0-exact", "mg50-exact", "mg50-fast"):
            t = time.perf_counter()
            try:
                g = graph(kind, size=size, steps=steps, prefix=f"gpu_{name}_{kind}")
                entry = server.run(g, timeout=900)
                files = [server.output_dir / f["subfolder"] / f["filename"]
                         for out in entry["outputs"].values() for f in out.get("latents", [])]
                latents[kind] = load_latent(files[0]) if files else None
                rec["prompts"][kind] = {"status": "ok", "s": round(time.perf_counter() - t, 2)}
            except Exception as exc:  # noqa: BLE001 - every failure is a finding of the check
                rec["prompts"][kind] = {"status": "error", "error": str(exc)[-2000:]}
            print(f"[{name}] {kind}: {rec['prompts'][kind]}", flush=True)

        def eq(a: str, b: str):
            x, y = latents.get(a), latents.get(b)
            return None if x is None or y is None else bool(torch.equal(x, y))

        rec["ama0_equals_stock"] = eq("ama0", "stock")
        rec["mg0_exact_equals_stock"] = eq("mg0-exact", "stock")
        for kind in ("mg50-exact", "mg50-fast"):
            same = eq(kind, "stock")
            rec[f"{kind.replace('-', '_')}_changes_output"] = None if same is None else not same
        rec["ok"] = bool(rec["ama0_equals_stock"] and rec["mg0_exact_equals_stock"]
                         and rec["mg50_exact_changes_output"] and rec["mg50_fast_changes_output"])
    finally:
        server.stop()
        shutil.copy(server.log_path, work / f"server_{name}.log")
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="gpu-out")
    ap.add_argument("--cpu", action="store_true", help="run the server on the CPU (smoke test of the path)")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="dm-gpu-server-"))
    cache = REPO / ".host" / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    report = {"comfyui": str(comfy_root()), "cpu": a.cpu, "size": a.size, "steps": a.steps, "modes": {}}
    for name in a.modes.split(","):
        report["modes"][name] = check_mode(name, MODES[name], cpu=a.cpu, size=a.size, steps=a.steps,
                                           work=work, cache=cache)
        (out / "gpu_check_server.json").write_text(json.dumps(report, indent=2))
        shutil.copy(work / f"server_{name}.log", out / f"server_{name}.log")
    ok = all(m.get("ok") for m in report["modes"].values())
    print(f"[gpu_check_server] all modes ok: {ok}; {out / 'gpu_check_server.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
