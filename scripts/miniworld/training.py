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
    #: [B, 2] the two images whose decoder self-attention keys and values each row reads (own, other).
    #: A joint pair reads (itself, its partner); a single scene (itself, itself), which is plain
    #: self-attention; in a read-only pair the first image reads (partner, partner) and the second
    #: (itself, itself), which is key/value replacement from the second into the first.
    sources: torch.Tensor


def _prompt(scene: world.Scene, mode: str) -> list[int]:
    if mode == "empty":
        return []
    return world.tokenize_words(scene.prompt(appearance=(mode == "full")))


def _mode(gen: torch.Generator, p_empty: float, p_shape: float) -> str:
    u = float(torch.rand(1, generator=gen))
    return "empty" if u < p_empty else ("shape" if u < p_empty + p_shape else "full")


def sample_batch(
    gen: torch.Generator, size: int, pairs: int, read_only: int = 0, palette: str = world.DEFAULT_PALETTE
) -> Batch:
    """``pairs`` joint pairs, then ``read_only`` read-only pairs, then single scenes.

    Every pair is one subject at two different positions. In a joint pair each image attends over
    both; in a read-only pair the first image attends to its partner's keys and values only, so it can
    take an appearance its prompt does not name only by reading it from the partner, the training-time
    twin of key/value replacement. ``read_only=0`` draws exactly the batches of the first recipe.
    The palette changes only the colours' RGB values, never the random draws.
    """
    if 2 * (pairs + read_only) > size:
        raise ValueError(
            f"{pairs} + {read_only} pairs need {2 * (pairs + read_only)} images; the batch holds {size}."
        )
    scenes: list[world.Scene] = []
    ids: list[list[int]] = []
    partner: list[int] = []
    sources: list[tuple[int, int]] = []
    for p in range(pairs + read_only):
        first = world.random_scene(gen)
        others = [q for q in world.POSITIONS if q != first.position]
        second = world.random_scene(
            gen, first.subject, others[int(torch.randint(len(others), (1,), generator=gen))]
        )
        if float(torch.rand(1, generator=gen)) < 0.1:
            modes = ("empty", "empty")
        else:
            modes = (_mode(gen, 0.0, 0.75), _mode(gen, 0.0, 0.25))
        a, b = 2 * p, 2 * p + 1
        if p < pairs:
            sources += [(a, b), (b, a)]
        else:
            sources += [(b, b), (b, b)]
        for j, (scene, mode) in enumerate(zip((first, second), modes, strict=True)):
            scenes.append(scene)
            ids.append(_prompt(scene, mode))
            partner.append(2 * p + 1 - j)
    while len(scenes) < size:
        scene = world.random_scene(gen)
        scenes.append(scene)
        ids.append(_prompt(scene, _mode(gen, 0.1, 0.35)))
        sources.append((len(partner), len(partner)))
        partner.append(-1)
    rgb = torch.stack([world.render(s, palette=palette) for s in scenes])
    return Batch(
        world.rgb_to_latent(rgb), mw_model.pad_ids(ids), torch.tensor(partner), scenes, torch.tensor(sources)
    )


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head scaled dot-product attention on ``[B, N, C]`` queries and ``[B, M, C]`` keys/values."""
    b, n, c = q.shape
    d = c // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, heads, d).transpose(1, 2)

    out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, c)


def sourced_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, sources: torch.Tensor
) -> torch.Tensor:
    """Each row's queries attend over the keys/values of the two rows ``sources[row]`` names.

    A row whose two sources are one and the same row sees each of that row's keys twice with equal
    weight, which is exactly plain attention to that row.
    """
    return attention(
        q,
        torch.cat([k[sources[:, 0]], k[sources[:, 1]]], dim=1),
        torch.cat([v[sources[:, 0]], v[sources[:, 1]]], dim=1),
        heads,
    )


def joint_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, partner: torch.Tensor
) -> torch.Tensor:
    """Self-attention of each row over its own tokens and its partner's ([B, N, C] in and out).

    A row whose partner is -1 (single scenes) is its own partner, which is plain self-attention.
    """
    own = torch.arange(len(partner), device=partner.device)
    return sourced_attention(q, k, v, heads, torch.stack([own, torch.where(partner >= 0, partner, own)], 1))


def pair_attention_options(sources: torch.Tensor) -> dict:
    """``transformer_options`` whose attn1 replacement makes decoder self-attention read ``sources``."""

    def replace(q, k, v, extra_options):
        return sourced_attention(q, k, v, extra_options["n_heads"], sources)

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
        "palette": getattr(args, "palette", world.DEFAULT_PALETTE),
    }
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
