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
figures).

Without ``CKPT`` it runs the miniature world instead (``run_miniworld.py``): the shipped model of
``scripts/miniworld``, a reference rendered from ``REF_PROMPT`` and a target ``PROMPT`` in the world's
words (defaults: the demo's ``red yellow stripes circle left`` and ``circle right``), and prints what
each image shows as the world's classifiers read it.

    make run [REF_PROMPT="red yellow stripes circle left"] [PROMPT="circle right"] [SUBJECT=circle]
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
from server_fixture import ComfyServer, ServerError, link_miniworld  # noqa: E402

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
    a.world = not a.ckpt  # no checkpoint: the miniature world's shipped model
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
    if a.world:
        return _parse_world(a)
    a.prompt = a.prompt.strip() or eg.TARGET_PROMPT
    a.subject = a.subject.strip() or eg.SUBJECT
    if a.subject.lower() not in a.prompt.lower():
        raise UsageError(f"SUBJECT={a.subject!r} must appear in PROMPT={a.prompt!r}: its cross-attention "
                         "in the target prompt is the subject mask.")
    a.ref_prompt = a.ref_prompt.strip() or f"a photo of {a.subject}"
    a.steps = _int(a.steps, "STEPS", 50, 2)
    a.seed = _int(a.seed, "SEED", eg.SEED, 0)
    a.batch = _int(a.batch, "BATCH", 1, 1)
    a.size = _size(a.size, 512)
    return a


def _size(text: str, default: int) -> int:
    size = _int(text, "SIZE", default, 64)
    if size % 64:
        raise UsageError(f"SIZE must be a multiple of 64; got {size}.")
    return size


def _parse_world(a: argparse.Namespace) -> argparse.Namespace:
    """The arguments of a run without ``CKPT``: the miniature world's words, sizes and defaults."""
    import run_miniworld as mw

    a.prompt = a.prompt.strip() or mw.demo_graph.TARGET_PROMPT
    a.subject = a.subject.strip() or mw.default_subject(a.prompt)
    if a.subject.lower() not in a.prompt.lower():
        raise UsageError(f"SUBJECT={a.subject!r} must appear in PROMPT={a.prompt!r}: its cross-attention "
                         "in the target prompt is the subject mask.")
    a.steps = _int(a.steps, "STEPS", mw.demo_graph.STEPS, 2)
    a.seed = _int(a.seed, "SEED", mw.demo_graph.SEED, 0)
    a.batch = _int(a.batch, "BATCH", 1, 1)
    a.size = _size(a.size, mw.SIZE)
    files = (("REF", a.ref), ("LORA", a.lora), ("EMBEDDINGS", a.embeddings))
    given = [name for name, value in files if value]
    if given:
        raise UsageError(f"{', '.join(given)} need(s) CKPT. Without CKPT the run uses the miniature world's "
                         "model, whose reference is rendered from REF_PROMPT (its words, e.g. "
                         f"{mw.demo_graph.REF_PROMPT!r}).")
    if a.size != mw.SIZE:
        raise UsageError(f"Without CKPT, SIZE is {mw.SIZE} (the miniature world's 32x32 latents); "
                         f"got {a.size}.")
    try:
        mw.check_prompt(a.prompt, a.subject)
        a.reference = mw.parse_reference(a.ref_prompt.strip() or mw.demo_graph.REF_PROMPT)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    a.ref_prompt = a.reference.prompt
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


def _compose(out: Path, labels: tuple[str, ...], rows: list[list[Path]]) -> Path:
    """One labelled column per entry of ``labels``, one row per generated image, with a label strip.

    Every image is shown at the size of the last column's (the DreamMatcher image).
    """
    from PIL import Image, ImageDraw

    ims = [[Image.open(p).convert("RGB") for p in row] for row in rows]
    w, h = ims[0][-1].size
    label = 18
    sheet = Image.new("RGB", (len(labels) * w, label + h * len(ims)), "white")
    draw = ImageDraw.Draw(sheet)
    for col, text in enumerate(labels):
        draw.text((col * w + 4, 3), text, fill="black")
    for r, row in enumerate(ims):
        for col, im in enumerate(row):
            sheet.paste(im.resize((w, h)), (col * w, label + r * h))
    dest = out / "comparison.png"
    sheet.save(dest)
    return dest


def _checkpoint_graph(a: argparse.Namespace, server: ComfyServer, root: Path) -> tuple[dict, dict, str, Path]:
    """The run on ``CKPT``: link the files and copy the reference.

    Returns the graph, its saves (node -> role), the diagnostics node and the reference file.
    """
    models = server.models_dir
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
    return graph, eg.RUN_SAVES, "15", ref


def _world_graph(a: argparse.Namespace, server: ComfyServer, root: Path) -> tuple[dict, dict, str, str]:
    """The run without ``CKPT``: the demo nodes linked into the server, and the world's graph.

    Returns the graph, its saves (node -> role), the diagnostics node and the shipped model's palette.
    """
    import run_miniworld as mw

    link_miniworld(server.base)
    palette = mw.shipped_palette()
    built = mw.build(reference=a.reference, prompt=a.prompt, subject=a.subject, steps=a.steps, seed=a.seed,
                     batch=a.batch, palette=palette)
    print(f"[run] no CKPT: the miniature world's shipped model ({mw.WEIGHTS}, palette {palette}) on ComfyUI "
          f"{root} ({'GPU' if not server.cpu else 'CPU'}); {a.steps} steps at {a.size}² (32x32 latents), "
          f"seed {a.seed}, batch {a.batch}")
    print(f"[run] reference rendered from {a.ref_prompt!r}; prompt {a.prompt!r}; subject {a.subject!r}")
    return built.graph, built.saves, built.diagnostics, palette


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
        if a.world:
            graph, saves, diagnostics, palette = _world_graph(a, server, root)
        else:
            graph, saves, diagnostics, ref = _checkpoint_graph(a, server, root)
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
        for node, role in saves.items():
            for i, img in enumerate(entry["outputs"].get(node, {}).get("images", [])):
                src = server.output_dir / img.get("subfolder", "") / img["filename"]
                dest = out / f"{role}_{i + 1}.png"
                shutil.copy(src, dest)
                saved.setdefault(role, []).append(dest)
        report = "\n".join(entry["outputs"].get(diagnostics, {}).get("text", []))
        (out / "report.txt").write_text(report + "\n", encoding="utf-8")
        if a.world:
            import run_miniworld as mw

            labels = mw.LABELS
            rows = [[saved["reference"][0], *row] for row in
                    zip(saved["baseline"], saved["ama"], saved["dreammatcher"], strict=True)]
        else:
            shutil.copy(ref, out / f"reference{ref.suffix.lower()}")
            labels = ("reference", "baseline", "DreamMatcher")
            rows = [[ref, *row] for row in zip(saved["baseline"], saved["dreammatcher"], strict=True)]
        comparison = _compose(out, labels, rows)
    print(f"[run] done in {time.perf_counter() - t0:.1f} s. Images in {out}:")
    for role, paths in saved.items():
        print(f"  {role}: {', '.join(p.name for p in paths)}")
    print(f"  comparison: {comparison.name} ({' | '.join(labels)})\n  report: report.txt")
    if report:
        print("[run] AMA per step:\n" + report)
    if a.world:
        print(mw.meaning(saved, a.reference, a.prompt, palette))
        print("[run] Pass CKPT=<your SD1.5 checkpoint> REF=<a photo of your subject> PROMPT=... SUBJECT=... "
              "for your own images.")
    else:
        print("[run] The DreamMatcher image should keep the baseline's layout and take the reference's "
              "appearance; the inspectors show where the subject was matched (composite, flow) and what "
              "the features see. Weak effect: see README 'Troubleshooting'.")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
