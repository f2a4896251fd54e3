"""``make fidelity``: a miniature Table 5 on the miniature world's trained model.

For every case (a rendered reference subject and a target prompt that names the shape and a position
but not the appearance) and seed, the reference is DDIM-inverted with the pack's DDIM Invert Reference,
and the stock KSampler (ComfyUI's own ``common_ksampler``) samples the target with each method:

* ``baseline``      the unpatched model;
* ``kv``            key/value replacement from the reference in AMA's layers and window (controls.py);
                    positive control (b) is measured on it;
* ``kv-all``        the strongest form of the same family: every decoder self-attention layer, at every
                    step. Reported beside control (b), never in its place: it shows whether the model can
                    take an appearance through attention at all when AMA's layers and window are too narrow;
* ``ama``           AMA Model Patch at its defaults, no foreground mask;
* ``ama-mask``      the same with the subject's cross-attention mask (the shape word is the subject);
* ``ama-mg-fast`` / ``ama-mg-exact``  the Matching Guidance Sampler on the ``ama-mask`` model;
* ``prompted`` (only when named in ``--methods``, not a method): the target prompt with the reference's
  colour and texture words put in front, so the model is *told* the appearance. It was added as a
  ceiling for every method that has to take the appearance from the reference instead of the prompt;
  on the shipped model it is none (told the colours, it draws the exact set less often than ``kv``
  takes it);
* ``kv-start0`` and ``kv-layers-all`` (only when named in ``--methods``): the two halves of the step
  from ``kv`` to ``kv-all``, one changed each: AMA's layers at every step, and every decoder layer in
  AMA's window. They say whether ``kv-all`` gains from the first step or from the coarse layers;
* ablations of ``ama`` (one setting changed each): ``ama-pca16`` (PCA size 16 instead of every channel),
  ``ama-pca16-lowrank`` (the same with the low-rank PCA solver; at the default size the model's 64 and
  128 channels leave the solver no room, so it would equal ``ama`` exactly), ``ama-layers-all`` (the
  "all decoder" layer preset), ``ama-start0`` and ``ama-start30`` (the window starts at 0% / 30% of the
  schedule instead of 8%).

Each image is measured by ``scripts/miniworld/measure.py`` against the reference (appearance) and the
same-seed baseline (structure). Every figure gets a 95% bootstrap interval over the case×seed samples.
The positive controls come first: (a) a pair sampled with joint decoder self-attention agrees on its
appearance, and zeroing those values breaks the agreement (judged like for like: a pair's two subjects
against unrelated subjects sampled the same way, see :func:`pair_gap`); (b) key/value replacement
transfers the reference's colour set in at least half the samples. A model that fails them is flagged: its
fidelity figures say nothing about the method.

Writes ``OUT/fidelity.json``, ``OUT/fidelity.md`` and ``OUT/grid.png``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

METHODS = ("baseline", "kv", "kv-all", "ama", "ama-mask", "ama-mg-fast", "ama-mg-exact",
           "ama-pca16", "ama-pca16-lowrank", "ama-layers-all", "ama-start0", "ama-start30")
MEASURES = (
    "colour_set_ok",
    "texture_ok",
    "hist_dist",
    "shape_ok",
    "mask_iou_vs_baseline",
    "centroid_shift_px",
    "position_ok",
)
#: accepted by ``--methods`` but not run by default
OPTIONAL = ("prompted", "kv-start0", "kv-layers-all")
#: control (b)'s bar: the share of samples whose exact colour set key/value replacement must transfer
B_BAR = 0.5
AMA_LAYERS = (6, 7, 8, 9, 10, 11)  # the "paper" preset on the SD1.5 layout (the two finest decoder levels)


def bootstrap_ci(values: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean (seeded)."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    k = len(values)
    means = sorted(sum(values[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return (means[int(0.025 * n)], means[int(0.975 * n) - 1])


def pair_gap(within: list[float], across: list[float]) -> dict:
    """How much closer a pair's two subjects are than unrelated subjects sampled the same way.

    ``within[i]`` is the distance between pair i's two subjects and ``across[i]`` the distance between
    pair i's first subject and another pair's second one, in the same condition. WHY this and not a
    comparison with independent sampling: zeroing every decoder self-attention value leaves nothing
    that can pass between the two images, so a zeroed pair is two independent samples of a damaged
    model, and damage alone can make images alike. Comparing within with across in one condition
    cancels the damage. Returns the mean of ``across - within`` and its 95% bootstrap interval.
    """
    if len(within) != len(across):
        raise ValueError(f"{len(within)} within-pair distances but {len(across)} across-pair ones.")
    gaps = [a - w for w, a in zip(within, across, strict=True)]
    return {
        "within": sum(within) / len(within) if within else float("nan"),
        "across": sum(across) / len(across) if across else float("nan"),
        "gap": sum(gaps) / len(gaps) if gaps else float("nan"),
        "ci95": bootstrap_ci(gaps),
    }


def control_a_passes(joint_gap: dict, zero_gap: dict) -> bool:
    """Control (a), like for like: joint sampling makes a pair closer than unrelated subjects (its
    gap's interval lies above 0), and with the values zeroed it no longer does (the interval holds 0)."""
    lo, hi = zero_gap["ci95"]
    return bool(joint_gap["ci95"][0] > 0 and lo <= 0 <= hi)


def control_b(kv_colour_set_ok: float, ci95) -> dict:
    """Control (b): key/value replacement transfers the reference's exact colour set in at least
    ``B_BAR`` of the samples. The verdict reads the mean; the interval is reported beside it."""
    return {
        "colour_set_ok": kv_colour_set_ok,
        "ci95": ci95,
        "pass": bool(kv_colour_set_ok >= B_BAR),
        "rule": f"kv colour_set_ok >= {B_BAR}",
    }


def load_cases(path: Path) -> list[dict]:
    from miniworld import world

    cases = json.loads(path.read_text())
    for i, case in enumerate(cases):
        ref = case["reference"]
        world.Subject(ref["shape"], ref["texture"], tuple(ref["colours"]))
        if ref["position"] not in world.POSITIONS:
            raise ValueError(f"case {i}: unknown position {ref['position']!r}")
        world.check_words(case["target"])
        if not case.get("seeds"):
            raise ValueError(f"case {i}: 'seeds' must list at least one seed")
    return cases


class Runner:
    """The booted host, the loaded world model and the pack's node classes."""

    def __init__(self, weights: str, steps: int, cfg: float, tmp: Path) -> None:
        from comfy_env import boot_in_process, put_comfy_first_on_path

        put_comfy_first_on_path()
        import torch

        pack = boot_in_process(tmp, cpu=not torch.cuda.is_available(), extras=False)[2]
        self.dm = lambda sub: importlib.import_module(f"{pack}.{sub}")  # noqa: E731
        from miniworld import demo_nodes

        import nodes as comfy_nodes

        self.ksampler = comfy_nodes.common_ksampler
        self.model, self.clip = demo_nodes.load(weights)
        #: the colours the model learned: references are rendered and images read in them
        self.palette = demo_nodes.palette_of(weights)
        #: the file's identity: runs of one file under two names (a candidate and its shipped copy) pool
        self.weights_sha256 = hashlib.sha256(demo_nodes._weights_path(weights).read_bytes()).hexdigest()
        self.steps, self.cfg = steps, cfg
        self.empty = self.encode("")

    def encode(self, text: str) -> list:
        return self.clip.encode_from_tokens_scheduled(self.clip.tokenize(text))

    def sample(self, model, seed: int, positive: list, batch: int = 1):
        import torch

        latent = {"samples": torch.zeros(batch, 4, 32, 32)}
        out = self.ksampler(
            model,
            seed,
            self.steps,
            self.cfg,
            "ddim",
            "ddim_uniform",
            positive,
            self.empty,
            latent,
            denoise=1.0,
        )[0]
        return out["samples"]

    def invert(self, latent, ref_prompt: str):
        inv = self.dm("nodes.node_invert").InvertReference
        return inv.execute(
            self.model,
            {"samples": latent},
            self.encode(ref_prompt),
            steps=self.steps,
            scheduler="ddim_uniform",
            cfg=1.0,
            inversion_conditioning=self.empty,
            reference_negative=self.empty,
        )[0]

    def models(self, ref, target_text: str, shape: str) -> dict:
        config = self.dm("nodes.config")
        ama = self.dm("nodes.ama")
        subject = self.dm("nodes.subject")
        from miniworld import controls
        from miniworld.training import DECODER_BLOCKS

        tokens = subject.resolve_subject(self.clip, target_text, shape)
        masked = config.MatchConfig(subject=shape, subject_tokens=tokens, target_prompt=target_text)
        ms = self.model.get_model_object("model_sampling")
        hi, lo = float(ms.percent_to_sigma(0.08)), float(ms.percent_to_sigma(1.0))
        plain = config.MatchConfig(mask_mode="none")

        def ablation(start: float = 0.08, **kw):
            return ama.patch_model(self.model, ref, 1.0, start, 1.0, match=plain, **kw)

        return {
            "kv": controls.kv_model(self.model, ref, AMA_LAYERS, hi, lo),
            "kv-all": controls.kv_model(self.model, ref, DECODER_BLOCKS, float("inf"), 0.0),
            "kv-start0": controls.kv_model(self.model, ref, AMA_LAYERS, float("inf"), 0.0),
            "kv-layers-all": controls.kv_model(self.model, ref, DECODER_BLOCKS, hi, lo),
            "ama": ablation(),
            "ama-mask": ama.patch_model(self.model, ref, 1.0, 0.08, 1.0, match=masked),
            "ama-pca16": ablation(features=config.feature_config(pca_dim=16)),
            "ama-pca16-lowrank": ablation(features=config.feature_config(pca_dim=16, pca_solver="lowrank")),
            "ama-layers-all": ablation(layer_preset="all decoder"),
            "ama-start0": ablation(start=0.0),
            "ama-start30": ablation(start=0.3),
            "_match": masked,
        }

    def guided(self, model, ref, seed: int, positive: list, mode: str, match):
        import torch

        g = self.dm("nodes.node_guidance").MatchingGuidanceSampler
        latent = {"samples": torch.zeros(1, 4, 32, 32)}
        out = g.execute(
            model,
            ref,
            seed,
            self.steps,
            self.cfg,
            "ddim_uniform",
            positive,
            self.empty,
            latent,
            1.0,
            50.0,
            0.08,
            1.0,
            mode,
            match=match,
        )
        return out[0]["samples"]


def measure_sample(
    rgb, ref_desc: dict, ref_rgb, base_desc: dict | None, target: list[str], palette: str
) -> dict:
    from miniworld import measure, world

    d = measure.describe(rgb, palette)
    shape = next((w for w in target if w in world.SHAPES), None)
    position = next((w for w in target if w in world.POSITIONS), None)
    row = {
        "colour_set_ok": float(bool(d["colours"]) and d["colours"] == ref_desc["colours"]),
        "texture_ok": float(d["texture"] == ref_desc["texture"]),
        "hist_dist": measure.hist_dist(rgb, d["mask"], ref_rgb, ref_desc["mask"], palette),
        "shape_ok": float(d["shape"] == shape),
        "position_ok": float(d["position"] == position) if position else float("nan"),
        # what the classifiers read, kept so that a failure can be explained from the JSON alone
        "read": {"colours": sorted(d["colours"]), "texture": d["texture"], "shape": d["shape"]},
    }
    if base_desc is None:
        row.update(mask_iou_vs_baseline=1.0, centroid_shift_px=0.0)
    else:
        row["mask_iou_vs_baseline"] = measure.mask_iou(d["mask"], base_desc["mask"])
        (ax, ay), (bx, by) = d["centroid"], base_desc["centroid"]
        row["centroid_shift_px"] = (
            ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 if d["area"] and base_desc["area"] else 32.0
        )
    return row


def run_pairs(runner: Runner, pairs: int, seed0: int, log) -> dict:
    """Positive control (a): a pair sampled with joint decoder self-attention, one prompt naming the
    subject's appearance and the other only its shape, at two positions (as in training). Agreement:
    the two subjects show the same colour set. Then the same with those layers' values zeroed, and
    the two sampled independently."""
    import torch
    from miniworld import controls, measure, world

    gen = torch.Generator().manual_seed(seed0)
    variants = {
        "independent": runner.model,
        "joint": controls.pair_model(runner.model),
        "joint-zero-values": controls.pair_model(runner.model, zero_values=True),
    }
    stats: dict[str, dict[str, list]] = {k: {"agree": [], "hist_dist": []} for k in variants}
    subjects: dict[str, list] = {k: [] for k in variants}  # (rgb, mask) of each pair's two images
    for i in range(pairs):
        subject = world.random_subject(gen)
        pa, pb = random.Random(seed0 + i).sample(world.POSITIONS, 2)
        described = " ".join([*subject.words(), pb])
        texts = (f"{subject.shape} {pa}", described)
        cond = [[torch.cat([runner.encode(t)[0][0] for t in texts]), {}]]
        seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
        for name, m in variants.items():
            rgb = world.latent_to_rgb(runner.sample(m, seed, cond, batch=2).float())
            da, db = measure.describe(rgb[0], runner.palette), measure.describe(rgb[1], runner.palette)
            stats[name]["agree"].append(float(bool(da["colours"]) and da["colours"] == db["colours"]))
            stats[name]["hist_dist"].append(
                measure.hist_dist(rgb[0], da["mask"], rgb[1], db["mask"], runner.palette)
            )
            subjects[name].append(((rgb[0], da["mask"]), (rgb[1], db["mask"])))
        log(
            f"  pair {i + 1}/{pairs} ({texts[0]} | {texts[1]}): "
            + ", ".join(f"{k} agree {sum(v['agree']) / len(v['agree']):.2f}" for k, v in stats.items())
        )
    out = {
        k: {m: {"mean": sum(v) / len(v), "ci95": bootstrap_ci(v)} for m, v in s.items()}
        for k, s in stats.items()
    }
    joint, zero, alone = (out[k]["hist_dist"] for k in ("joint", "joint-zero-values", "independent"))
    # the first form, kept for comparison with earlier trainings: the joint pair is closer than an
    # independent one, and the zeroed pair is at least as far apart as an independent one
    out["pass_vs_independent"] = bool(
        joint["ci95"][1] < alone["ci95"][0] and zero["mean"] >= alone["ci95"][0]
    )
    out["rule_vs_independent"] = (
        "histogram distance between the two subjects: joint's 95% interval below independent's, "
        "and zeroed values at least independent's lower bound"
    )
    # the like-for-like form the verdict uses: each pair's first subject against the next pair's second
    n = len(subjects["joint"])  # at least 2: main refuses --pairs 1
    gaps = {}
    for name, seen in subjects.items():
        across = [measure.hist_dist(*seen[i][0], *seen[(i + 1) % n][1], runner.palette) for i in range(n)]
        gaps[name] = pair_gap(stats[name]["hist_dist"], across)
    out["like_for_like"] = gaps
    out["pass"] = control_a_passes(gaps["joint"], gaps["joint-zero-values"])
    out["rule"] = (
        "across - within histogram distance (a pair's subjects against the next pair's, same condition): "
        "joint's 95% interval above 0, and the zeroed pair's holds 0"
    )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description="A miniature Table 5 on the miniature world's model.")
    ap.add_argument("--cases", type=Path, default=REPO / "benchmarks" / "fidelity_cases" / "heldout.json")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "out" / "fidelity")
    ap.add_argument("--weights", default="miniworld.safetensors")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=4.0)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--pairs", type=int, default=24, help="pairs for positive control (a); 0 skips it")
    ap.add_argument("--max-cases", type=int, default=0)
    ap.add_argument("--max-seeds", type=int, default=0, help="use only the first N seeds of each case")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.pairs == 1:
        ap.error("control (a) compares pairs with one another: give --pairs 2 or more, or 0 to skip it.")
    methods = [m for m in args.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS + OPTIONAL]
    if bad or "baseline" not in methods:
        ap.error(f"--methods must include baseline and come from {METHODS + OPTIONAL}; got {bad or methods}")
    cases = load_cases(args.cases)[: args.max_cases or None]
    args.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t_start:7.1f} s] {msg}", flush=True)

    import torch
    from miniworld import measure, world

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_seeds:
        cases = [dict(c, seeds=c["seeds"][: args.max_seeds]) for c in cases]
    with tempfile.TemporaryDirectory() as tmp:
        runner = Runner(args.weights, args.steps, args.cfg, Path(tmp))
        controls_out = {}
        if args.pairs:
            log(f"positive control (a): {args.pairs} pairs")
            controls_out["a_pair_consistency"] = run_pairs(runner, args.pairs, 1000, log)
        rows: dict[str, list[dict]] = {m: [] for m in methods}
        grid_rows = []
        for ci, case in enumerate(cases):
            r = case["reference"]
            scene = world.random_scene(
                torch.Generator().manual_seed(int(case.get("render_seed", 0))),
                world.Subject(r["shape"], r["texture"], tuple(r["colours"])),
                r["position"],
            )
            ref_rgb = world.render(scene, palette=runner.palette)
            ref_desc = measure.describe(ref_rgb, runner.palette)
            ref = runner.invert(world.rgb_to_latent(ref_rgb[None]), " ".join(scene.prompt()))
            target_text = " ".join(case["target"])
            shape = next(w for w in case["target"] if w in world.SHAPES)
            pos = runner.encode(target_text)
            if "prompted" in methods:
                told = runner.encode(" ".join([*r["colours"], r["texture"], *case["target"]]))
            models = runner.models(ref, target_text, shape)
            for si, seed in enumerate(case["seeds"]):
                images = {}
                base_desc = None
                for m in methods:
                    if m == "baseline":
                        lat = runner.sample(runner.model, seed, pos)
                    elif m == "prompted":
                        lat = runner.sample(runner.model, seed, told)
                    elif m.startswith("ama-mg-"):
                        lat = runner.guided(
                            models["ama-mask"], ref, seed, pos, m.split("-")[-1], models["_match"]
                        )
                    else:
                        lat = runner.sample(models[m], seed, pos)
                    rgb = world.latent_to_rgb(lat.float().cpu())[0]
                    row = measure_sample(rgb, ref_desc, ref_rgb, base_desc, case["target"], runner.palette)
                    if m == "baseline":
                        base_desc = measure.describe(rgb, runner.palette)
                    row.update(case=ci, seed=seed)
                    rows[m].append(row)
                    images[m] = rgb
                if si == 0:
                    grid_rows.append([ref_rgb] + [images[m] for m in methods])
            log(
                f"case {ci + 1}/{len(cases)} ({target_text} ← {' '.join(scene.prompt())}): "
                + ", ".join(
                    f"{m} colour {sum(x['colour_set_ok'] for x in rows[m]) / len(rows[m]):.2f}"
                    for m in methods
                )
            )

    summary = {m: {k: _mean([x[k] for x in rs]) for k in MEASURES} for m, rs in rows.items()}
    ci95 = {
        m: {k: bootstrap_ci([x[k] for x in rs if x[k] == x[k]]) for k in MEASURES} for m, rs in rows.items()
    }
    if "kv" in rows:
        controls_out["b_kv_transfer"] = control_b(summary["kv"]["colour_set_ok"], ci95["kv"]["colour_set_ok"])
    ok = all(c.get("pass", False) for c in controls_out.values()) if controls_out else None
    result = {
        "controls": controls_out,
        "controls_pass": ok,
        "methods": summary,
        "ci95": ci95,
        "n_samples": {m: len(rs) for m, rs in rows.items()},
        "cases": str(args.cases),
        "settings": {
            "steps": args.steps,
            "cfg": args.cfg,
            "sampler": "ddim",
            "scheduler": "ddim_uniform",
            "weights": args.weights,
            "weights_sha256": runner.weights_sha256,
            "palette": runner.palette,
        },
        "seconds": round(time.time() - t_start, 1),
        "samples": rows,
    }
    (args.out / "fidelity.json").write_text(json.dumps(result, indent=1))
    md = markdown(result, methods)
    (args.out / "fidelity.md").write_text(md)
    save_grid(grid_rows, args.out / "grid.png")
    print(md)
    print(f"wrote {args.out / 'fidelity.json'}, fidelity.md and grid.png in {time.time() - t_start:.0f} s")
    return 0


def _mean(values: list[float]) -> float:
    vals = [v for v in values if v == v]
    return sum(vals) / len(vals) if vals else float("nan")


def markdown(result: dict, methods: list[str]) -> str:
    lines = []
    c = result["controls"]
    if c:
        lines.append(
            "Positive controls"
            + (
                ""
                if result["controls_pass"]
                else " — **FAILED: the model is not an instrument for this method**"
            )
        )
        lines.append("")
        if "a_pair_consistency" in c:
            a = c["a_pair_consistency"]
            lines.append("| (a) pair sampling | appearance agreement | histogram distance between the two |")
            lines.append("|---|---|---|")
            for k in ("independent", "joint", "joint-zero-values"):
                ag, hd = a[k]["agree"], a[k]["hist_dist"]
                lines.append(f"| {k} | {_fmt(ag['mean'], ag['ci95'])} | {_fmt(hd['mean'], hd['ci95'])} |")
            lines.append("")
            lines.append("| (a) like for like | within the pair | across pairs | across − within |")
            lines.append("|---|---|---|---|")
            for k, g in a["like_for_like"].items():
                lines.append(
                    f"| {k} | {g['within']:.2f} | {g['across']:.2f} | {_fmt(g['gap'], g['ci95'])} |"
                )
            lines.append(f"\n(a) {'passed' if a['pass'] else 'FAILED'} ({a['rule']}).")
            lines.append(
                f"The first form of (a) {'passed' if a['pass_vs_independent'] else 'failed'} "
                f"({a['rule_vs_independent']})."
            )
        if "b_kv_transfer" in c:
            b = c["b_kv_transfer"]
            lines.append(
                f"(b) {'passed' if b['pass'] else 'FAILED'}: key/value replacement transfers the colour set "
                f"in {_fmt(b['colour_set_ok'], b['ci95'])} of samples ({b['rule']})."
            )
        lines.append("")
    lines.append("| method | " + " | ".join(MEASURES) + " |")
    lines.append("|---|" + "---|" * len(MEASURES))
    for m in methods:
        lines.append(
            f"| {m} | "
            + " | ".join(_fmt(result["methods"][m][k], result["ci95"][m][k]) for k in MEASURES)
            + " |"
        )
    n = result["n_samples"].get("baseline", 0)
    lines.append(f"\n{n} samples per method (cases × seeds); 95% bootstrap intervals; {result['settings']}.")
    return "\n".join(lines) + "\n"


def _fmt(mean: float, ci) -> str:
    return f"{mean:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def save_grid(rows: list, path: Path, scale: int = 4) -> None:
    """reference | each method, one row per case (its first seed), enlarged ``scale``×."""
    import numpy as np
    import torch
    from PIL import Image

    if not rows:
        return
    pad = torch.ones(3, 32, 2)
    lines = [torch.cat([torch.cat([img, pad], dim=2) for img in r], dim=2) for r in rows]
    grid = torch.cat([torch.cat([ln, torch.ones(3, 2, ln.shape[2])], dim=1) for ln in lines], dim=1)
    arr = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


if __name__ == "__main__":
    raise SystemExit(main())
