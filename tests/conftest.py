"""Shared fixtures for the e2e and browser tiers: ONE real ComfyUI server per session.

Importing this file only imports the standard library (the core tier must stay light); the
server starts only when a test asks for ``comfy_server``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_env import comfy_root  # noqa: E402
from server_fixture import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory) -> ComfyServer:
    """A running ComfyUI with this pack loaded; fails if the pack did not load cleanly.

    The base directory holds ``models/{checkpoints,loras,embeddings}`` (empty: tiers write
    their own files; ComfyUI rescans model folders on each request) and ``output``.
    """
    server = ComfyServer(comfy_root(), tmp_path_factory.mktemp("comfy_server"))
    try:
        server.start()
        server.pack_ids = server.check_pack_loaded()
        print(f"\n[server] {server.url} up in {server.startup_s:.1f} s; log: {server.log_path}")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def miniworld_server(tmp_path_factory) -> ComfyServer:
    """A second ComfyUI with the pack *and* the miniature world's demo nodes (as ``make demo`` runs it).

    Separate from ``comfy_server``, which stays a normal install that shows no demo nodes.
    """
    from server_fixture import link_miniworld

    weights = Path(__file__).resolve().parents[1] / "scripts/miniworld/weights/miniworld.safetensors"
    if not weights.is_file():
        pytest.fail(f"the shipped miniworld model is missing: {weights}")
    server = ComfyServer(comfy_root(), tmp_path_factory.mktemp("miniworld_server"))
    try:
        server.prepare()
        link_miniworld(server.base)
        server.start()
        server.pack_ids = server.check_pack_loaded()
        print(f"\n[server] miniworld demo server {server.url} up in {server.startup_s:.1f} s")
        yield server
    finally:
        server.stop()
