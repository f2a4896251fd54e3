"""Where an AMA sampling run spends its time (``make profile``), measured with ``cProfile``.

One process, the benchmark's model (``bench_sampling.build_model``), one inversion, then one plain
sampling and one AMA sampling under the profiler. Prints the wall time of both and, for AMA, the
cumulative time of the pack's stages: the reference pass, the target pass, matching (descriptor =
joint PCA, flows, cycle error, confidence), the warp and injection of values, and the subject
mask. The figures are cumulative and nest (the target pass contains the injection), so they
do not add up; each is also given per sampling step and as a share of one plain step.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_sampling as bs  # noqa: E402

#: (label, function name, file suffix) of the stages reported, matched in the profile's entries.
STAGES = [
    ("reference pass (UNet)", "reference_pass", "ama/refpass.py"),
    ("target pass (UNet + hooks)", "apply_model", "ama/patch.py"),
    ("matching: descriptor (joint PCA)", "descriptor", "ama/correspond.py"),
    ("matching: PCA eigendecomposition", "pca_basis", "dreammatcher_core/features.py"),
    ("matching: argmax flows", "argmax_flows", "dreammatcher_core/matching.py"),
    ("matching: cycle error", "cycle_error", "dreammatcher_core/matching.py"),
    ("matching: confidence", "confidence", "dreammatcher_core/matching.py"),
    ("AMA: warp reference values", "warp_tokens", "dreammatcher_core/matching.py"),
    ("AMA: inject values", "inject_values", "dreammatcher_core/ama.py"),
    ("AMA: self-attention hook", "on_self_attn", "ama/run.py"),
    ("mask: subject cross-attention", "on_cross_attn", "ama/run.py"),
    ("features: output-block capture", "on_output_block", "ama/run.py"),
]


def _stage_times(stats: pstats.Stats) -> dict[str, float]:
    out = {}
    for label, func, suffix in STAGES:
        total = 0.0
        for (path, _line, name), (_cc, _nc, _tt, ct, _callers) in stats.stats.items():
            if name == func and path.replace("\\", "/").endswith(suffix):
                total += ct
        out[label] = total
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--bank-mib", type=float, default=0.0, help="reference bank budget (0: off)")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()

    pack = bs.boot(Path(tempfile.mkdtemp(prefix="dm-profile-")))
    import comfy.sample
    import torch

    dm = lambda sub: importlib.import_module(f"{pack}.{sub}")  # noqa: E731
    model = bs.build_model(a.width)
    lat = a.size // 8
    ref_latent = {"samples": torch.randn(1, 4, lat, lat, generator=torch.Generator().manual_seed(1)) * 0.8}
    x = torch.zeros(a.batch, 4, lat, lat)
    pos, neg, ref_pos = (bs.make_cond(s, "narrow", a.size) for s in (2, 3, 4))
    match = dm("nodes.config").MatchConfig(subject="sks dog", subject_tokens=(4, 5))

    def sample(m):
        noise = comfy.sample.prepare_noise(x, 0)
        with torch.inference_mode():
            return comfy.sample.sample(m, noise, a.steps, 7.5, "ddim", "ddim_uniform", pos, neg, x, seed=0,
                                       disable_pbar=True)

    with torch.inference_mode():
        ref = dm("nodes.node_invert").InvertReference.execute(model, ref_latent, ref_pos, steps=a.steps)[0]
    patched = dm("nodes.ama").patch_model(model, ref, 1.0, 0.08, 1.0, match=match, bank_mib=a.bank_mib)
    sample(model)  # warm-up (loads the model)
    if a.bank_mib:
        sample(patched)  # fills the bank
    t0 = time.perf_counter()
    sample(model)
    vanilla = time.perf_counter() - t0
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    sample(patched)
    prof.disable()
    ama = time.perf_counter() - t0
    st = dm("nodes.ama").patch_of(patched).last_stats
    step = vanilla / a.steps
    print(f"narrow SD1.5 width {a.width}, {a.size}², batch {a.batch}, {a.steps} DDIM steps, cfg 7.5, "
          f"{torch.get_num_threads()} threads; bank {a.bank_mib:g} MiB")
    print(f"vanilla {vanilla:.2f} s ({step:.3f} s/step); AMA {ama:.2f} s under cProfile "
          f"({ama / vanilla:.2f}x); {len(st['active_steps'])} active steps, {st['ref_passes']} reference "
          f"passes, {st.get('bank_hits', 0)} bank hits")
    print("| stage | total (s) | per step (s) | share of a plain step |")
    print("|---|---|---|---|")
    for label, t in _stage_times(pstats.Stats(prof)).items():
        print(f"| {label} | {t:.3f} | {t / a.steps:.4f} | {t / a.steps / step:.1%} |")


if __name__ == "__main__":
    main()
