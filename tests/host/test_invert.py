"""DM_InvertReference on the in-process host with tiny SD1.5/SDXL-layout models."""

from __future__ import annotations

import pytest
import torch


def invert(dm, model, latent, positive, **kw):
    """Run the node like the executor does (inference mode); return (reference, noise, rec, ui_text)."""
    node = dm("nodes.node_invert").InvertReference
    with torch.inference_mode():
        out = node.execute(model, latent, positive, **kw)
    ref, noise, rec = out.args
    return ref, noise, rec, out.ui.value


@pytest.mark.parametrize("layout,scheduler,steps", [
    ("sd15", "ddim_uniform", 4), ("sd15", "normal", 3), ("sd15", "karras", 3), ("sdxl", "simple", 2),
])
def test_schedule_is_bit_identical_to_ksampler(dm, tiny, layout, scheduler, steps):
    import comfy.samplers

    model = tiny.build(layout, 1)
    ref, *_ = invert(dm, model, tiny.latent(3), tiny.cond(1), steps=steps, scheduler=scheduler)
    cpu = torch.device("cpu")
    expected = comfy.samplers.KSampler(model, steps, cpu, sampler="ddim", scheduler=scheduler).sigmas
    traj = ref.trajectory
    assert traj.sigmas.dtype == torch.float32 and torch.equal(traj.sigmas, expected)
    assert traj.latents.shape == (steps + 1, 1, 4, 16, 16)
    assert traj.meta["steps"] == steps and traj.meta["scheduler"] == scheduler
    host = dm("nodes.host.sampling")
    for s in ("ddim_uniform", "normal", "karras", "exponential", "sgm_uniform", "beta"):
        for n in (1, 10, 50):
            ks = comfy.samplers.KSampler(model, n, torch.device("cpu"), sampler="ddim", scheduler=s).sigmas
            assert torch.equal(host.schedule_sigmas(model, n, s), ks), (s, n)


def test_reconstruction_error_is_within_one_percent_at_50_steps(dm, tiny):
    model = tiny.build("sd15", 1)
    # A reference with the statistics of a VAE-encoded image: unit variance in model space (that
    # is what SD's latent scale factor 0.18215 is chosen for). A raw N(0,1) VAE-space latent is
    # 5.5x smaller than any real image's and inflates the *relative* error of the random model.
    latent = {"samples": tiny.latent(3)["samples"] / 0.18215}
    ref, noise, rec, text = invert(dm, model, latent, tiny.cond(1), steps=50)
    traj = ref.trajectory
    err = traj.meta["recon_error"]
    print(f"\nreconstruction error, tiny SD1.5 layout, 50 steps ddim_uniform, cfg 1: {err:.4%}")
    assert err <= 0.01
    # The error is honest: recompute it from the returned reconstruction (VAE space, scale only).
    direct = float((rec["samples"] - latent["samples"]).norm() / latent["samples"].norm())
    assert direct == pytest.approx(err, rel=1e-3)
    assert f"{err:.3%}" in text and "Reconstruction error" in text
    # The trajectory: model space, z0 is exactly process_latent_in(reference).
    assert torch.equal(traj.z0, model.model.process_latent_in(latent["samples"]))
    assert torch.allclose(model.model.process_latent_in(noise["samples"]), traj.latents[0], atol=1e-5)
    steps_moved = (traj.latents[:-1] - traj.latents[1:]).flatten(1).norm(dim=1)
    assert bool((steps_moved > 0).all()), "every inversion step changes the latent"


def test_warning_level_follows_the_level_a_model_declares(dm, tiny):
    """Above 5% the node warns; a model whose loader declares another level is judged by that level
    (below it: no warning; above: the warning), and the text says which level applied and why. A
    malformed declaration is ignored (the default level applies)."""
    host = dm("nodes.host.model")
    model = tiny.build("sd15", 1)
    latent = tiny.latent(3)
    ref, _, _, text = invert(dm, model, latent, tiny.cond(1), steps=3)
    err = ref.trajectory.meta["recon_error"]
    assert 0.0 < err < 0.5
    assert ("- high: use cfg 1, more steps" in text) is (err > 0.05) and "this model" not in text
    for level, warned in ((err * 1.5, False), (err * 0.5, True)):
        declared = model.clone()
        declared.model_options[host.INVERSION_ERROR_KEY] = {"level": level, "why": "a test model"}
        ref2, _, _, text2 = invert(dm, declared, latent, tiny.cond(1), steps=3)
        assert ref2.trajectory.meta["recon_error"] == err  # the declaration changes only the verdict
        assert f"(this model: up to {level:.0%} expected, a test model)" in text2
        assert ("- high:" in text2) is warned, text2
    assert host.INVERSION_ERROR_KEY not in model.model_options  # the input model is untouched
    for bad in ("0.5", {"level": 2.0}, {"level": "x"}, {"why": "no level"}):
        odd = model.clone()
        odd.model_options[host.INVERSION_ERROR_KEY] = bad
        assert host.declared_inversion_error(odd) is None


def test_lora_changes_the_trajectory(dm, tiny):
    model = tiny.build("sd15", 1)
    lat, cond = tiny.latent(3), tiny.cond(1)
    base, *_ = invert(dm, model, lat, cond, steps=4)
    import comfy.sd

    key = "diffusion_model.output_blocks.8.1.transformer_blocks.0.attn1.to_v.weight"
    weight = model.model.state_dict()[key]
    gen = torch.Generator().manual_seed(0)
    name = "lora_unet_output_blocks_8_1_transformer_blocks_0_attn1_to_v"
    lora_sd = {f"{name}.lora_up.weight": torch.randn(weight.shape[0], 4, generator=gen),
               f"{name}.lora_down.weight": torch.randn(4, weight.shape[1], generator=gen),
               f"{name}.alpha": torch.tensor(4.0)}
    lora, _ = comfy.sd.load_lora_for_models(model, None, lora_sd, 0.5, 0.0)  # what LoraLoader does
    assert key in lora.patches and key not in model.patches
    patched, *_ = invert(dm, lora, lat, cond, steps=4)
    again, *_ = invert(dm, model, lat, cond, steps=4)
    b, p = base.trajectory.latents, patched.trajectory.latents
    assert torch.equal(b[-1], p[-1])  # same z0
    assert (b[:-1] - p[:-1]).abs().max() > 1e-3
    assert torch.equal(again.trajectory.latents, b), "the LoRA must not leak into the base model"
    patched.check_model(model)  # a LoRA keeps the architecture: the reference still fits


def test_cfg_uses_inversion_conditioning_against_the_negative(dm, tiny):
    model = tiny.build("sd15", 1)
    lat, pos = tiny.latent(3), tiny.cond(1)
    inv, neg = tiny.cond(5), tiny.cond(6)
    kw = dict(steps=3, inversion_conditioning=inv, reference_negative=neg)
    one, *_ = invert(dm, model, lat, pos, cfg=1.0, **kw)
    four, *_ = invert(dm, model, lat, pos, cfg=4.0, **kw)
    a, b = one.trajectory.latents, four.trajectory.latents
    assert (a[:-1] - b[:-1]).abs().max() > 1e-3
    # With the negative equal to the inversion prompt, CFG is a no-op (the official code's setting).
    same, *_ = invert(dm, model, lat, pos, steps=3, cfg=4.0, inversion_conditioning=inv)
    assert torch.allclose(same.trajectory.latents, a, atol=1e-5)
    assert four.negative is neg and four.positive is pos and same.negative is inv
    assert four.trajectory.meta["cfg"] == 4.0


def test_default_inversion_conditioning_is_zero_context(dm, tiny):
    model = tiny.build("sd15", 1)
    lat, pos = tiny.latent(3), tiny.cond(1)
    default, *_ = invert(dm, model, lat, pos, steps=3)
    zero = [[torch.zeros(1, 77, 32), {}]]
    explicit, *_ = invert(dm, model, lat, pos, steps=3, inversion_conditioning=zero)
    assert torch.equal(default.trajectory.latents, explicit.trajectory.latents)
    assert torch.equal(default.negative[0][0], zero[0][0])
    assert default.trajectory.meta["inversion_conditioning"] == "zero"
    host = dm("nodes.host.model")
    pooled = host.zero_conditioning_like([[torch.ones(1, 5, 8), {"pooled_output": torch.ones(1, 8), "x": 1}]])
    assert pooled[0][0].shape == (1, 5, 8) and not pooled[0][0].any()
    assert not pooled[0][1]["pooled_output"].any()


def test_batch_of_two_gives_two_independent_trajectories(dm, tiny):
    model = tiny.build("sd15", 1)
    a, b, cond = tiny.latent(3), tiny.latent(4), tiny.cond(1)
    both = {"samples": torch.cat([a["samples"], b["samples"]])}
    ref2, noise2, rec2, text = invert(dm, model, both, cond, steps=4)
    ref_a, *_ = invert(dm, model, a, cond, steps=4)
    ref_b, *_ = invert(dm, model, b, cond, steps=4)
    lat = ref2.trajectory.latents
    assert lat.shape == (5, 2, 4, 16, 16) and ref2.trajectory.batch == 2
    assert torch.allclose(lat[:, 0], ref_a.trajectory.latents[:, 0], atol=1e-5)
    assert torch.allclose(lat[:, 1], ref_b.trajectory.latents[:, 0], atol=1e-5)
    assert noise2["samples"].shape[0] == 2 and rec2["samples"].shape[0] == 2
    assert len(ref2.trajectory.meta["recon_errors"].split(",")) == 2 and text.count("%") == 2


def test_sdxl_reference_is_refused_for_the_sd15_model(dm, tiny):
    sd15, sdxl = tiny.build("sd15", 1), tiny.build("sdxl", 1)
    ref_xl, *_ = invert(dm, sdxl, tiny.latent(3), tiny.cond(1), steps=2)
    with pytest.raises(ValueError, match=r"'SDXL' latent format.*uses 'SD15'.*Invert the reference again"):
        ref_xl.check_model(sd15)
    ref_xl.check_model(sdxl)
    # Same latent format, another UNet layout (an SDXL-layout UNet with SD1.5's latent format).
    fake = tiny.build("sdxl", 2)
    fake.model.latent_format = sd15.model.latent_format
    ref_15, *_ = invert(dm, sd15, tiny.latent(3), tiny.cond(1), steps=2)
    with pytest.raises(ValueError, match="another architecture"):
        ref_15.check_model(fake)


def test_schedule_check_names_the_mismatch(dm, tiny):
    import comfy.samplers

    model = tiny.build("sd15", 1)
    ref, *_ = invert(dm, model, tiny.latent(3), tiny.cond(1), steps=4)
    ks = comfy.samplers.KSampler(model, 4, torch.device("cpu"), sampler="ddim", scheduler="ddim_uniform")
    assert ref.check_schedule(ks.sigmas) == [0, 1, 2, 3, 4]
    other = comfy.samplers.KSampler(model, 6, torch.device("cpu"), sampler="ddim", scheduler="ddim_uniform")
    with pytest.raises(ValueError, match=r"not in this reference trajectory.*steps=4, scheduler=ddim_unif"):
        ref.check_schedule(other.sigmas)


def test_v_prediction_is_supported_and_flow_models_are_refused(dm, tiny):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    model = tiny.build("sd15", 1)
    (vpred,) = ModelSamplingDiscrete().patch(model, "v_prediction", False)
    ref, *_ = invert(dm, vpred, tiny.latent(3), tiny.cond(1), steps=3)
    assert ref.trajectory.meta["prediction"] == "v" and torch.isfinite(ref.trajectory.latents).all()
    (flow,) = ModelSamplingSD3().patch(model, 3.0)
    with pytest.raises(ValueError, match="eps- and v-prediction"):
        invert(dm, flow, tiny.latent(3), tiny.cond(1), steps=3)


def test_progress_bar_and_latent_previews(dm, tiny, monkeypatch):
    import comfy.utils
    from comfy.cli_args import LatentPreviewMethod, args

    calls = []
    def hook(value, total, preview, node_id=None):
        calls.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    invert(dm, tiny.build("sd15", 1), tiny.latent(3), tiny.cond(1), steps=3)
    assert [(v, t) for v, t, _ in calls] == [(i, 6) for i in range(1, 7)]
    assert all(p is not None for *_, p in calls), "every step sends a latent preview"


def test_interrupt_mid_inversion_leaves_nothing_and_next_run_works(dm, tiny, host):
    import comfy.model_management as mm

    model = tiny.build("sd15", 1)
    lat, cond = tiny.latent(3), tiny.cond(1)
    calls = []

    def wrapper(apply_model, args):
        calls.append(1)
        if len(calls) == 2:
            mm.interrupt_current_processing(True)
        return apply_model(args["input"], args["timestep"], **args["c"])

    interrupting = model.clone()
    interrupting.set_model_unet_function_wrapper(wrapper)
    before = sorted(p.relative_to(host.dirs["output"]) for p in host.dirs["output"].rglob("*"))
    options_before = repr(model.model_options)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            invert(dm, interrupting, lat, cond, steps=5)
    finally:
        mm.interrupt_current_processing(False)
    assert len(calls) == 2, "the inversion stopped at the next step"
    assert not mm.processing_interrupted()
    after = sorted(p.relative_to(host.dirs["output"]) for p in host.dirs["output"].rglob("*"))
    assert after == before and repr(model.model_options) == options_before
    ref, *_ = invert(dm, model, lat, cond, steps=5)
    fresh, *_ = invert(dm, tiny.build("sd15", 1), lat, cond, steps=5)
    assert torch.equal(ref.trajectory.latents, fresh.trajectory.latents)


def test_trajectory_memory_is_one_cpu_buffer_in_model_dtype(dm, tiny):
    host = dm("nodes.inversion")
    model = tiny.build("sd15", 1, dtype=torch.bfloat16)
    ref, *_ = invert(dm, model, tiny.latent(3), tiny.cond(1), steps=2)
    lat = ref.trajectory.latents
    assert lat.device.type == "cpu" and lat.dtype == torch.bfloat16 == model.model_dtype()
    assert lat.is_contiguous() and lat.untyped_storage().nbytes() == lat.numel() * lat.element_size()
    # The recorder allocates the trajectory once and copies each step's latent into it (the
    # device keeps only the current latent; nothing accumulates per step).
    rec = host._TrajectoryRecorder(4, torch.float16)
    xs = [torch.randn(2, 4, 8, 8) for _ in range(4)]
    rec.record(3, xs[3])
    ptr = rec.latents.data_ptr()
    for i in (2, 1, 0):
        rec.record(i, xs[i])
    assert rec.latents.data_ptr() == ptr and rec.latents.shape == (4, 2, 4, 8, 8)
    assert torch.equal(rec.latents, torch.stack(xs).half())
    # SDXL 1024x1024, 50 steps: the trajectory is 51 x 4 x 128 x 128 fp16 = 6.7 MB.
    assert 51 * 4 * 128 * 128 * 2 < 7e6
