"""How well the miniature world's model follows its prompts (the model card's quality figures).

Samples ``--n`` random full prompts (colours, texture, shape, position) with the stock sampler and
reads each image with ``miniworld/measure.py``: the fraction with the prompted shape, position,
texture and exact colour set, with 95% bootstrap intervals. Then, for shape-and-position prompts
(no appearance words), how many distinct appearances the model draws (the diversity DreamMatcher is
meant to replace by the reference's appearance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default="miniworld.safetensors")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = ap.parse_args()

    from comfy_env import put_comfy_first_on_path

    put_comfy_first_on_path()
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()
    import comfy.sample
    from fidelity import bootstrap_ci
    from miniworld import demo_nodes, measure, world

    model, clip = demo_nodes.load(args.weights)
    palette = demo_nodes.palette_of(args.weights)  # read the colours the model learned

    def encode(text: str) -> list:
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))

    neg = encode("")

    def sample(text: str, seed: int):
        x = torch.zeros(1, 4, world.SIZE, world.SIZE)
        out = comfy.sample.sample(
            model,
            comfy.sample.prepare_noise(x, seed),
            args.steps,
            args.cfg,
            "ddim",
            "ddim_uniform",
            encode(text),
            neg,
            x,
            seed=seed,
            disable_pbar=True,
        )
        return measure.describe(world.latent_to_rgb(out.float())[0], palette)

    gen = torch.Generator().manual_seed(args.seed)
    hits: dict[str, list[float]] = {k: [] for k in ("shape", "position", "texture", "colours")}
    for i in range(args.n):
        scene = world.random_scene(gen)
        d = sample(" ".join(scene.prompt()), args.seed + i)
        s = scene.subject
        hits["shape"].append(float(d["shape"] == s.shape))
        hits["position"].append(float(d["position"] == scene.position))
        hits["texture"].append(float(d["texture"] == s.texture))
        hits["colours"].append(float(d["colours"] == frozenset(s.colours)))
    looks, shape_ok = [], []
    for i in range(args.n // 2):
        shape = world.SHAPES[i % 3]
        d = sample(f"{shape} {world.POSITIONS[i % 5]}", 10_000 + i)
        shape_ok.append(float(d["shape"] == shape))
        looks.append((d["texture"], tuple(sorted(d["colours"]))))
    figures = {k: {"mean": sum(v) / len(v), "ci95": bootstrap_ci(v)} for k, v in hits.items()}
    figures["no_appearance_words"] = {
        "shape": sum(shape_ok) / len(shape_ok),
        "distinct_appearances": len(set(looks)),
        "samples": len(looks),
    }
    figures["settings"] = {
        "n": args.n,
        "steps": args.steps,
        "cfg": args.cfg,
        "sampler": "ddim",
        "scheduler": "ddim_uniform",
        "weights": args.weights,
        "palette": palette,
    }
    text = json.dumps(figures, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
