"""The reference bank: replayed reference passes give exactly the live results, are never reused
when an input of the pass changes, and stay within their memory budget."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

STEPS = 8


@pytest.fixture(scope="module")
def ref15(dm, tiny):
    inv = dm("nodes.node_invert")
    model = tiny.build("sd15", seed=1)
    with torch.inference_mode():
        out = inv.InvertReference.execute(model, tiny.latent(3), tiny.cond(1), steps=STEPS)
    return model, out.result[0]


def _patch(dm, model, ref, bank_mib=64.0, **kw):
    return dm("nodes.ama").patch_model(model, ref, start_percent=0.0, bank_mib=bank_mib, **kw)


def _stats(dm, model) -> dict:
    return dict(dm("nodes.ama").patch_of(model).last_stats)


def _lora(model, seed=9, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    sd = model.model.state_dict()
    keys = [k for k in sd if ".attn1.to_v.weight" in k or "ff.net.2.weight" in k]
    return {k: (torch.randn(sd[k].shape, generator=gen) * scale / sd[k].shape[1] ** 0.5,) for k in keys}


def test_banked_runs_equal_live_runs(dm, tiny, ref15, sample):
    model, ref = ref15
    pos, neg, lat = tiny.cond(5), tiny.cond(6), tiny.latent(4, batch=2)
    live = _patch(dm, model, ref, bank_mib=0)
    banked = _patch(dm, model, ref)
    want = sample(live, pos, neg, lat, steps=STEPS, seed=3)
    assert _stats(dm, live)["bank_hits"] == 0 and _stats(dm, live)["bank_stores"] == 0
    first = sample(banked, pos, neg, lat, steps=STEPS, seed=3)
    st1 = _stats(dm, banked)
    second = sample(banked, pos, neg, lat, steps=STEPS, seed=3)
    st2 = _stats(dm, banked)
    # another target (prompt, seed, batch size): the reference branch is the target's business only
    # through nothing, so the bank still serves every step
    other = sample(banked, tiny.cond(7), neg, tiny.latent(8), steps=STEPS, seed=11)
    st3 = _stats(dm, banked)
    print(f"\nfirst run {st1['ref_passes']} passes / {st1['bank_stores']} stored; second "
          f"{st2['ref_passes']} passes / {st2['bank_hits']} hits; other target {st3['ref_passes']} passes / "
          f"{st3['bank_hits']} hits")
    assert torch.equal(first, want) and torch.equal(second, want)
    assert torch.equal(other, sample(live, tiny.cond(7), neg, tiny.latent(8), steps=STEPS, seed=11))
    assert st1["ref_passes"] == STEPS and st1["bank_stores"] == 2 * STEPS  # cond + uncond per step
    assert st2["ref_passes"] == 0 and st2["bank_hits"] == 2 * STEPS
    assert st3["ref_passes"] == 0 and st3["bank_hits"] == 2 * STEPS
    bank = dm("nodes.ama").patch_of(banked).bank
    assert all(e.dtype == torch.float32 and e.device == "cpu" for e in bank.entries.values())
    assert 0 < bank.nbytes <= bank.budget
    # clones (e.g. through a node after the patch) share the patch and so its bank
    assert dm("nodes.ama").patch_of(banked.clone()).bank is bank


def test_weight_patch_change_invalidates(dm, tiny, ref15, sample):
    model, ref = ref15
    pos, neg, lat = tiny.cond(5), tiny.cond(6), tiny.latent(4)
    banked = _patch(dm, model, ref)
    sample(banked, pos, neg, lat, steps=STEPS, seed=3)
    for strength in (1.0, 0.5):  # a LoRA after the patch, then the same LoRA at another strength
        lora = banked.clone()
        lora.add_patches(_lora(model), strength)
        live = _patch(dm, model, ref, bank_mib=0).clone()
        live.add_patches(_lora(model), strength)
        got = sample(lora, pos, neg, lat, steps=STEPS, seed=3)
        st = _stats(dm, lora)
        assert st["bank_hits"] == 0 and st["ref_passes"] == STEPS, st
        assert torch.equal(got, sample(live, pos, neg, lat, steps=STEPS, seed=3))
    # and back to the unpatched weights: recomputed (the bank holds one fingerprint at a time)
    sample(banked, pos, neg, lat, steps=STEPS, seed=3)
    assert _stats(dm, banked)["bank_hits"] == 0


def test_schedule_change_is_not_served_from_the_bank(dm, tiny, ref15, sample):
    """Entries are keyed by sigma and their exact inputs: a schedule that visits some of the banked
    sigmas is served there (same inputs, same pass); another noise schedule (a replaced
    ``model_sampling``) empties the bank."""
    import copy

    model, ref = ref15
    pos, neg, lat = tiny.cond(5), tiny.cond(6), tiny.latent(4)
    banked = _patch(dm, model, ref)
    live = _patch(dm, model, ref, bank_mib=0)
    sample(banked, pos, neg, lat, steps=STEPS, seed=3)
    sub = ref.trajectory.sigmas[::2].float()  # every other sigma of the inversion's schedule
    assert float(sub[-1]) == 0.0
    got = sample(banked, pos, neg, lat, seed=3, sigmas=sub)
    st = _stats(dm, banked)
    steps = len(sub) - 1
    print(f"\nsub-schedule of {steps} steps: {st['bank_hits']} hits, {st['ref_passes']} live passes")
    assert st["bank_hits"] == 2 * steps and st["ref_passes"] == 0, st
    assert torch.equal(got, sample(live, pos, neg, lat, seed=3, sigmas=sub))
    shifted = banked.clone()
    shifted.add_object_patch("model_sampling", copy.deepcopy(model.get_model_object("model_sampling")))
    got = sample(shifted, pos, neg, lat, steps=STEPS, seed=3)
    st = _stats(dm, shifted)
    assert st["bank_hits"] == 0 and st["ref_passes"] == STEPS, st
    live_shifted = live.clone()
    live_shifted.add_object_patch("model_sampling", copy.deepcopy(model.get_model_object("model_sampling")))
    assert torch.equal(got, sample(live_shifted, pos, neg, lat, steps=STEPS, seed=3))


def test_other_patch_or_reference_empties_the_bank(dm, tiny, ref15, sample):
    model, ref = ref15
    pos, neg, lat = tiny.cond(5), tiny.cond(6), tiny.latent(4)
    banked = _patch(dm, model, ref)
    sample(banked, pos, neg, lat, steps=STEPS, seed=3)
    other = banked.clone()
    other.set_model_output_block_patch(lambda h, hsp, transformer_options: (h * 1.0, hsp))
    sample(other, pos, neg, lat, steps=STEPS, seed=3)
    assert _stats(dm, other)["bank_hits"] == 0, "a new UNet patch must not be served from the bank"
    bank = dm("nodes.ama").patch_of(banked).bank
    fp_items = bank.fingerprint.items
    swapped = replace(ref, positive=tiny.cond(2))  # another reference prompt, same trajectory
    assert fp_items[0] is ref and swapped is not ref
    dm_bank = dm("nodes.ama.bank")
    assert not dm_bank.Fingerprint((swapped, *fp_items[1:])).same(bank.fingerprint)


def test_entry_inputs_are_compared_exactly(dm):
    bank_mod = dm("nodes.ama.bank")
    bank = bank_mod.ReferenceBank(1.0)
    ctx = torch.randn(1, 77, 8)
    y = torch.randn(1, 16)
    v = {("output", 6, 0): (torch.randn(1, 64, 8), (8, 8))}
    feats = {5: torch.randn(1, 8, 4, 4)}
    assert bank.store(0.5, [(0, ctx, {"y": y}, v, feats)], torch.float32, "cpu")
    args = (torch.float32, "cpu", True, (5,))
    assert bank.lookup(0.5, 0, ctx.clone(), {"y": y.clone()}, *args) is not None
    assert bank.lookup(0.5, 1, ctx, {"y": y}, *args) is None  # other chunk type
    assert bank.lookup(0.25, 0, ctx, {"y": y}, *args) is None  # other sigma
    bumped = ctx.clone()
    bumped[0, 3, 1] += 1e-6
    assert bank.lookup(0.5, 0, bumped, {"y": y}, *args) is None  # another prompt row
    assert bank.lookup(0.5, 0, ctx, {"y": y + 1e-6}, *args) is None  # e.g. SDXL's y of another target
    assert bank.lookup(0.5, 0, ctx, {}, *args) is None
    assert bank.lookup(0.5, 0, ctx, {"y": y}, torch.float16, "cpu", True, (5,)) is None
    assert bank.lookup(0.5, 0, ctx, {"y": y}, torch.float32, "cpu", True, (5, 8)) is None  # layer missing


def test_budget_banks_the_first_steps_and_computes_the_rest_live(dm, tiny, ref15, sample):
    model, ref = ref15
    pos, neg, lat = tiny.cond(5), tiny.cond(6), tiny.latent(4)
    probe = _patch(dm, model, ref)
    sample(probe, pos, neg, lat, steps=STEPS, seed=3)
    per_step = dm("nodes.ama").patch_of(probe).bank.nbytes / STEPS
    budget_mib = 3.5 * per_step / 2**20  # room for three and a half steps of cond + uncond
    small = _patch(dm, model, ref, bank_mib=budget_mib)
    live = _patch(dm, model, ref, bank_mib=0)
    want = sample(live, pos, neg, lat, steps=STEPS, seed=3)
    first = sample(small, pos, neg, lat, steps=STEPS, seed=3)
    st1 = _stats(dm, small)
    second = sample(small, pos, neg, lat, steps=STEPS, seed=3)
    st2 = _stats(dm, small)
    bank = dm("nodes.ama").patch_of(small).bank
    print(f"\nbudget {budget_mib:.3f} MiB: stored {st1['bank_stores']}, full {st1['bank_full']}; second run "
          f"{st2['bank_hits']} hits, {st2['ref_passes']} live passes; bank {bank.nbytes} of {bank.budget} B")
    assert torch.equal(first, want) and torch.equal(second, want)
    # whole steps (cond and uncond together) until the budget: the first three steps of the run
    assert st1["bank_stores"] == 6 and st1["bank_full"] == 2 * (STEPS - 3), st1
    banked_sigmas = sorted({s for s, _ in bank.entries}, reverse=True)
    assert banked_sigmas == [float(x) for x in ref.trajectory.sigmas[:3]], banked_sigmas
    assert st2["bank_hits"] == 6 and st2["ref_passes"] == STEPS - 3, st2
    assert bank.nbytes <= bank.budget
