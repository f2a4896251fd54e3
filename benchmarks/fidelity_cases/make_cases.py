"""Write the case files of ``make fidelity`` (seeded; each written once, then frozen).

Each case: a random subject rendered at a random position as the reference, and a target prompt
naming its shape at another position (no appearance words), with three sampling seeds. The held-out
subjects are drawn from another seed and exclude every development subject. The second held-out set
(``heldout2.json``, 32 cases) was added after the sixth training's held-out run to read control (b)
on more samples; it is drawn from a third seed and excludes every subject of the other two sets, so
the first two files come out byte for byte as they were (docs/miniworld.md, "A second held-out set").
The third (``heldout3.json``, 32 cases, a fourth seed, excluding every earlier subject) was added after
the seventh training's held-out runs: the two earlier held-out sets had informed that training's
design, so the third checks its control (b) on cases no decision has seen ("A third held-out set").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "scripts"))

from miniworld import world  # noqa: E402


def cases(seed: int, n: int, exclude: set) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        subject = world.random_subject(gen)
        key = (subject.shape, subject.texture, subject.colours)
        if key in seen:
            continue
        seen.add(key)
        positions = list(world.POSITIONS)
        ref_pos = positions[int(torch.randint(5, (1,), generator=gen))]
        others = [p for p in positions if p != ref_pos]
        tgt_pos = others[int(torch.randint(4, (1,), generator=gen))]
        base = int(torch.randint(10_000, (1,), generator=gen))
        out.append(
            {
                "reference": {
                    "shape": subject.shape,
                    "position": ref_pos,
                    "texture": subject.texture,
                    "colours": list(subject.colours),
                },
                "target": [subject.shape, tgt_pos],
                "seeds": [base, base + 1, base + 2],
                "render_seed": len(out),
            }
        )
    return out


def _key(case: dict) -> tuple:
    ref = case["reference"]
    return (ref["shape"], ref["texture"], tuple(ref["colours"]))


def build() -> dict[str, list[dict]]:
    """Every case file's cases, by file name, each set excluding the subjects of the sets before it."""
    dev = cases(100, 8, set())
    held = cases(200, 12, {_key(c) for c in dev})
    held2 = cases(300, 32, {_key(c) for c in dev + held})
    held3 = cases(400, 32, {_key(c) for c in dev + held + held2})
    return {"dev.json": dev, "heldout.json": held, "heldout2.json": held2, "heldout3.json": held3}


def render(case_list: list[dict]) -> str:
    """A case file's exact text (the frozen files are this, byte for byte)."""
    return json.dumps(case_list, indent=1) + "\n"


def main() -> None:
    for name, case_list in build().items():
        (HERE / name).write_text(render(case_list))


if __name__ == "__main__":
    main()
