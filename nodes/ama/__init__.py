"""Appearance Matching Self-Attention (AMA) as a MODEL patch, and its API for other nodes.

``patch.py`` makes a patched clone and holds its hooks, ``run.py`` is one sampling run,
``correspond.py`` the run's correspondences, ``settings.py`` the node inputs resolved against the
model's layout. The functions here are what the rest of the pack uses (the guidance sampler, the
diagnostics node); they take either a MODEL or the run-local ``model_options`` that a sampler
function receives in ``extra_args["model_options"]``.
"""

from __future__ import annotations

from ...dreammatcher_core.trajectory import same_sigma
from .correspond import Correspondence
from .keys import CALL_KEY, PATCH_KEY, RUN_KEY
from .patch import AMAPatch, patch_model
from .run import RunState

__all__ = ["AMAPatch", "Correspondence", "PATCH_KEY", "current_correspondence", "get_run",
           "last_diagnostics", "patch_model", "patch_of", "reference_features", "without_run"]


def get_run(model_options: dict) -> RunState | None:
    """The AMA run in progress for these (run-local) ``model_options``, or None.

    Pass ``extra_args["model_options"]`` of a sampler function.
    """
    return model_options.get("transformer_options", {}).get(RUN_KEY)


def without_run(model_options: dict) -> dict:
    """A copy of ``model_options`` in which the AMA patch sits still (no run, no call in flight).

    For model calls that are not a sampling step of the target, e.g. the guidance sampler's own
    reference feature pass: under the run the AMA hooks would take that call for a target call,
    inject into it and record its features as the target's. Nothing is mutated.
    """
    topts = model_options.get("transformer_options", {})
    if RUN_KEY not in topts and CALL_KEY not in topts:
        return model_options
    out = dict(model_options)
    out["transformer_options"] = {k: v for k, v in topts.items() if k not in (RUN_KEY, CALL_KEY)}
    return out


def current_correspondence(model_options: dict, *, chunk_type: int = 0, row: int = 0,
                           resolution: tuple[int, int] | None = None) -> Correspondence | None:
    """The most recent correspondence of target ``row`` for ``chunk_type`` (0 = cond, 1 = uncond).

    Returns a :class:`Correspondence` (``flow_t2r``, ``flow_r2t``, ``cycle_err``, ``confidence``, ``mask``,
    ``sigma``, ``step``) at ``resolution`` (default: the finest AMA resolution seen), or None when no
    correspondence was computed in this run (outside the window, strength 0, no previous-step
    features).
    """
    run = get_run(model_options)
    if run is None:
        return None
    best = None
    for (slot, r, hw), m in run.latest.items():
        if slot != (chunk_type, 0) or r != row:
            continue
        if resolution is not None and tuple(hw) != tuple(resolution):
            continue
        if best is None or m.step > best.step or (m.step == best.step and hw[0] * hw[1] >
                                                  best.flow_t2r.shape[-1] * best.flow_t2r.shape[-2]):
            best = m
    return best


def reference_features(model_options: dict, sigma: float, chunk_type: int,
                       layers: tuple[int, ...]) -> dict | None:
    """The reference's decoder features the AMA run recorded for ``sigma`` and ``chunk_type``, or None.

    ``{layer: [1, C, H, W]}`` from the run's own reference pass (or its bank) at this step, for
    every layer in ``layers``; None when the run has not recorded them (outside its capture steps,
    other layers). Lets the guidance sampler skip a reference pass of its own.
    """
    run = get_run(model_options)
    if run is None:
        return None
    for step, s in enumerate(run.sigmas[:-1]):
        if same_sigma(s, sigma):
            feats = run.corr.ref_feats.get(step, {}).get(chunk_type, {})
            if all(k in feats for k in layers):
                return {k: feats[k] for k in layers}
            return None
    return None


def patch_of(model) -> AMAPatch | None:
    """The AMA patch carried by a MODEL (ModelPatcher), or None if it was not patched."""
    get = getattr(model, "get_attachment", None)
    patch = get(PATCH_KEY) if get is not None else None
    return patch if isinstance(patch, AMAPatch) else None


def last_diagnostics(model) -> tuple[int, list] | None:
    """``(run number, [StepFigures, ...])`` of the last sampling run of an AMA-patched MODEL.

    None if the model carries no AMA patch. The patch (and so this record) is shared by every clone
    of the patched model, so the figures are those of the most recent run of *any* sampler that used
    it; the run number tells runs apart.
    """
    patch = patch_of(model)
    if patch is None:
        return None
    return patch.runs, list(patch.last_diagnostics)
