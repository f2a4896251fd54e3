"""``make run``: run the example workflows headless on a random-weight SD1.5 checkpoint.

Starts the embedded ComfyUI (or ``$COMFYUI_PATH``) on a free loopback port with this pack
linked in, writes the narrow random SD1.5 checkpoint the e2e tier uses (cached in
``.host/cache``), and posts the API twins of ``example_workflows/`` at a small size and step
count. The weights are random, so the images are noise-like: this proves the pipeline runs
end to end (inversion, AMA patch, guidance, decode, save), not image quality.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "tests" / "e2e"))
sys.path.insert(0, str(REPO / "scripts"))

import checkpoints  # noqa: E402
from comfy_env import comfy_root  # noqa: E402
from example_graphs import EXAMPLES  # noqa: E402
from server_fixture import ComfyServer  # noqa: E402

SIZE, STEPS = 128, 10


def main() -> None:
    out = REPO / ".host" / "run-output"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dm-run-") as tmp:
        server = ComfyServer(comfy_root(), Path(tmp))
        server.start()
        try:
            server.check_pack_loaded()
            cache = REPO / ".host" / "cache"
            cache.mkdir(parents=True, exist_ok=True)
            checkpoints.narrow_sd15(server.models_dir / "checkpoints" / "dm_narrow_sd15.safetensors",
                                    server.comfy_root, server.python, cache)
            shutil.copy(server.comfy_root / "input" / "example.png", server.base / "input" / "example.png")
            for name, build in EXAMPLES.items():
                graph = build(steps=STEPS, size=SIZE)
                graph["1"]["inputs"]["ckpt_name"] = "dm_narrow_sd15.safetensors"
                t0 = time.perf_counter()
                entry = server.run(graph, timeout=1800)
                for path in server.output_images(entry):
                    dest = out / f"{name}_{path.name}"
                    shutil.copy(path, dest)
                    print(f"{name}: {time.perf_counter() - t0:.1f} s -> {dest}")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
