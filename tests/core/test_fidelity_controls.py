"""Control (a) of the fidelity benchmark, read like for like (pure arithmetic, no model).

The zeroed-value pair is two independent samples of a damaged model, so the verdict compares each
condition's within-pair distance with its own across-pair distance, never with another condition's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fidelity as F  # noqa: E402


def test_pair_gap_is_the_mean_of_across_minus_within_with_an_interval_around_it():
    g = F.pair_gap([0.2, 0.3, 0.1, 0.4], [0.6, 0.6, 0.5, 0.7])
    assert g["within"] == pytest.approx(0.25)
    assert g["across"] == pytest.approx(0.6)
    assert g["gap"] == pytest.approx(0.35)
    lo, hi = g["ci95"]
    assert 0.3 - 1e-9 <= lo <= 0.35 <= hi <= 0.4 + 1e-9


def test_pair_gap_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError, match="3 within-pair distances but 2 across-pair"):
        F.pair_gap([0.1, 0.2, 0.3], [0.5, 0.6])


def test_a_damaged_model_whose_images_all_look_alike_passes_the_zeroed_arm():
    # Zeroed values make every subject similar (small distances everywhere) but not paired: the
    # first form of (a) read that as "still consistent"; like for like it is no gap at all.
    joint = F.pair_gap([0.2, 0.3, 0.25, 0.2, 0.3, 0.25], [0.7, 0.8, 0.75, 0.7, 0.8, 0.7])
    zeroed = F.pair_gap([0.3, 0.35, 0.4, 0.3, 0.35, 0.4], [0.35, 0.3, 0.4, 0.4, 0.3, 0.35])
    assert F.control_a_passes(joint, zeroed)


def test_control_a_fails_when_zeroing_leaves_the_pair_closer_than_unrelated_subjects():
    joint = F.pair_gap([0.2, 0.3, 0.25, 0.2], [0.7, 0.8, 0.75, 0.7])
    still_paired = F.pair_gap([0.3, 0.35, 0.3, 0.35], [0.6, 0.7, 0.65, 0.6])
    assert not F.control_a_passes(joint, still_paired)


def test_control_a_fails_when_joint_sampling_does_not_bring_the_pair_together():
    no_effect = F.pair_gap([0.6, 0.7, 0.8, 0.5], [0.7, 0.6, 0.5, 0.8])
    zeroed = F.pair_gap([0.6, 0.7, 0.8, 0.5], [0.7, 0.6, 0.5, 0.8])
    assert not F.control_a_passes(no_effect, zeroed)
