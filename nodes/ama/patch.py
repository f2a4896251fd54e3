"""The AMA patch on a MODEL: its settings, its hooks, and how a patched clone is made.

:func:`patch_model` clones the MODEL (the input is never mutated), installs the hooks of one
:class:`AMAPatch` on the clone and attaches the patch to it. The hooks are closures over the patch:
attention replaces on the AMA layers (attn1) and the mask layers (attn2), an output-block patch
(decoder features) and keyed OUTER_SAMPLE / APPLY_MODEL wrappers (the per-run state and the
reference pass). A replace another pack installed on one of our keys, before or after us, is
delegated to, never dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...dreammatcher_core import diagnostics as core_diag
from ..host import hooks, sampling
from ..host import model as host_model
from ..layout import PRESETS
from .bank import ReferenceBank
from .keys import CALL_KEY, PATCH_KEY, RUN_KEY
from .run import CallState, RunState
from .settings import AMASettings, resolve_settings

log = logging.getLogger("dreammatcher")


class AMAPatch:
    """The installed patch: settings + reference + install-time delegates.

    Kept on the patched MODEL as a ModelPatcher attachment (``PATCH_KEY``), which clones share by
    reference; it holds no per-run tensors (those live in :class:`~.run.RunState`).
    """

    def __init__(self, settings: AMASettings, reference) -> None:
        self.settings = settings
        self.reference = reference
        self.delegates: dict[tuple[str, tuple], Callable | None] = {}
        self.replaces: dict[tuple[str, tuple], Callable] = {}
        #: Callables ``obs(event, **info)`` (tests, the guidance node); not part of saved state.
        self.observers: list[Callable] = []
        #: Counters of the last finished run (no tensors), for tests and logs.
        self.last_stats: dict = {}
        #: Per-step diagnostics of the last finished run (plain floats; see :func:`last_diagnostics`).
        self.last_diagnostics: list = []
        #: Number of runs this patch has finished (lets a report say which run it describes).
        self.runs = 0
        #: Reference passes kept across this patch's runs (shared by its clones; see ``bank``).
        self.bank = ReferenceBank(settings.bank_mib)

    # ---------------------------------------------------------------- install
    def install(self, patcher) -> None:
        """Install hooks on ``patcher`` (a clone the caller owns)."""
        s = self.settings
        for attn, keys in (("attn1", s.ama_keys), ("attn2", s.mask_keys)):
            for key3 in keys:
                self.delegates[(attn, key3)] = hooks.existing_attn_replace(patcher.model_options, attn, key3)
                fn = self._make_replace(attn, key3)
                self.replaces[(attn, key3)] = fn
                hooks.set_attn_replace(patcher, attn, key3, fn)
        hooks.add_output_block_patch(patcher, self._make_output_block_patch())
        hooks.add_keyed_wrapper(patcher, "outer_sample", PATCH_KEY, self._make_outer_sample())
        hooks.add_keyed_wrapper(patcher, "apply_model", PATCH_KEY, self._make_apply_model())

    def finish_run(self, run: RunState) -> None:
        """Keep the run's diagnostics (floats only) and log them: a summary line at INFO when anything
        was injected, one line per step at DEBUG."""
        self.runs += 1
        try:
            steps = run.figures.summary()
        except Exception:  # diagnostics must never mask the sampler's own exception
            log.debug("DreamMatcher AMA: diagnostics unavailable", exc_info=True)
            steps = []
        self.last_diagnostics = steps
        if not run.active:
            return
        log.info("DreamMatcher AMA: %s", core_diag.format_summary(steps))
        for f in steps:
            log.debug("DreamMatcher AMA step %d (sigma %.4g): confidence coverage %.3f, mask area %.3f, "
                      "gate>0.5 %.3f (%d row%s)", f.step, f.sigma, f.confidence_coverage, f.mask_area,
                      f.gate_above_half, f.rows, "" if f.rows == 1 else "s")

    def resolve_delegates(self, transformer_options: dict) -> dict:
        """Delegates for this run: the install-time replace, or a 2-tuple replace another pack added
        *after* us (our 3-tuple key shadows it, so we must call it ourselves)."""
        out = {}
        for (attn, key3), fn in self.replaces.items():
            table = hooks.attn_replace_table(transformer_options, attn)
            delegate = self.delegates.get((attn, key3))
            if table.get(key3) is not fn:
                log.warning("DreamMatcher AMA: another node replaced %s %s after the AMA patch; AMA is "
                            "inactive on that layer unless that node delegates to it.", attn, key3)
            later = table.get(key3[:2])
            if delegate is None and later is not None and getattr(later, "_dm_patch", None) is None:
                delegate = later
            out[(attn, key3)] = delegate
        return out

    def _attend(self, run: RunState | None, attn: str, key3, q, k, v, extra_options):
        delegate = run.delegates.get((attn, key3)) if run is not None else self.delegates.get((attn, key3))
        if delegate is not None:
            return delegate(q, k, v, extra_options)
        return hooks.call_attention(q, k, v, extra_options)

    def _make_replace(self, attn: str, key3):
        patch = self

        def replace(q, k, v, extra_options, **kwargs):
            run = extra_options.get(RUN_KEY)
            call = extra_options.get(CALL_KEY)
            if run is None or run.patch is not patch or call is None or call.run is not run:
                return patch._attend(run if run is not None and run.patch is patch else None,
                                     attn, key3, q, k, v, extra_options)
            if attn == "attn1":
                v = run.on_self_attn(call, key3, q, k, v, extra_options)
            else:
                run.on_cross_attn(call, q, k, extra_options)
            return patch._attend(run, attn, key3, q, k, v, extra_options)

        replace._dm_patch = patch
        return replace

    def _make_output_block_patch(self):
        patch = self

        def output_block_patch(h, hsp, transformer_options):
            run = transformer_options.get(RUN_KEY)
            call = transformer_options.get(CALL_KEY)
            if run is not None and run.patch is patch and call is not None and call.run is run:
                layer = hooks.output_layer(transformer_options)
                if layer is not None:
                    run.on_output_block(call, layer, h)
            return h, hsp

        output_block_patch._dm_patch = patch
        return output_block_patch

    def _make_outer_sample(self):
        patch = self

        def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
            model_options = hooks.outer_sample_model_options(executor)
            model_patcher = hooks.outer_sample_model_patcher(executor)
            sampling.refuse_multigpu(model_patcher=model_patcher, model_options=model_options, what="AMA")
            topts = model_options.setdefault("transformer_options", {})
            run = RunState(patch, sigmas, model_patcher, topts)
            previous = topts.get(RUN_KEY)
            topts[RUN_KEY] = run
            try:
                out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
                run.corr.check_finite()  # the last step's descriptors
                return out
            finally:
                patch.last_stats = dict(run.stats, active_steps=sorted(run.active))
                patch.finish_run(run)
                run.close()
                if previous is None:
                    topts.pop(RUN_KEY, None)
                else:
                    topts[RUN_KEY] = previous

        outer_sample._dm_patch = patch
        return outer_sample

    def _make_apply_model(self):
        patch = self

        def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                        transformer_options=None, **kwargs):
            topts = transformer_options if transformer_options is not None else {}
            run = topts.get(RUN_KEY)
            if run is None or run.patch is not patch or not run.capture:
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            step = run.step_of(t)
            cou = hooks.chunk_labels(topts)
            if step is None or step not in run.capture or x.shape[0] % max(1, len(cou)):
                if step is None:
                    run.stats["off_schedule"] += 1
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            run.begin_step(step)
            run.prefetch(step, cou, x.shape[0])
            have = run.ref_v.get(step, {})
            missing = [ty for ty in dict.fromkeys(cou) if ty not in have]
            if missing:
                run.reference_pass(executor, step, missing, x, t, c_crossattn, topts, kwargs, cou)
            call = CallState(run, "inject", step, cou, x.shape[0])
            topts2 = dict(topts)
            topts2[CALL_KEY] = call
            run.stats["target_calls"] += 1
            out = executor(x, t, c_concat, c_crossattn, control, topts2, **kwargs)
            run.finish_call(call)
            return out

        apply_model._dm_patch = patch
        return apply_model


def patch_model(model, reference, strength: float = 1.0, start_percent: float = 0.08,
                end_percent: float = 1.0, layer_preset: str = PRESETS[0], custom_layers: str = "",
                features=None, match=None, mask=None, bank_mib: float = 0.0):
    """Return a patched clone of ``model`` (the input MODEL is never mutated).

    Raises ValueError early and clearly: reference made for another model family, unknown preset
    or layers, a second AMA patch on the same model.
    """
    if reference is None or not hasattr(reference, "trajectory"):
        raise ValueError("Connect a DM_REFERENCE (from DM_InvertReference or DM_LoadReference) to "
                         "'reference'.")
    reference.check_model(model)
    if hooks.has_keyed_wrapper(model, "outer_sample", PATCH_KEY):
        raise ValueError("This MODEL already carries a DreamMatcher AMA patch; use one AMA Model Patch per "
                         "model (connect the unpatched model instead).")
    settings = resolve_settings(host_model.unet_layout(model), strength=strength, start_percent=start_percent,
                                end_percent=end_percent, layer_preset=layer_preset,
                                custom_layers=custom_layers, features=features, match=match, mask=mask,
                                bank_mib=bank_mib)
    patched = model.clone()
    patch = AMAPatch(settings, reference)
    patch.install(patched)
    patched.set_attachments(PATCH_KEY, patch)
    return patched
