"""The shipped miniature-world model inside the in-process host: it loads as a real SD1.5-layout
``ModelPatcher``, the pack's layout discovery sees SD1.5's blocks, and AMA at strength 0 is the
stock sampler bit for bit (while strength 1 changes the image)."""

from __future__ import annotations

import sys

import comfy_env
import pytest
import torch

sys.path.insert(0, str(comfy_env.REPO / "scripts"))


@pytest.fixture(scope="module")
def mw(host):
    from miniworld import demo_nodes

    return demo_nodes.load("miniworld.safetensors")


def test_model_has_the_sd15_block_layout(mw, dm):
    import comfy.model_patcher

    model, _ = mw
    assert isinstance(model, comfy.model_patcher.ModelPatcher)
    layout = dm("nodes.host.model").unet_layout(model)
    assert layout.family == "sd15"
    assert [b.id for b in layout.decoder()] == list(range(3, 12))
    assert [b.id for b in dm("nodes.layout").ama_blocks(layout, "paper (decoder 32²+64²)", "")] == list(
        range(6, 12)
    )


def test_strength_zero_is_the_stock_sampler_bit_for_bit(mw, dm, sample):
    from miniworld import world

    model, clip = mw
    enc = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))  # noqa: E731
    scene = world.random_scene(
        torch.Generator().manual_seed(0), world.Subject("circle", "dots", ("red", "blue")), "left"
    )
    inv = dm("nodes.node_invert").InvertReference
    ref = inv.execute(
        model,
        {"samples": world.rgb_to_latent(world.render(scene)[None])},
        enc(" ".join(scene.prompt())),
        steps=8,
        scheduler="ddim_uniform",
        cfg=1.0,
        inversion_conditioning=enc(""),
    )[0]
    match = dm("nodes.config").MatchConfig(
        subject="circle", subject_tokens=(0,), target_prompt="circle right"
    )
    ama = dm("nodes.ama")
    pos, neg = enc("circle right"), enc("")
    x = {"samples": torch.zeros(1, 4, world.SIZE, world.SIZE)}
    base = sample(model, pos, neg, x, steps=8, cfg=4.0, seed=3)
    zero = sample(
        ama.patch_model(model, ref, 0.0, 0.08, 1.0, match=match), pos, neg, x, steps=8, cfg=4.0, seed=3
    )
    full = sample(
        ama.patch_model(model, ref, 1.0, 0.08, 1.0, match=match), pos, neg, x, steps=8, cfg=4.0, seed=3
    )
    assert torch.equal(zero, base)
    assert not torch.equal(full, base)


@pytest.mark.parametrize(("precision", "read_only"), [("bf16", 1), ("fp32", 0)])
def test_training_script_runs_and_saves_loadable_weights(tmp_path, precision, read_only):
    """Two tiny steps of ``make train-miniworld`` in a subprocess: the loop, the log and the saved file
    work in both precisions, with and without read-only pairs, and the file records its recipe by
    names only."""
    import json
    import subprocess

    from safetensors import safe_open

    out = tmp_path / "tiny.safetensors"
    cmd = [sys.executable, str(comfy_env.REPO / "scripts" / "train_miniworld.py"), "--out", str(out),
           "--steps", "2", "--batch", "6", "--pairs", "1", "--read-only-pairs", str(read_only),
           "--precision", precision]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
        assert f.get_tensor(keys[0]).dtype == torch.float16
    recipe = json.loads(meta["recipe"])
    assert meta["steps"] == "2" and recipe["precision"] == precision and recipe["out"] == out.name
    assert recipe["read_only_pairs"] == str(read_only)
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text.") for k in keys)
    rows = (tmp_path / "tiny.log.csv").read_text().strip().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 3
    loss = float(rows[-1].split(",")[2])
    assert loss == loss and 0 < loss < 10
