"""``make run``: DreamMatcher's full method on your checkpoint and reference, headless.

    make run CKPT=/path/model.safetensors REF=/path/photo.png PROMPT="a photo of sks dog on a beach" \\
             SUBJECT="sks dog" [LORA=/path/lora.safetensors[:0.8]] [EMBEDDINGS=/path/dir_or_file]
             [STEPS=50] [SEED=42] [BATCH=1]

Starts the embedded ComfyUI (or ``$COMFYUI_PATH``) with this pack on a free loopback port, in a
fresh base directory whose model folders link to your files, queues one graph (the reference's
DDIM inversion, AMA Model Patch + Matching Guidance Sampler, the same seed on the plain model as
the baseline, and both inspectors), shows the sampler's progress, and writes into a folder it
prints: the DreamMatcher image(s), the baseline(s), ``comparison.png`` (reference | baseline |
DreamMatcher, one row per image), the inspector images and ``report.txt`` (AMA's per-step
figures). Without ``CKPT`` it runs the narrow random-weight SD1.5 checkpoint of the e2e tier:
its images are noise, and say only that the pipeline runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "scripts"))

import example_graphs as eg  # noqa: E402
from comfy_env import comfy_root  # noqa: E402
from server_fixture import ComfyServer, ServerError  # noqa: E402

SMOKE_STEPS, SMOKE_SIZE = 10, 128
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MODEL_SUFFIXES = {".safetensors", ".ckpt", ".pt", ".pth", ".bin"}


class UsageError(ValueError):
    """Bad input to ``make run``: reported as one message, before anything starts."""


def _int(text: str, name: str, default: int, low: int) -> int:
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        raise UsageError(f"{name}={text!r} is not a whole number.") from None
    if value < low:
        raise UsageError(f"{name} must be at least {low}; got {value}.")
    return value


def _file(text: str, name: str, suffixes: set[str]) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise UsageError(f"{name}={text!r}: no such file.")
    if path.suffix.lower() not in suffixes:
        raise UsageError(f"{name}={text!r}: expected one of {sorted(suffixes)}.")
    return path.resolve()


def _embeddings(text: str) -> list[Path]:
    """TI embedding files: one file, or every model file of a folder (used as ``embedding:<name>``)."""
    path = Path(text).expanduser()
    if path.is_dir():
        files = sorted(f.resolve() for f in path.iterdir()
                       if f.is_file() and f.suffix.lower() in MODEL_SUFFIXES)
        if not files:
            raise UsageError(f"EMBEDDINGS={text!r}: the folder holds no {sorted(MODEL_SUFFIXES)} file.")
        return files
    return [_file(text, "EMBEDDINGS", MODEL_SUFFIXES)]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("ckpt", "ref", "prompt", "subject", "ref-prompt", "lora", "embeddings", "steps", "seed",
                 "batch", "size", "out"):
        ap.add_argument(f"--{flag}", default="")
    a = ap.parse_args(argv)
    a.smoke = not a.ckpt
    a.ckpt = _file(a.ckpt, "CKPT", MODEL_SUFFIXES) if a.ckpt else None
    a.ref = _file(a.ref, "REF", IMAGE_SUFFIXES) if a.ref else None
    a.lora_strength = 1.0
    if a.lora:
        path, strength = a.lora, ""
        head, sep, tail = a.lora.rpartition(":")
        if sep and tail.replace(".", "", 1).isdigit():  # LORA=file.safetensors:0.8
            path, strength = head, tail
        a.lora_strength = float(strength) if strength else 1.0
        a.lora = _file(path, "LORA", MODEL_SUFFIXES)
    a.embeddings = _embeddings(a.embeddings) if a.embeddings else []
    a.prompt = a.prompt.strip() or eg.TARGET_PROMPT
    a.subject = a.subject.strip() or eg.SUBJECT
    if a.subject.lower() not in a.prompt.lower():
        raise UsageError(f"SUBJECT={a.subject!r} must appear in PROMPT={a.prompt!r}: its cross-attention "
                         "in the target prompt is the subject mask.")
    a.ref_prompt = a.ref_prompt.strip() or f"a photo of {a.subject}"
    a.steps = _int(a.steps, "STEPS", SMOKE_STEPS if a.smoke else 50, 2)
    a.seed = _int(a.seed, "SEED", eg.SEED, 0)
    a.batch = _int(a.batch, "BATCH", 1, 1)
    a.size = _int(a.size, "SIZE", SMOKE_SIZE if a.smoke else 512, 64)
    if a.size % 64:
        raise UsageError(f"SIZE must be a multiple of 64; got {a.size}.")
    return a


def _has_cuda(python: str) -> bool:
    code = "import torch; print(torch.cuda.is_available())"
    try:
        return subprocess.run([python, "-c", code], capture_output=True, text=True,
                              timeout=120).stdout.strip() == "True"
    except (OSError, subprocess.SubprocessError):
        return False


def _link(src: Path, folder: Path) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / src.name
    if not dest.exists():
        dest.symlink_to(src)
    return src.name


async def _follow(server: ComfyServer, graph: dict) -> str:
    """Queue ``graph`` and print its progress from the server's websocket until it finishes."""
    import aiohttp

    ws_url = server.url.replace("http", "ws", 1) + f"/ws?clientId={server.client_id}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, heartbeat=30) as ws:
        prompt_id = server.post_prompt(graph)
        node, t0 = "", time.perf_counter()
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue  # binary: latent previews
            event = json.loads(msg.data)
            kind, data = event.get("type"), event.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "executing" and data.get("node"):
                node = graph.get(str(data["node"]), {}).get("class_type", str(data["node"]))
            elif kind == "progress":
                done, total = int(data["value"]), int(data["max"])
                bar = "#" * (30 * done // max(total, 1))
                print(f"\r  {node:<28} [{bar:<30}] {done}/{total}  {time.perf_counter() - t0:6.1f} s",
                      end="", flush=True)
                if done == total:
                    print()
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                break
            elif kind == "executing" and data.get("node") is None:
                break
    return prompt_id


def _compose(out: Path, reference: Path, rows: list[tuple[Path, Path]]) -> Path:
    """reference | baseline | DreamMatcher, one row per generated image, with a label strip."""
    from PIL import Image, ImageDraw

    ims = [[Image.open(p).convert("RGB") for p in (reference, base, dm)] for base, dm in rows]
    w, h = ims[0][2].size
    label = 18
    sheet = Image.new("RGB", (3 * w, label + h * len(ims)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, text in enumerate(("reference", "baseline", "DreamMatcher")):
        draw.text((col * w + 4, 3), text, fill="black")
    for r, row in enumerate(ims):
        for col, im in enumerate(row):
            sheet.paste(im.resize((w, h)), (col * w, label + r * h))
    dest = out / "comparison.png"
    sheet.save(dest)
    return dest


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse(argv)
    except UsageError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 2
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(a.out).resolve() if a.out else REPO / ".host" / "run-output" / stamp
    out.mkdir(parents=True, exist_ok=True)
    root = comfy_root()
    with tempfile.TemporaryDirectory(prefix="dm-run-") as tmp:
        server = ComfyServer(root, Path(tmp), cpu=not _has_cuda(sys.executable))
        server.prepare()
        models = server.models_dir
        if a.smoke:
            import checkpoints

            cache = REPO / ".host" / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            ckpt = "dm_narrow_sd15.safetensors"
            print("[run] no CKPT: building/using the narrow random-weight SD1.5 checkpoint (cached)")
            checkpoints.narrow_sd15(models / "checkpoints" / ckpt, root, server.python, cache)
        else:
            ckpt = _link(a.ckpt, models / "checkpoints")
        lora = _link(a.lora, models / "loras") if a.lora else None
        embeddings = [_link(f, models / "embeddings") for f in a.embeddings]
        ref = a.ref or root / "input" / eg.REF_IMAGE
        shutil.copy(ref, server.base / "input" / eg.REF_IMAGE)
        graph = eg.run_graph(ckpt=ckpt, steps=a.steps, size=a.size, prompt=a.prompt, subject=a.subject,
                             ref_prompt=a.ref_prompt, seed=a.seed, batch=a.batch, lora=lora,
                             lora_strength=a.lora_strength)
        print(f"[run] ComfyUI {root} ({'GPU' if not server.cpu else 'CPU'}); checkpoint {ckpt}"
              + (f", LoRA {lora} @ {a.lora_strength}" if lora else "")
              + (f", embeddings {', '.join(embeddings)}" if embeddings else "")
              + f"; {a.steps} steps at {a.size}², seed {a.seed}, batch {a.batch}")
        print(f"[run] reference {ref}; prompt {a.prompt!r}; subject {a.subject!r}")
        t0 = time.perf_counter()
        server.start()
        try:
            server.check_pack_loaded()
            print(f"[run] server up in {server.startup_s:.1f} s; queueing the graph")
            prompt_id = asyncio.run(_follow(server, graph))
            entry = server.wait_for(prompt_id, timeout=6 * 3600)
        except ServerError as exc:
            print(f"\n[run] failed: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop()
        saved: dict[str, list[Path]] = {}
        for node, role in eg.RUN_SAVES.items():
            for i, img in enumerate(entry["outputs"].get(node, {}).get("images", [])):
                src = server.output_dir / img.get("subfolder", "") / img["filename"]
                dest = out / f"{role}_{i + 1}.png"
                shutil.copy(src, dest)
                saved.setdefault(role, []).append(dest)
        shutil.copy(ref, out / f"reference{ref.suffix.lower()}")
        report = "\n".join(entry["outputs"].get("15", {}).get("text", []))
        (out / "report.txt").write_text(report + "\n", encoding="utf-8")
        comparison = _compose(out, ref, list(zip(saved["baseline"], saved["dreammatcher"], strict=True)))
    print(f"[run] done in {time.perf_counter() - t0:.1f} s. Images in {out}:")
    for role, paths in saved.items():
        print(f"  {role}: {', '.join(p.name for p in paths)}")
    print(f"  comparison: {comparison.name} (reference | baseline | DreamMatcher)\n  report: report.txt")
    if report:
        print("[run] AMA per step:\n" + report)
    if a.smoke:
        print("[run] NOTE: these images come from RANDOM weights (no CKPT given). They are noise and say "
              "nothing about quality; they show that inversion, AMA, guidance, the baseline and the "
              "inspectors ran end to end. Pass CKPT=<your SD1.5 checkpoint> REF=<a photo of your subject> "
              "for real images.")
    else:
        print("[run] The DreamMatcher image should keep the baseline's layout and take the reference's "
              "appearance; the inspectors show where the subject was matched (composite, flow) and what "
              "the features see. Weak effect: see README 'Troubleshooting'.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
