"""``make run`` end to end: the script starts its own embedded server, runs the full method, the
baseline and the inspectors on given files, shows progress and writes the images it promises.

The script is run exactly as ``make run`` runs it (``scripts/run_example.py`` with the same
flags), as a subprocess with the host's Python and ``COMFYUI_PATH``, so it exercises the real
start-up, model-folder linking and websocket progress.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from comfy_env import REPO

SCRIPT = REPO / "scripts" / "run_example.py"


def _run(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=str(REPO))
    print(f"\n[make run] {' '.join(args)} -> rc {proc.returncode} in {time.perf_counter() - t0:.1f} s\n"
          + proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def _reference(path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 80), (240, 240, 235))
    ImageDraw.Draw(img).ellipse((20, 15, 70, 65), fill=(200, 40, 40))
    img.save(path)
    return path


def test_make_run_with_checkpoint_lora_and_reference(e2e_models, comfy_server, tmp_path):
    from PIL import Image

    ckpt = comfy_server.models_dir / "checkpoints" / e2e_models.checkpoint
    lora = comfy_server.models_dir / "loras" / e2e_models.lora
    ref = _reference(tmp_path / "my subject.png")
    out = tmp_path / "out"
    proc = _run(["--ckpt", str(ckpt), "--ref", str(ref), "--prompt", "a photo of sks dog on a beach",
                 "--subject", "sks dog", "--lora", f"{lora}:0.5", "--steps", "3", "--seed", "7",
                 "--batch", "2", "--size", "64", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "DM_MatchingGuidanceSampler" in text and "3/3" in text, "no sampler progress shown"
    assert f"LoRA {lora.name} @ 0.5" in text and "seed 7, batch 2" in text
    assert str(out) in text and "RANDOM weights" not in text
    for stem in ("dreammatcher", "baseline", "inspect_match_composite", "inspect_match_flow",
                 "inspect_match_warped", "inspect_features_dreammatcher"):
        for i in (1, 2):
            assert (out / f"{stem}_{i}.png").is_file(), f"{stem}_{i}.png missing"
    assert (out / "inspect_features_reference_1.png").is_file()
    assert Image.open(out / "reference.png").tobytes() == Image.open(ref).tobytes()
    sheet = Image.open(out / "comparison.png")
    assert sheet.size == (3 * 64, 18 + 2 * 64)
    dm = Image.open(out / "dreammatcher_1.png").tobytes()
    base = Image.open(out / "baseline_1.png").tobytes()
    assert dm != base, "DreamMatcher image identical to the baseline: AMA did nothing"
    report = (out / "report.txt").read_text()
    assert "AMA run #1" in report and "coverage" in report


def test_make_run_with_a_textual_inversion_subject(e2e_models, comfy_server, tmp_path):
    """A TI subject: EMBEDDINGS links the embedding, and the subject is resolved through it."""
    ckpt = comfy_server.models_dir / "checkpoints" / e2e_models.checkpoint
    emb = comfy_server.models_dir / "embeddings" / f"{e2e_models.embedding}.safetensors"
    out = tmp_path / "ti"
    subject = f"embedding:{e2e_models.embedding}"
    proc = _run(["--ckpt", str(ckpt), "--embeddings", str(emb.parent), "--prompt",
                 f"a photo of {subject} dog", "--subject", subject, "--steps", "2", "--size", "64",
                 "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert f"embeddings {emb.name}" in proc.stdout
    assert (out / "dreammatcher_1.png").is_file() and "AMA run #1" in (out / "report.txt").read_text()


def test_make_run_without_checkpoint_runs_the_miniature_world(tmp_path):
    """No CKPT: the shipped miniature model, a rendered reference, and the images explained in words."""
    from PIL import Image

    out = tmp_path / "world"
    proc = _run(["--ref-prompt", "red yellow stripes circle left", "--prompt", "circle right",
                 "--steps", "6", "--out", str(out)])
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "no CKPT: the miniature world's shipped model" in text and "RANDOM weights" not in text
    assert "What the images mean" in text and "reference's colours" in text
    for role in ("reference", "baseline", "ama", "dreammatcher"):
        assert f"{role}_1" in text or role == "reference", f"{role} not explained"
        assert (out / f"{role}_1.png").is_file(), f"{role}_1.png missing"
    for stem in ("inspect_match_composite", "inspect_match_flow", "inspect_features_dreammatcher"):
        assert (out / f"{stem}_1.png").is_file(), f"{stem}_1.png missing"
    side = Image.open(out / "dreammatcher_1.png").size
    assert side == (256, 256), side  # 32x32 enlarged 8x, as the demo shows them
    assert Image.open(out / "comparison.png").size == (4 * 256, 18 + 256)
    # the patch runs under KSampler and the guidance sampler; the report is of whichever ran last
    assert re.search(r"AMA run #[12]: 6 matched steps", (out / "report.txt").read_text())


@pytest.mark.parametrize("args, message", [
    (["--ckpt", "/nonexistent/model.safetensors"], "no such file"),
    (["--ref", str(REPO / "README.md")], "expected one of"),
    (["--prompt", "a photo of a cat", "--subject", "sks dog"], "must appear in PROMPT"),
    (["--steps", "many"], "not a whole number"),
    (["--size", "100"], "multiple of 64"),
    (["--embeddings", "/nonexistent/emb.safetensors"], "no such file"),
    (["--ref-prompt", "purple dog"], "REF_PROMPT"),
    (["--prompt", "circle on the moon"], "PROMPT"),
    (["--size", "512"], "SIZE is 256"),
])
def test_make_run_rejects_bad_input_before_starting(args, message):
    t0 = time.perf_counter()
    proc = _run(args, timeout=120)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "[run] ComfyUI" not in proc.stdout  # nothing was started
    assert time.perf_counter() - t0 < 60
