"""Per-step AMA diagnostics during sampling: recorded, logged, shown.

The figures (confidence coverage, mask area, gate > 0.5) are checked against an independent
computation from the patch's own "match" events, against known answers (self-reference: 1/1/1; a
zero MASK: mask area 0 and gate 0), in the DEBUG log, and on the user-facing outputs (the AMA
Diagnostics node, its graph ui payload with the plot legend, the labelled plot image, and the Matching
Guidance Sampler's ui text).
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_ama import STEPS, holder_of, patch, replay, tiny_ama_graph

SUBJECT = (2, 3)


@pytest.fixture(scope="module")
def ref_sd15(dm, tiny):
    model = tiny.build("sd15", seed=1)
    with torch.inference_mode():
        out = dm("nodes.node_invert").InvertReference.execute(model, tiny.latent(3, 16, 16), tiny.cond(1),
                                                            steps=STEPS)
    return model, out.result[0]


def _independent_figures(events):
    """step -> (coverage, mask area, gate>0.5) from the "match" events of cond row 0 at the finest grid."""
    best: dict[int, tuple[int, tuple[float, float, float]]] = {}
    for call, chunk, row, m in events:
        if call.slots[chunk] != (0, 0) or row != 0:
            continue
        area = m.confidence.shape[-1] * m.confidence.shape[-2]
        conf, mask = m.confidence.double(), m.mask.double()
        figs = (conf.mean().item(), mask.mean().item(), ((conf * mask) > 0.5).double().mean().item())
        if area >= best.get(call.step, (0, None))[0]:
            best[call.step] = (area, figs)
    return {s: f for s, (_, f) in sorted(best.items())}


def test_figures_match_an_independent_computation_and_the_debug_log(dm, tiny, ref_sd15, sample, caplog):
    model, ref = ref_sd15
    p = patch(dm, model, ref, start_percent=0.0, match=dm("nodes.config").MatchConfig(subject_tokens=SUBJECT))
    events = []
    holder_of(dm, p).observers.append(
        lambda ev, **k: ev == "match" and events.append((k["call"], k["chunk"], k["row"], k["match"])))
    with caplog.at_level(logging.DEBUG, logger="dreammatcher"):
        sample(p, tiny.cond(7), tiny.cond(6), tiny.latent(4), steps=STEPS, seed=3, cfg=5.0)
    runs, steps = dm("nodes.ama").last_diagnostics(p)
    expected = _independent_figures(events)
    print("\nAMA diagnostics (tiny SD1.5, subject tokens 2-3):")
    for s in steps:
        print(f"  step {s.step} sigma {s.sigma:.3f}: coverage {s.confidence_coverage:.3f}, mask area "
              f"{s.mask_area:.3f}, gate>0.5 {s.gate_above_half:.3f}")
    assert runs == 1
    # the window starts at step 0, which has no previous-step features: steps 1..STEPS-1 are matched
    assert [s.step for s in steps] == list(range(1, STEPS)) == list(expected)
    for s in steps:
        got = (s.confidence_coverage, s.mask_area, s.gate_above_half)
        assert got == pytest.approx(expected[s.step], abs=1e-6), s
        assert s.rows == 1
        assert 0.0 < s.mask_area < 1.0  # a soft subject mask, not the whole image
    assert len({s.confidence_coverage for s in steps}) > 1  # real per-step figures, not one constant
    lines = [r.getMessage() for r in caplog.records
             if r.levelno == logging.DEBUG and " step " in r.getMessage()]
    assert len(lines) == STEPS - 1
    assert f"confidence coverage {steps[0].confidence_coverage:.3f}" in lines[0]
    assert f"gate>0.5 {steps[-1].gate_above_half:.3f}" in lines[-1]
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert any(f"{STEPS - 1} matched steps" in m for m in summary)
    # a second run counts as run 2 and replaces the figures
    sample(p, tiny.cond(7), tiny.cond(6), tiny.latent(4), steps=STEPS, seed=3, cfg=5.0)
    assert dm("nodes.ama").last_diagnostics(p)[0] == 2


def test_known_answers_self_reference_and_zero_mask(dm, tiny, ref_sd15, sample):
    model, ref = ref_sd15
    traj = ref.trajectory
    xs = [traj.latents[i] for i in range(traj.steps)]
    rt = dm("nodes.ama")
    # Self-reference without a subject: identity flow (cycle error 0), mask 1 -> every figure is 1.
    p = patch(dm, model, ref, start_percent=0.0)
    replay(p, ref.positive, ref.negative, xs, traj.sigmas)
    _, steps = rt.last_diagnostics(p)
    assert len(steps) == STEPS - 1
    for s in steps:
        assert (s.confidence_coverage, s.mask_area, s.gate_above_half) == (1.0, 1.0, 1.0), s
    # A zero user MASK: nothing is gated in.
    z = patch(dm, model, ref, start_percent=0.0, mask=torch.zeros(1, 16, 16))
    sample(z, tiny.cond(7), tiny.cond(6), tiny.latent(4), steps=STEPS, seed=3)
    _, steps = rt.last_diagnostics(z)
    assert steps and all(s.mask_area == 0.0 and s.gate_above_half == 0.0 for s in steps)
    # batch of 2: both rows are recorded and averaged
    b = patch(dm, model, ref, start_percent=0.0)
    sample(b, tiny.cond(7), tiny.cond(6), tiny.latent(4, 16, 16, 2), steps=STEPS, seed=3)
    assert all(s.rows == 2 for s in rt.last_diagnostics(b)[1])


def legend_of(dm) -> list[str]:
    nd = dm("nodes.node_diagnostics")
    return [nd.AXES_TEXT, *dm("dreammatcher_core.diagnostics").legend_entries()]


def _ink(img: torch.Tensor, box) -> int:
    """Dark grey pixels (text, not the coloured lines) inside ``box`` of an IMAGE."""
    left, top, right, bottom = (int(v) for v in box)
    region = img[0, top:bottom, left:right]
    grey = (region.amax(-1) - region.amin(-1)) < 0.15
    return int(((region.mean(-1) < 0.55) & grey).sum())


def _inner(chart):
    left, top, right, bottom = chart.area
    return left + 5, top + 5, right - 5, bottom - 5


def _check_plot(dm, plot: torch.Tensor, patched) -> None:
    """The node's IMAGE is the labelled chart of the run's figures: text in every label area, and each
    figure's line through its value at each step (a colour within reach of the point)."""
    runs, steps = dm("nodes.ama").last_diagnostics(patched)
    chart = dm("nodes.node_diagnostics").diagnostics_chart(steps, runs)
    assert torch.equal(chart.image, plot)
    for part in ("title", "legend", "x_label", "y_label", "x_ticks", "y_ticks"):
        assert _ink(plot, chart.boxes[part]) > 15, part
    core = dm("dreammatcher_core.diagnostics")
    for name, colour in zip(core.FIGURES, core.COLOURS, strict=True):
        c = torch.tensor(colour)
        for s in steps:
            x, y = chart.to_pixel(s.step, getattr(s, name))
            near = plot[0, max(0, int(y) - 3):int(y) + 4, max(0, int(x) - 3):int(x) + 4].reshape(-1, 3)
            assert float((near - c).abs().max(-1).values.min()) < 0.1, (name, s)


def test_diagnostics_node(dm, tiny, ref_sd15, sample):
    model, ref = ref_sd15
    node = dm("nodes.node_diagnostics").AMADiagnostics
    lat = tiny.latent(4)
    with pytest.raises(ValueError, match="AMA Model Patch"):
        node.execute(model, lat)
    p = patch(dm, model, ref, start_percent=0.0)
    before = node.execute(p, lat)
    assert "not sampled yet" in before.result[1]
    assert before.ui["legend"] == legend_of(dm)  # the legend is there before any run, too
    empty = dm("nodes.node_diagnostics").diagnostics_chart([], 0)
    assert torch.equal(before.result[2], empty.image) and _ink(empty.image, _inner(empty)) > 20  # the note
    samples = sample(p, tiny.cond(7), tiny.cond(6), lat, steps=STEPS, seed=3)
    out = node.execute(p, {"samples": samples})
    latent, report, plot = out.result
    assert latent["samples"] is samples  # passed through unchanged
    assert report.startswith("AMA run #1: 7 matched steps (1..7)")
    assert len(report.splitlines()) == 2 + STEPS - 1
    assert plot.shape == (1, 320, 512, 3) and 0 <= float(plot.min()) and float(plot.max()) <= 1
    legend = out.ui["legend"]
    assert out.ui["text"] == [report] and out.ui["images"]
    assert legend[0].startswith("Plot: x = sampling step, y = fraction of the target grid")
    assert [e.split(" (")[0] for e in legend[1:]] == ["blue: confidence coverage", "orange: mask area",
                                                      "green: gate > 0.5"]
    _check_plot(dm, plot, p)
    # strength 0: a clear "nothing was injected" with the reason
    p0 = patch(dm, model, ref, strength=0.0)
    sample(p0, tiny.cond(7), tiny.cond(6), lat, steps=STEPS, seed=3)
    text = node.execute(p0, lat).result[1]
    assert "nothing was injected" in text and "strength" in text


def test_graph_ui_and_guidance_sampler_text(run_graph, dm):
    common = tiny_ama_graph()
    ks = dict(common)
    ks["7"] = {"class_type": "KSampler", "inputs": {
        "model": ["6", 0], "positive": ["3", 0], "negative": ["2", 0], "latent_image": ["4", 0],
        "seed": 7, "steps": STEPS, "cfg": 5.0, "sampler_name": "ddim", "scheduler": "ddim_uniform",
        "denoise": 1.0}}
    ks["8"] = {"class_type": "DM_AMADiagnostics", "inputs": {"model": ["6", 0], "latent": ["7", 0]}}
    out = run_graph(ks)
    text = out["8"]["text"][0]
    print("\n" + text)
    # start 0.08 of 8 ddim_uniform steps: steps 1..7 are active; step 1 has step 0's features
    assert text.startswith("AMA run #1: 7 matched steps (1..7)")
    assert out["8"]["images"][0]["type"] == "temp"
    # the legend reaches the frontend as strings of their own; the panel's text is the report alone
    assert out["8"]["legend"] == legend_of(dm) and out["8"]["text"] == [text]
    mg = dict(common)
    mg["7"] = {"class_type": "DM_MatchingGuidanceSampler", "inputs": {
        "model": ["6", 0], "reference": ["5", 0], "seed": 7, "steps": STEPS, "cfg": 5.0,
        "scheduler": "ddim_uniform", "positive": ["3", 0], "negative": ["2", 0], "latent_image": ["4", 0],
        "denoise": 1.0, "guidance_scale": 10.0, "guidance_start": 0.08, "guidance_end": 1.0, "mode": "fast"}}
    mg["8"] = {"class_type": "PreviewAny", "inputs": {"source": ["7", 0]}}
    out = run_graph(mg)
    assert out["7"]["text"][0].startswith("AMA run #")
    assert "matched steps" in out["7"]["text"][0]
