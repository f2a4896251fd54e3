"""Host tier: the pack loaded into an in-process ComfyUI (docs/host.md).

Fixtures:
- ``host``: boots ComfyUI once per session (CPU, temp input/output dirs) and loads this pack
  plus ``testing_pack`` through ComfyUI's own ``load_custom_node``.
- ``dm``: ``dm("nodes.ama")`` imports a submodule of the *loaded* pack (the same module objects
  ComfyUI uses, so ``isinstance`` checks agree).
- ``tiny``: ``tiny.build("sd15"|"sdxl", seed)``, ``tiny.cond(seed)``, ``tiny.latent(seed, h, w, b)``.
- ``run_graph``: executes an API-format graph through ``execution.PromptExecutor``.
- ``sample``: plain ``comfy.sample.sample`` under inference mode, the vanilla baseline.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import comfy_env  # noqa: E402
from comfy_env import boot_in_process  # noqa: E402


class _StubServer:
    """The minimal ``PromptServer`` surface that ``PromptExecutor`` uses."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, object]] = []

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


class Host:
    def __init__(self, root: Path, pack_module: str, testing_module: str, dirs: dict[str, Path]) -> None:
        self.root = root
        self.pack_module = pack_module
        self.testing_module = testing_module
        self.dirs = dirs
        self.server = _StubServer()


@pytest.fixture(scope="session")
def host(tmp_path_factory) -> Host:
    root, dirs, pack_module = boot_in_process(tmp_path_factory.mktemp("comfy_base"), cpu=True)
    import nodes  # ComfyUI's nodes.py

    testing = Path(__file__).resolve().parent / "testing_pack"
    assert asyncio.run(nodes.load_custom_node(str(testing), ignore=set(nodes.NODE_CLASS_MAPPINGS)))
    testing_module = str(testing).replace(".", "_x_")
    assert pack_module in sys.modules and testing_module in sys.modules
    return Host(root, pack_module, testing_module, dirs)


@pytest.fixture(scope="session")
def dm(host):
    def _import(sub: str = ""):
        return importlib.import_module(host.pack_module + (f".{sub}" if sub else ""))

    return _import


@pytest.fixture(scope="session")
def tiny(host):
    return importlib.import_module(host.testing_module + ".tiny_models")


@pytest.fixture
def run_graph(host):
    """Run an API-format graph; return ``history_result["outputs"]`` or raise with the error."""
    import execution

    def _run(prompt: dict, prompt_id: str = "test"):
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok:
            raise AssertionError(f"invalid prompt: {err} {node_errors}")
        ex = execution.PromptExecutor(host.server, cache_type=execution.CacheType.CLASSIC,
                                      cache_args=comfy_env.executor_cache_args())
        host.server.messages.clear()
        ex.execute(prompt, prompt_id, {}, outputs)
        if not ex.success:
            errors = [d for e, d in ex.status_messages if e == "execution_error"]
            raise AssertionError(f"graph failed: {errors}")
        return ex.history_result["outputs"]

    return _run


@pytest.fixture
def sample(host):
    """Vanilla ComfyUI sampling of a LATENT dict, as KSampler does it (deterministic)."""
    import comfy.sample
    import torch

    def _sample(model, positive, negative, latent: dict, *, steps=10, cfg=7.0, sampler="ddim",
                scheduler="ddim_uniform", seed=0, denoise=1.0, add_noise=True, sigmas=None):
        x = latent["samples"]
        with torch.inference_mode():
            noise = comfy.sample.prepare_noise(x, seed) if add_noise else torch.zeros_like(x)
            return comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, x,
                                       denoise=denoise, seed=seed, disable_pbar=True, sigmas=sigmas)

    return _sample


def pytest_collection_modifyitems(config, items):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
