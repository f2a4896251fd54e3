"""Tests for dreammatcher_core.diagnostics: per-step gate figures with known answers."""

from __future__ import annotations

import pytest
import torch

from dreammatcher_core import diagnostics as D


def _maps():
    """4x4 maps with hand-countable figures: conf covers 12 of 16 cells, mask 0.75 on 8 cells."""
    conf = torch.ones(1, 1, 4, 4)
    conf[..., 0, :] = 0.0  # first row unconfident
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :, :2] = 0.75  # left half
    return conf, mask


def test_gate_figures_known_answer():
    conf, mask = _maps()
    cov, area, gate = D.gate_figures(conf, mask).tolist()
    assert cov == pytest.approx(12 / 16)
    assert area == pytest.approx(0.75 * 8 / 16)
    # gate = conf*mask > 0.5 on the left half minus the first row: 2 columns x 3 rows
    assert gate == pytest.approx(6 / 16)
    # the threshold is strict: a gate of exactly 0.5 is not "above half"
    assert D.gate_figures(torch.ones(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.5))[2] == 0.0
    with pytest.raises(ValueError, match="share"):
        D.gate_figures(conf, torch.ones(1, 1, 2, 2))


def test_step_log_replaces_and_averages_rows():
    log = D.StepLog()
    a = torch.tensor([1.0, 0.5, 0.25])
    b = torch.tensor([0.0, 0.5, 0.75])
    log.record(3, 0, 2.5, torch.tensor([9.0, 9.0, 9.0]))
    log.record(3, 0, 2.5, a)  # the same (step, row) again: replaces
    log.record(3, 1, 2.5, b)
    log.record(1, 0, 7.0, b)
    assert len(log) == 3
    s = log.summary()
    assert [x.step for x in s] == [1, 3]  # step order, not insertion order
    assert s[0].sigma == 7.0 and s[0].rows == 1
    assert (s[1].confidence_coverage, s[1].mask_area, s[1].gate_above_half) == (0.5, 0.5, 0.5)
    assert s[1].rows == 2
    assert s[1].as_dict()["gate_above_half"] == 0.5
    assert D.StepLog().summary() == []


def test_step_log_keeps_the_finest_grid():
    log = D.StepLog()
    fine, coarse, fine2 = torch.ones(3), torch.zeros(3), torch.full((3,), 0.5)
    log.record(2, 0, 1.0, fine, cells=64 * 64)
    log.record(2, 0, 1.0, coarse, cells=32 * 32)  # a coarser grid after a finer one: ignored
    assert log.summary()[0].confidence_coverage == 1.0
    log.record(2, 0, 1.0, fine2, cells=64 * 64)  # the same grid again: replaces
    assert log.summary()[0].confidence_coverage == 0.5


def test_format_table_and_summary():
    steps = [D.StepFigures(2, 9.5, 0.8, 0.25, 0.2, 1), D.StepFigures(4, 3.25, 0.6, 0.75, 0.4, 1)]
    text = D.format_table(steps)
    lines = text.splitlines()
    assert lines[0] == ("2 matched steps (2..4): mean confidence coverage 70.0%, mask area 50.0%, "
                        "gate > 0.5 30.0%")
    assert len(lines) == 4 and lines[2].split() == ["2", "9.5000", "80.0%", "25.0%", "20.0%"]
    assert D.format_table([]) == "no step was matched"


def test_curves_legend_and_sigma_span_describe_the_plot():
    steps = [D.StepFigures(2, 9.5, 0.8, 0.25, 0.2, 1), D.StepFigures(4, 0.03125, 0.6, 0.75, 0.4, 1)]
    got = D.curves(steps)
    assert [label for label, _, _ in got] == ["confidence coverage", "mask area", "gate > 0.5"]
    assert [values for _, _, values in got] == [[0.8, 0.6], [0.25, 0.75], [0.2, 0.4]]
    assert [colour for _, colour, _ in got] == list(D.COLOURS)
    assert D.curves([]) == [(label, colour, []) for label, colour in zip(D.LABELS, D.COLOURS, strict=True)]
    legend = D.legend_entries()
    assert len(legend) == 3
    assert legend[0].startswith("blue: confidence coverage (") and "cycle-consistent" in legend[0]
    assert legend[1].startswith("orange: mask area (") and legend[2].startswith("green: gate > 0.5 (")
    # the legend names the figures exactly as the summary line does
    summary = D.format_summary(steps)
    assert all(label in summary for label in D.LABELS)
    assert D.sigma_span(steps) == "sigma 9.5 to 0.0312"
    assert D.sigma_span(steps[:1]) == "sigma 9.5" and D.sigma_span([]) == ""
