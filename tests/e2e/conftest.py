"""e2e tier: the real ComfyUI server (``comfy_server``, tests/conftest.py) plus model files.

``e2e_models`` writes, at test time, into the server's ``--base-directory``:
a random-weight narrow SD1.5 checkpoint (built in a subprocess from ComfyUI's classes and
cached in ``.host/cache``), a kohya-named LoRA and a TI embedding (tests/e2e/checkpoints.py).
ComfyUI rescans its model folders per request, so writing them after start-up is fine.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import checkpoints  # noqa: E402
from comfy_env import REPO  # noqa: E402


@dataclass(frozen=True)
class E2EModels:
    checkpoint: str  # names as ComfyUI's loaders expect them (relative to the model folder)
    lora: str
    lora_modules: tuple[str, ...]
    embedding: str  # use as "embedding:<name>" in a prompt


@pytest.fixture(scope="session")
def e2e_models(comfy_server) -> E2EModels:
    models = comfy_server.models_dir
    t0 = time.perf_counter()
    cache = REPO / ".host" / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        cache = None  # read-only checkout: build into the temp dir every session
    checkpoints.narrow_sd15(models / "checkpoints" / "dm_narrow_sd15.safetensors",
                            comfy_server.comfy_root, comfy_server.python, cache)
    lora_modules = checkpoints.kohya_lora(models / "loras" / "dm_test_lora.safetensors")
    checkpoints.ti_embedding(models / "embeddings" / "dmtestemb.safetensors")
    print(f"\n[e2e] model files ready in {time.perf_counter() - t0:.1f} s")
    return E2EModels("dm_narrow_sd15.safetensors", "dm_test_lora.safetensors", tuple(lora_modules),
                     "dmtestemb")
