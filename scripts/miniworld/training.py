"""Batches, pair attention and saving for the miniature world's training script.

Kept apart from the script so the tests can check the batch composition and that pair attention
with an image as its own partner is plain self-attention (the identity every single scene relies on).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from . import model as mw_model
from . import world

#: Output blocks of the SD1.5 layout; pair attention is applied to the self-attention of every one that
#: holds a transformer (the decoder, where DreamMatcher and key/value injection act).
DECODER_BLOCKS = tuple(range(12))


@dataclass
class Batch:
    latents: torch.Tensor  # [B, 4, H, W]
    ids: torch.Tensor  # [B, MAX_TOKENS]
    partner: torch.Tensor  # [B] index of the pair partner, or -1 for a single scene
    scenes: list


def _prompt(scene: world.Scene, mode: str) -> list[int]:
    if mode == "empty":
        return []
    return world.tokenize_words(scene.prompt(appearance=(mode == "full")))


def _mode(gen: torch.Generator, p_empty: float, p_shape: float) -> str:
    u = float(torch.rand(1, generator=gen))
    return "empty" if u < p_empty else ("shape" if u < p_empty + p_shape else "full")


def sample_batch(gen: torch.Generator, size: int, pairs: int) -> Batch:
    """``pairs`` pairs (same subject, two different positions) followed by single scenes."""
    scenes: list[world.Scene] = []
    ids: list[list[int]] = []
    partner: list[int] = []
    for p in range(pairs):
        first = world.random_scene(gen)
        others = [q for q in world.POSITIONS if q != first.position]
        second = world.random_scene(
            gen, first.subject, others[int(torch.randint(len(others), (1,), generator=gen))]
        )
        if float(torch.rand(1, generator=gen)) < 0.1:
            modes = ("empty", "empty")
        else:
            modes = (_mode(gen, 0.0, 0.75), _mode(gen, 0.0, 0.25))
        for j, (scene, mode) in enumerate(zip((first, second), modes, strict=True)):
            scenes.append(scene)
            ids.append(_prompt(scene, mode))
            partner.append(2 * p + 1 - j)
    while len(scenes) < size:
        scene = world.random_scene(gen)
        scenes.append(scene)
        ids.append(_prompt(scene, _mode(gen, 0.1, 0.35)))
        partner.append(-1)
    rgb = torch.stack([world.render(s) for s in scenes])
    return Batch(world.rgb_to_latent(rgb), mw_model.pad_ids(ids), torch.tensor(partner), scenes)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on ``[B, N, C]`` queries and ``[B, M, C]`` keys/values."""
    b, n, c = q.shape
    d = c // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, heads, d).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, partner: torch.Tensor
) -> torch.Tensor:
    """Self-attention of each row over its own tokens and its partner's ([B, N, C] in and out).

    A row whose partner is itself (single scenes) sees every key twice with equal weight, which is
    exactly plain self-attention.
    """
    idx = torch.where(partner >= 0, partner, torch.arange(len(partner), device=partner.device))
    return attention(q, torch.cat([k, k[idx]], dim=1), torch.cat([v, v[idx]], dim=1), heads)


def pair_attention_options(partner: torch.Tensor) -> dict:
    """``transformer_options`` whose attn1 replacement makes decoder self-attention pair-joint."""

    def replace(q, k, v, extra_options):
        return joint_attention(q, k, v, extra_options["n_heads"], partner)

    return {"patches_replace": {"attn1": {("output", i): replace for i in DECODER_BLOCKS}}}


def save(path: Path, ema: dict, text: torch.nn.Module, steps: int, seconds: float, args) -> None:
    from safetensors.torch import save_file

    tensors = {f"unet.{k}": v.detach().to(torch.float16).contiguous().cpu() for k, v in ema.items()}
    tensors.update(
        {f"text.{k}": v.detach().to(torch.float16).contiguous().cpu() for k, v in text.state_dict().items()}
    )
    meta = {
        "steps": str(steps),
        "seconds": f"{seconds:.0f}",
        # paths by name only: the file must not record the training machine's folders
        "recipe": json.dumps({k: (v.name if isinstance(v, Path) else str(v)) for k, v in vars(args).items()}),
        "vocab": json.dumps(list(world.VOCAB)),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
