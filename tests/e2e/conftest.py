"""e2e tier: the real ComfyUI server (``comfy_server``, tests/conftest.py) plus model files.

``e2e_models`` writes, at test time, into the server's ``--base-directory``:
a random-weight narrow SD1.5 checkpoint (built in a subprocess from ComfyUI's classes and
cached in ``.host/cache``), a kohya-named LoRA and a TI embedding (tests/e2e/checkpoints.py).
``e2e_sdxl`` writes the narrow SDXL checkpoint (about 2 GB, same build and cache) and returns
its file name; it is a separate fixture so that SD1.5-only sessions never build or load it.
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


#: File name of the narrow SDXL checkpoint in the server's ``models/checkpoints``.
SDXL_CHECKPOINT = "dm_narrow_sdxl.safetensors"


def _cache_dir() -> Path | None:
    """``.host/cache``, or None for a read-only checkout (then every session builds afresh)."""
    cache = REPO / ".host" / "cache"
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    return cache


@pytest.fixture(scope="session")
def e2e_models(comfy_server) -> E2EModels:
    models = comfy_server.models_dir
    t0 = time.perf_counter()
    cache = _cache_dir()
    checkpoints.narrow_sd15(models / "checkpoints" / "dm_narrow_sd15.safetensors",
                            comfy_server.comfy_root, comfy_server.python, cache)
    lora_modules = checkpoints.kohya_lora(models / "loras" / "dm_test_lora.safetensors")
    checkpoints.ti_embedding(models / "embeddings" / "dmtestemb.safetensors")
    print(f"\n[e2e] model files ready in {time.perf_counter() - t0:.1f} s")
    return E2EModels("dm_narrow_sd15.safetensors", "dm_test_lora.safetensors", tuple(lora_modules),
                     "dmtestemb")


@pytest.fixture(scope="session")
def e2e_sdxl(comfy_server) -> str:
    """The narrow SDXL checkpoint's name, as ``CheckpointLoaderSimple``'s ``ckpt_name`` expects.

    The unmodified host detects it as SDXL (model type EPS, latent format SDXL); see
    ``checkpoints.narrow_sdxl`` and tests/e2e/test_sdxl_checkpoint.py. Its UNet is cheap at
    256x256 px, but with it loaded the server's resident memory peaks at about 6 GiB, so a
    test that is done with it may POST ``/free`` to release it for the rest of the session.
    """
    t0 = time.perf_counter()
    checkpoints.narrow_sdxl(comfy_server.models_dir / "checkpoints" / SDXL_CHECKPOINT,
                            comfy_server.comfy_root, comfy_server.python, _cache_dir())
    print(f"\n[e2e] SDXL checkpoint ready in {time.perf_counter() - t0:.1f} s")
    return SDXL_CHECKPOINT
