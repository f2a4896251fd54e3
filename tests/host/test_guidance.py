"""Matching Guidance Sampler: exactness, gradients, effect, composition, hygiene.

The tiny SD1.5-layout UNet has random weights, so its noise prediction has no meaningful
Jacobian: guidance "through eps" has no reason to reduce a distance on it. Tests about the
*effect* of guidance therefore use a controlled model: an APPLY_MODEL wrapper blends the tiny
UNet's eps with the optimal eps of unit-variance Gaussian data, ``sigma / (1 + sigma^2) * x``
(the linear denoiser a trained model approximates at high noise). Everything else (batching,
patches, the gradient path through the real UNet) is the real ComfyUI machinery.
"""

from __future__ import annotations

import gc

import comfy_env
import pytest
import torch

STEPS = 10
HW = 16


# ------------------------------------------------------------------------------------------ helpers
def _controlled(model, unet_share: float = 0.2):
    """Clone ``model`` with an eps = linear-denoiser + unet_share * UNet-eps wrapper (see module doc)."""
    import comfy.patcher_extension as pe

    def wrapper(executor, x, t, *args, **kwargs):
        den = executor(x, t, *args, **kwargs)
        sigma = t.reshape(-1, 1, 1, 1).to(x.dtype)
        eps_unet = (x - den) / sigma
        eps = sigma / (1.0 + sigma * sigma) * x + unet_share * eps_unet
        return x - sigma * eps

    m = model.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "dm_test_controlled", wrapper)
    return m


def _reference(dm, tiny, model, *, seed=11, steps=STEPS, scheduler="ddim_uniform"):
    """A Reference built with the pack's own DDIM inversion (cfg 1, empty-ish prompt)."""
    sampling, inversion = dm("nodes.host.sampling"), dm("nodes.inversion")
    Reference = dm("nodes.reference").Reference
    Trajectory = dm("dreammatcher_core.trajectory").Trajectory
    lat = tiny.latent(seed, HW, HW)["samples"]
    sigmas = sampling.schedule_sigmas(model, steps, scheduler)
    with torch.inference_mode():
        latents, _ = inversion.ddim_invert(model, lat, tiny.cond(21), tiny.cond(22), 1.0, sigmas)
    fmt, fp = dm("nodes.host.model").model_fingerprint(model)
    traj = Trajectory(sigmas, latents, fmt, fp, meta={"steps": steps, "scheduler": scheduler})
    return Reference(traj, tiny.cond(21), tiny.cond(22), {})


def _run(dm, model, ref, *, scale=50.0, mode="exact", cfg=5.0, seed=3, start=0.0, end=1.0, probe=None,
         latent=None, steps=STEPS, scheduler="ddim_uniform", tiny=None, positive=None, negative=None):
    runtime = dm("nodes.guidance")
    guidance = dm("nodes.node_guidance")
    spec = guidance.make_spec(ref, scale, start, end, mode)
    spec.probe = probe
    with torch.inference_mode():
        out = runtime.guidance_sample(model, spec, seed=seed, steps=steps, cfg=cfg, scheduler=scheduler,
                                      positive=positive, negative=negative, latent=latent, denoise=1.0)
    return out["samples"]


@pytest.fixture(scope="module")
def setup(dm, tiny):
    model = tiny.build("sd15", seed=1)
    ref = _reference(dm, tiny, model)
    return {
        "model": model, "ref": ref, "pos": tiny.cond(31), "neg": tiny.cond(22),
        "latent": {"samples": torch.zeros(1, 4, HW, HW)},
    }


def _kw(s):
    return {"positive": s["pos"], "negative": s["neg"], "latent": s["latent"]}


def _masked_distance(z0, out_model, flow, weight, dm):
    warp = dm("dreammatcher_core.matching").warp
    target = warp(z0.float(), flow)
    w = weight.float()
    return float(((w * (target - out_model.float())) ** 2).sum() / (w.sum() * out_model.shape[1]))


# ------------------------------------------------------------------------------------------ parity
def test_scale_zero_is_plain_ddim(dm, setup, sample):
    s = setup
    vanilla = sample(s["model"], s["pos"], s["neg"], s["latent"], steps=STEPS, cfg=5.0, seed=3)
    off = _run(dm, s["model"], s["ref"], scale=0.0, **_kw(s))
    assert torch.equal(off, vanilla), "guidance_scale 0 must be bit-identical to stock KSampler ddim"
    # A window that contains no step is also plain DDIM.
    empty = _run(dm, s["model"], s["ref"], scale=50.0, start=0.999, end=0.9995, **_kw(s))
    assert torch.equal(empty, vanilla)
    on = _run(dm, s["model"], s["ref"], scale=50.0, **_kw(s))
    assert not torch.equal(on, vanilla), "guidance at scale 50 must change the result"


def test_schedule_mismatch_is_a_clear_error(dm, setup):
    with pytest.raises(ValueError, match="same steps and scheduler"):
        _run(dm, setup["model"], setup["ref"], steps=STEPS + 2, **_kw(setup))


# ------------------------------------------------------------------------------------------ gradient
def test_exact_gradient_matches_finite_differences(dm, tiny):
    """d loss / d x of the exact mode vs central differences of the same loss (flow and weights fixed).

    The probe runs inside the sampling call (the model is only loaded there). The tiny UNet is
    float64; ComfyUI's BaseModel returns eps through ``.float()``, so the function is float64 up
    to one float32 rounding of eps.
    """
    dmg = dm("dreammatcher_core.guidance")
    model = comfy_env.keep_latent_dtype(tiny.build("sd15", seed=4, dtype=torch.float64), torch.float64)
    ref = _reference(dm, tiny, model)
    gen = torch.Generator().manual_seed(0)
    checks = []

    def probe(info):
        x, sigma, fwd, g = info["x"], info["sigma"], info["forward"], info["grad"]
        target, w = info["target"].double(), info["weight"].double()
        assert g.dtype == torch.float64 and float(w.sum()) > 0

        def loss(x_in):
            eps = (x_in - fwd(x_in)) / sigma
            return float(dmg.matching_loss(x - sigma * eps, target, w, "official"))

        # Round-off of eps (float32, see above) limits a difference quotient to ~noise/h, and the
        # UNet's curvature to ~h^2: a larger step with Richardson extrapolation keeps both small.
        h = 4e-3 * float(x.abs().max())
        for _ in range(3):
            v = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            fd1 = (loss(x + h * v) - loss(x - h * v)) / (2 * h)
            fd2 = (loss(x + 0.5 * h * v) - loss(x - 0.5 * h * v)) / h
            # Richardson extrapolation cancels the O(h^2) term of the central difference.
            checks.append((info["branch"], sigma, float((g * v).sum()), (4 * fd2 - fd1) / 3, fd1,
                           float(g.norm())))

    lat = {"samples": torch.zeros(1, 4, HW, HW, dtype=torch.float64)}
    _run(dm, model, ref, scale=50.0, mode="exact", start=0.25, end=0.35, probe=probe,
         positive=tiny.cond(31), negative=tiny.cond(22), latent=lat)
    assert {c[0] for c in checks} == {0, 1}
    for branch, sigma, an, fd, fd_plain, g_norm in checks:
        print(f"branch {branch} sigma {sigma:.3f}: analytic {an:.9e} finite-diff {fd:.9e} "
              f"(plain central {fd_plain:.9e}; |grad| {g_norm:.3e})")
        # A projection on a random direction is about |grad| in size but can be near zero by chance:
        # the error is bounded relative to the projection or, if that is tiny, to the gradient's norm.
        assert an == pytest.approx(fd, rel=1e-4, abs=1e-4 * g_norm)


# ------------------------------------------------------------------------------------------ effect
@pytest.mark.parametrize("mode", ["exact", "fast"])
def test_guidance_reduces_masked_distance(dm, tiny, setup, mode):
    model = _controlled(setup["model"])
    ref = _reference(dm, tiny, model)
    s = setup
    seen_on, seen_off = [], []
    base = _run(dm, model, ref, scale=1e-9, mode=mode, probe=seen_off.append, **_kw(s))
    guided = _run(dm, model, ref, scale=50.0, mode=mode, probe=seen_on.append, **_kw(s))
    z0 = ref.trajectory.z0
    to_model = model.model.process_latent_in
    d = {}
    for name, out, seen in (("off", base, seen_off), ("on", guided, seen_on)):
        last = [p for p in seen if p["branch"] == 0][-1]
        d[name] = _masked_distance(z0, to_model(out), last["flow"], last["weight"], dm)
    # Cross-check with one fixed correspondence (the guided run's last) for both outputs.
    last_on = [p for p in seen_on if p["branch"] == 0][-1]
    d_off_fixed = _masked_distance(z0, to_model(base), last_on["flow"], last_on["weight"], dm)
    print(f"[{mode}] masked distance without guidance {d['off']:.5f} (fixed corr {d_off_fixed:.5f}), "
          f"with guidance {d['on']:.5f}; guided steps {len(seen_on) // 2}")
    assert d["on"] < 0.95 * d["off"]
    assert d["on"] < 0.95 * d_off_fixed


def test_fast_mode_relates_to_exact_mode(dm, tiny, setup):
    """Fast = exact with d eps / dx replaced by I / sigma (the clean estimate held constant).

    Both are ``denoised += lambda * sigma^2 * dL/dx`` per branch; fast uses dL/dx = -dL/dx0. On the
    controlled model, whose eps Jacobian is mostly the linear denoiser's sigma/(1+sigma^2) I (close
    to 1/sigma at the guided sigma), the per-step updates point the same way (cosine > 0.5) with
    comparable size; on the raw random UNet the figures are only printed (its Jacobian is random,
    so no relation is expected).
    """
    s = setup
    for name, model, check in (("controlled", _controlled(s["model"]), True), ("random", s["model"], False)):
        ref = _reference(dm, tiny, model)
        got = {}
        for mode in ("exact", "fast"):
            seen = []
            _run(dm, model, ref, scale=50.0, mode=mode, start=0.25, end=0.35, probe=seen.append, **_kw(s))
            got[mode] = {p["branch"]: p["update"] for p in seen}
        for b in (0, 1):
            e, f = got["exact"][b].flatten().float(), got["fast"][b].flatten().float()
            cos = float(torch.nn.functional.cosine_similarity(e, f, dim=0))
            ratio = float(f.norm() / e.norm())
            print(f"[{name}] branch {b}: cos(exact, fast) {cos:.3f}, |fast|/|exact| {ratio:.3f}")
            if check:
                assert cos > 0.5
                assert 0.2 < ratio < 5.0


# ------------------------------------------------------------------------------------------ composition
def test_cfg1_lora_and_inference_mode_weights(dm, tiny, setup):
    s = setup
    seen = []
    out1 = _run(dm, s["model"], s["ref"], cfg=1.0, probe=seen.append, **_kw(s))
    assert {p["branch"] for p in seen} == {0}, "cfg 1 runs (and guides) the cond branch only"
    assert torch.isfinite(out1).all()

    # LoRA-style weight patch on a clone: exact guidance runs through the patched weights.
    lora = s["model"].clone()
    sd = lora.model.state_dict()
    key = next(k for k in sd if k.endswith("output_blocks.8.0.in_layers.2.weight"))
    gen = torch.Generator().manual_seed(5)
    lora.add_patches({key: ("diff", (torch.randn(sd[key].shape, generator=gen) * 0.05,))}, 1.0)
    plain = _run(dm, s["model"], s["ref"], **_kw(s))
    with_lora = _run(dm, lora, s["ref"], **_kw(s))
    assert torch.isfinite(with_lora).all() and not torch.equal(plain, with_lora)
    assert torch.equal(plain, _run(dm, s["model"], s["ref"], **_kw(s))), "the LoRA leaked into the base"

    # Weights created under inference mode are inference tensors: the escape must still work.
    with torch.inference_mode():
        inf_model = tiny.build("sd15", seed=1)
    assert any(p.is_inference() for p in inf_model.model.parameters())
    seen = []
    out = _run(dm, inf_model, s["ref"], probe=seen.append, **_kw(s))
    assert torch.isfinite(out).all() and all(float(p["grad"].abs().sum()) > 0 for p in seen)
    assert torch.equal(out, plain), "same weights, same result whether or not they are inference tensors"


def test_sampler_node_with_sampler_custom(dm, setup):
    """DM_MatchingGuidance's SAMPLER through comfy.sample.sample_custom equals the KSampler-like node."""
    import comfy.sample

    s = setup
    guidance = dm("nodes.node_guidance")
    host = dm("nodes.host.sampling")
    node_out = _run(dm, s["model"], s["ref"], **_kw(s))
    sampler = guidance.MatchingGuidance.execute(s["ref"], 50.0, 0.0, 1.0, "exact").result[0]
    sigmas = host.schedule_sigmas(s["model"], STEPS, "ddim_uniform")
    lat = s["latent"]["samples"]
    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(lat, 3)
        out = comfy.sample.sample_custom(s["model"], noise, 5.0, sampler, sigmas, s["pos"], s["neg"], lat,
                                         disable_pbar=True, seed=3)
    assert torch.equal(out, node_out)


# ------------------------------------------------------------------------------------------ hygiene
def test_exact_run_leaves_no_graph_and_restores_ops(dm, setup):
    s = setup
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    _run(dm, s["model"], s["ref"], mode="exact", **_kw(s))
    gc.collect()
    leaked = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before
              and (o.requires_grad or o.grad_fn is not None)]
    assert not leaked, [tuple(t.shape) for t in leaked[:5]]
    # ComfyUI's own loader may give ops per-instance (empty) function lists; what must not survive
    # is our pass-through in any of them.
    escape = dm("nodes.host.autograd")._constant_copy
    ops = [m for m in s["model"].model.diffusion_model.modules() if hasattr(m, "comfy_cast_weights")]
    assert ops
    for m in ops:
        assert escape not in getattr(m, "weight_function", []), m
        assert escape not in getattr(m, "bias_function", []), m
        assert type(m).weight_function == [] and type(m).bias_function == [], "class lists touched"
    assert not any(p.requires_grad and p.grad is not None for p in s["model"].model.parameters())


def test_progress_determinism_and_interrupt(dm, setup):
    import comfy.model_management as mm
    import comfy.sample

    s = setup
    guidance = dm("nodes.node_guidance")
    host = dm("nodes.host.sampling")
    a = _run(dm, s["model"], s["ref"], seed=7, **_kw(s))
    b = _run(dm, s["model"], s["ref"], seed=7, **_kw(s))
    c = _run(dm, s["model"], s["ref"], seed=8, **_kw(s))
    assert torch.equal(a, b) and not torch.equal(a, c)

    sampler = guidance.MatchingGuidance.execute(s["ref"], 50.0, 0.0, 1.0, "exact").result[0]
    sigmas = host.schedule_sigmas(s["model"], STEPS, "ddim_uniform")
    lat = s["latent"]["samples"]
    steps: list[int] = []

    def callback(i, x0, x, total):
        steps.append(i)
        assert total == STEPS and x0.shape == lat.shape
        if i == 3:
            mm.interrupt_current_processing(True)

    with torch.inference_mode():
        noise = comfy.sample.prepare_noise(lat, 3)
        try:
            with pytest.raises(mm.InterruptProcessingException):
                comfy.sample.sample_custom(s["model"], noise, 5.0, sampler, sigmas, s["pos"], s["neg"], lat,
                                           callback=callback, disable_pbar=True, seed=3)
        finally:
            mm.interrupt_current_processing(False)
    assert steps == [0, 1, 2, 3], "progress callback once per step, stopped right after the interrupt"
    escape = dm("nodes.host.autograd")._constant_copy
    for m in s["model"].model.diffusion_model.modules():
        if hasattr(m, "comfy_cast_weights"):
            assert escape not in getattr(m, "weight_function", []), "escape not restored after interrupt"
    # The next run works and is unchanged.
    assert torch.equal(_run(dm, s["model"], s["ref"], seed=7, **_kw(s)), a)


def test_shares_the_ama_patch_correspondence(dm, setup):
    """With the AMA patch on the MODEL, guided steps reuse its per-step correspondence and mask."""
    s = setup
    ama = dm("nodes.ama")
    config = dm("nodes.config")
    patched = ama.patch_model(s["model"], s["ref"], strength=1.0, start_percent=0.0, end_percent=1.0,
                              match=config.MatchConfig(subject_tokens=(1, 2)))
    seen = []
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    out = _run(dm, patched, s["ref"], mode="exact", probe=seen.append, **_kw(s))
    sources = [p["source"] for p in seen]
    print(f"correspondence sources per guided branch: {sources}")
    assert torch.isfinite(out).all()
    assert "ama" in sources, "the AMA patch's correspondence must be reused when it exists"
    # The first active step has no previous-step features in the AMA patch: the sampler matches itself.
    assert sources[0] == "own"
    assert not torch.equal(out, _run(dm, patched, s["ref"], scale=0.0, **_kw(s)))
    gc.collect()
    leaked = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before
              and (o.requires_grad or o.grad_fn is not None)]
    assert not leaked, [tuple(t.shape) for t in leaked[:5]]


# ------------------------------------------------------------------------------------------ host weight paths
def _with_weight_stage(tiny, stage):
    """A tiny model whose every comfy op passes its weights through ``stage(module, name, w)`` ahead
    of DreamMatcher's own weight functions, as a host's weight path does. It goes in through the
    host's own ``add_weight_wrapper`` (so ModelPatcher installs it at load, per instance)."""
    model = tiny.build("sd15", seed=1).clone()
    ops = []
    for name, m in model.model.named_modules():
        if not hasattr(m, "comfy_cast_weights"):
            continue
        ops.append(m)
        for param in ("weight", "bias"):
            if getattr(m, param, None) is not None:
                model.add_weight_wrapper(f"{name}.{param}", lambda w, m=m, p=param: stage(m, p, w))
    return model, ops


def test_exact_guidance_with_streamed_inference_weight_views(dm, tiny, setup):
    """Dynamic-VRAM hosts hand the weight functions cached views made under inference mode, without
    a copy. Exact guidance must run through them, leave them untouched and leave no graph behind."""
    s = setup
    cache: dict[tuple[int, str], torch.Tensor] = {}

    def streamed(module, name, w):
        key = (id(module), name)
        if key not in cache:  # the host's weight cache: filled under inference mode, reused as is
            with torch.inference_mode():
                cache[key] = w.clone()
        return cache[key]

    model, ops = _with_weight_stage(tiny, streamed)
    seen = []
    out = _run(dm, model, s["ref"], probe=seen.append, **_kw(s))
    assert cache and all(t.is_inference() for t in cache.values()), "the stage did not hand over views"
    assert seen and all(float(p["grad"].abs().sum()) > 0 for p in seen)
    plain = _run(dm, s["model"], s["ref"], **_kw(s))
    assert torch.equal(out, plain), "the same weights through the streamed path give the same result"
    for m in ops:
        for name in ("weight", "bias"):
            if (id(m), name) in cache:
                assert torch.equal(cache[(id(m), name)], getattr(m, name)), "a cached view was modified"
    escape = dm("nodes.host.autograd")._constant_copy
    assert all(escape not in getattr(m, "weight_function", []) for m in ops)
    assert not any(t.requires_grad for t in cache.values())


def test_exact_guidance_refuses_inference_cast_buffers_clearly(dm, tiny, setup):
    """Hosts that cast weights into a persistent buffer allocated under inference mode write into it
    in place on every call: impossible with autograd on. Exact guidance must say so and what to do,
    restore the model, and fast mode must still work on the same model."""
    s = setup
    buffers: dict[tuple[int, str], torch.Tensor] = {}

    def cast_into_buffer(module, name, w):
        key = (id(module), name)
        if key not in buffers:
            with torch.inference_mode():
                buffers[key] = torch.empty_like(w)
        buf = buffers[key]
        buf.copy_(w)
        return buf

    model, ops = _with_weight_stage(tiny, cast_into_buffer)
    host = dm("nodes.host.autograd")
    with pytest.raises(host.ExactGuidanceUnavailable, match="mode to 'fast'") as info:
        _run(dm, model, s["ref"], mode="exact", **_kw(s))
    print(f"\n[exact + inference cast buffer] {info.value}")
    assert "--disable-async-offload" in str(info.value)
    assert all(host._constant_copy not in getattr(m, "weight_function", []) for m in ops), "escape not undone"
    fast = _run(dm, model, s["ref"], mode="fast", **_kw(s))
    assert torch.equal(fast, _run(dm, s["model"], s["ref"], mode="fast", **_kw(s)))


def test_multigpu_dispatch_is_refused_before_sampling(dm, tiny, setup, sample):
    """A model carrying multi-GPU clones (what the MultiGPU CFG Split node adds) is refused at the
    start of sampling, by the AMA patch and by the guidance sampler, with the node to remove."""
    s = setup
    host = dm("nodes.host.sampling")
    ama = dm("nodes.node_ama")
    split = s["model"].clone()
    split.set_additional_models("multigpu", [s["model"].clone()])
    with pytest.raises(host.MultiGPUUnsupported, match="MultiGPU CFG Split") as info:
        _run(dm, split, s["ref"], **_kw(s))
    print(f"\n[multigpu] {info.value}")
    node = ama.AMAModelPatch
    preset = dm("nodes.layout").PRESETS[0]
    patched = node.execute(split, s["ref"], 1.0, 0.08, 1.0, preset, "").result[0]
    with pytest.raises(host.MultiGPUUnsupported, match="max_gpus to 1"):
        sample(patched, s["pos"], s["neg"], s["latent"], steps=STEPS, cfg=5.0, seed=3)
    # Without the clones the same patch samples: the refusal is about the dispatch, nothing else.
    ok = node.execute(s["model"], s["ref"], 1.0, 0.08, 1.0, preset, "").result[0]
    assert torch.isfinite(sample(ok, s["pos"], s["neg"], s["latent"], steps=STEPS, cfg=5.0, seed=3)).all()


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_batch_of_targets_with_the_ama_patch(dm, setup, mode):
    """A batch of targets with the AMA patch: the first step has no AMA match yet, so the sampler
    matches on its own there; every row must be guided, as when each row is sampled alone."""
    s = setup
    ama = dm("nodes.ama")
    patched = ama.patch_model(s["model"], s["ref"], strength=1.0, start_percent=0.0, end_percent=1.0)
    seen = []
    lat = {"samples": torch.zeros(2, 4, HW, HW)}
    out = _run(dm, patched, s["ref"], mode=mode, probe=seen.append, positive=s["pos"], negative=s["neg"],
               latent=lat)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert {p["source"] for p in seen} >= {"own", "ama"}
    assert all(p["flow"].shape[0] == 2 and p["weight"].shape[0] == 2 for p in seen)
    off = _run(dm, patched, s["ref"], scale=0.0, positive=s["pos"], negative=s["neg"], latent=lat)
    assert all(not torch.equal(out[i], off[i]) for i in range(2)), "a row of the batch was not guided"
    # On the first step AMA has not matched yet and changes nothing, so the sampler's own match there
    # must be the one it makes without the patch: target features against the reference's.
    alone = []
    _run(dm, s["model"], s["ref"], mode=mode, probe=alone.append, positive=s["pos"], negative=s["neg"],
         latent=lat)
    assert seen[0]["source"] == "own" and alone[0]["source"] == "own"
    assert torch.equal(seen[0]["flow"], alone[0]["flow"]), "the first-step match saw the wrong features"


@pytest.mark.parametrize("mode", ["fast", "exact"])
def test_sdxl_guidance_reuses_the_ama_reference_pass(dm, tiny, mode):
    """On SDXL the AMA layers do not reach the latent grid, so the sampler matches on its own; with
    the AMA patch it takes the reference features from the patch's reference pass of the same step
    instead of running a reference pass of its own."""
    ama = dm("nodes.ama")
    model = tiny.build("sdxl", seed=1)
    ref = _reference(dm, tiny, model)
    kw = {"positive": tiny.cond(31), "negative": tiny.cond(22),
          "latent": {"samples": torch.zeros(1, 4, HW, HW)}}
    patched = ama.patch_model(model, ref, strength=1.0, start_percent=0.0, end_percent=1.0)
    seen = []
    out = _run(dm, patched, ref, mode=mode, probe=seen.append, **kw)
    assert torch.isfinite(out).all() and seen
    print(f"\nSDXL {mode}: sources {sorted({p['source'] for p in seen})}, reference features from "
          f"{sorted({p['ref_source'] for p in seen})}, own reference passes {seen[-1]['own_ref_passes']}")
    assert {p["source"] for p in seen} == {"own"}, "AMA has no latent-grid match on SDXL"
    assert {p["ref_source"] for p in seen} == {"ama"} and seen[-1]["own_ref_passes"] == 0
    st = ama.patch_of(patched).last_stats
    # the patch's own reference rows, one per step and chunk type (exact mode evaluates the two
    # branches in separate calls, so two passes of one row), and nothing else
    assert st["ref_rows"] == 2 * STEPS, st
    # without the patch the sampler still makes its own reference pass per guided branch
    alone = []
    _run(dm, model, ref, mode=mode, probe=alone.append, **kw)
    assert {p["ref_source"] for p in alone} == {"pass"}
    assert not torch.equal(out, _run(dm, patched, ref, mode=mode, scale=0.0, **kw)), "no guidance applied"
