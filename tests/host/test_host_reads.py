"""Reads back to the host during AMA sampling (GPU synchronisations), and the one NaN/Inf check per
step that replaced the per-layer ones.

The counter is ``benchmarks/host_reads.py`` (its own behaviour is tested in the core tier). The bound
below is what the pack needs per step on the tiny SD1.5 layout: the timestep read that places a UNet
call in the schedule, the descriptor's finite check, and the exact tie resolution's counts. A change that
reads a value per attention layer, per row or per PCA again pushes it over.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import host_reads as H  # noqa: E402

STEPS = 6
#: Pack reads per sampling step allowed on the tiny SD1.5 layout (measured: see the module docstring).
MAX_PACK_READS_PER_STEP = 12


def _mark_host(cond: list) -> list:
    for c in cond:
        setattr(c[0], H._HOST, True)  # ComfyUI keeps CONDITIONING in host memory on a GPU run
    return cond


def test_ama_sampling_reads_back_a_bounded_number_of_values_per_step(host, dm, tiny, sample):
    model = tiny.build("sd15", seed=1)
    pos, neg, ref_pos = (_mark_host(tiny.cond(s)) for s in (5, 6, 1))
    counter = H.HostReadCounter(H.pack_roots(host.pack_module))
    counter.recording = False
    with counter:
        with torch.inference_mode():
            ref = dm("nodes.node_invert").InvertReference.execute(model, tiny.latent(3), ref_pos,
                                                                  steps=STEPS).result[0]
        patched = dm("nodes.ama").patch_model(model, ref, start_percent=0.0)
        sample(patched, pos, neg, tiny.latent(4), steps=STEPS)  # warm-up
        counter.recording = True
        sample(patched, pos, neg, tiny.latent(4), steps=STEPS)
    stats = dm("nodes.ama").patch_of(patched).last_stats
    steps = len(stats["active_steps"])  # every sampling step (ddim_uniform may add one to STEPS)
    assert steps >= STEPS and stats["descriptors"] > 0
    per_step = counter.pack / steps
    print(f"pack host reads per step: {per_step:.2f}; sites: {dict(counter.sites)}")
    assert 0 < per_step <= MAX_PACK_READS_PER_STEP, dict(counter.sites)


def test_non_finite_features_raise_one_clear_error_at_the_next_step(dm):
    correspond = dm("nodes.ama.correspond")
    stats = {"descriptors": 0, "flows": 0, "prefetched": 0}
    cache = correspond.CorrespondenceCache((5, 8), 8, [3.0, 2.0, 1.0, 0.0], stats)
    g = torch.Generator().manual_seed(0)
    feats = {5: torch.randn(1, 16, 4, 4, generator=g), 8: torch.randn(1, 16, 8, 8, generator=g)}
    bad = {5: feats[5].clone(), 8: feats[8].clone()}
    bad[8][0, 3, 2, 2] = math.nan
    cache.ref_feats[0] = {0: feats}
    cache.tgt_feats[0] = {((0, 0), 0): feats, ((0, 0), 1): bad}
    assert cache.get(1, (0, 0), 0, (8, 8), (8, 8)) is not None
    cache.begin_step(2)  # finite so far: nothing to report
    cache.ref_feats[1] = {0: feats}
    cache.tgt_feats[1] = {((0, 0), 1): bad}
    with pytest.raises(ValueError, match="NaN or Inf"):
        cache.get(2, (0, 0), 1, (8, 8), (8, 8))  # the eigen-solver may already fail on NaN
        cache.begin_step(3)  # otherwise the deferred check reports it here
