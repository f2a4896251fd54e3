"""One sampling run of a model carrying the AMA patch: window, reference pass, capture, gating, injection.

This is the method of DreamMatcher (``docs/method.md``, "Appearance matching self-attention") as a
*model patch*: it works with the stock samplers because everything happens in hooks ComfyUI calls
anyway (:mod:`.patch` installs them). Pure orchestration: the maths lives in ``dreammatcher_core``,
hook arguments are read through ``host.hooks``.

Per model call (``APPLY_MODEL`` wrapper):

1. **Reference pass.** When the call's sigma is a *capture step* (the active window plus the step
   just before it), and the reference pass for that step and chunk type is not cached yet, the UNet
   runs once on the replayed reference latent ``trajectory.at(sigma)`` with one row per chunk type
   present in ``cond_or_uncond`` (reference positive for cond = 0, reference negative for
   uncond = 1; routed by ``cond_or_uncond``, never by position). That call carries a ``record``
   :class:`CallState` and stores the reference V of every AMA layer and the reference decoder
   features. A batch of B targets reuses it; a cond/uncond split (low memory) only computes the
   missing chunk types (cache per step and chunk type).
2. **Target pass** in ``inject`` mode. The output-block patch captures the target's decoder
   features (used at the *next* step: official "t+1"); the attn2 replace on the
   mask layers accumulates cross-attention probabilities of the subject tokens; the attn1
   replace on the AMA layers computes ``V' = V + strength * mask * conf * (warp(V_ref) - V)``
   and runs the target's own Q/K with V' through the same kernel (or the delegated replace).

Matching per step is :class:`~.correspond.CorrespondenceCache`'s: from the previous step's features,
once per (step, chunk slot, row) and grid pair.

Documented choices (deviations from the official code are marked ⚠):

* No previous-step features (the window starts at the first step) → that step is not injected.
* Sigmas not in the trajectory: the run fails *before sampling* with a clear error naming the
  nearest sigmas (no interpolation). Off-schedule evaluations that some samplers make between
  schedule sigmas (e.g. DPM2 midpoints) are passed through without injection.
* ⚠ Uncond chunks use the cond mask of the *previous* step of the same row (the official code uses
  the current step's cond mask). WHY: ComfyUI runs uncond *before* cond when it splits the batch
  (low memory), so the current cond mask does not exist yet for the uncond call; using the
  previous step's keeps results independent of how ComfyUI batches. If no previous cond mask exists
  (cfg with a window starting at the first step), the uncond chunk's own attention is used.
* Several reference images (N > 1): the first one is used.
* Reference pass extras: ControlNet ``control`` is not applied to the reference; per-row extra
  conds (e.g. SDXL ``y``) are taken from the target rows of the same chunk type, because the
  reference has no size/pooled conditioning of its own.
* ``strength`` 0 or a window that contains no step: no reference pass, every replace delegates to
  exactly the kernel (or replace) the vanilla path would call → bit-identical output.

``AMAPatch.observers`` receive ``("match", call=, chunk=, row=, match=)`` and ``("inject", call=,
key=, chunk=, row=, hw=, delta=, gate=)`` events.
"""

from __future__ import annotations

import torch

from ...dreammatcher_core import ama as core_ama
from ...dreammatcher_core import diagnostics as core_diag
from ...dreammatcher_core import masks as core_masks
from ...dreammatcher_core import matching as core_matching
from ...dreammatcher_core.trajectory import same_sigma
from ..capture import subject_mask, subject_token_map, user_mask
from ..host import hooks
from ..host import model as host_model
from .bank import Fingerprint
from .correspond import Correspondence, CorrespondenceCache, chunk_slots
from .refpass import RefRecord, reference_pass


class CallState:
    """State of one UNet call: its mode, step, chunk layout and the mask accumulators."""

    def __init__(self, run: RunState, mode: str, step: int, cou: list[int], rows: int) -> None:
        self.run, self.mode, self.step, self.cou = run, mode, step, list(cou)
        self.chunks = len(self.cou)
        self.B = rows // max(1, self.chunks)
        self.slots = chunk_slots(self.cou)
        #: Per chunk, the subject token map ``[B, 1, h, w]`` of every mask layer seen in this call.
        self.mask_maps: dict[int, list[torch.Tensor]] = {}
        self.gates: dict = {}
        self.store_v = True

    def __deepcopy__(self, memo):
        return self

    def token_map(self, c: int) -> torch.Tensor | None:
        """Mean subject cross-attention of chunk ``c`` over the mask layers: ``[B, 1, h, w]`` (None if
        not seen). ``capture.subject_mask`` turns it into the foreground mask."""
        maps = self.mask_maps.get(c)
        return core_masks.mean_token_map(maps) if maps else None


class RunState:
    """One sampling run of a patched model: window, banks and caches. Created in OUTER_SAMPLE and
    dropped in its ``finally``; nothing here outlives the run (and nothing here is deep-copied)."""

    def __init__(self, patch, sigmas: torch.Tensor, model_patcher, transformer_options: dict):
        self.patch = patch
        s = patch.settings
        self.sigmas = [float(x) for x in sigmas.detach().float().cpu()]
        steps = len(self.sigmas) - 1
        self.active: set[int] = set()
        if s.strength > 0 and s.end_percent > s.start_percent:
            hi = host_model.percent_to_sigma(model_patcher, s.start_percent)
            lo = host_model.percent_to_sigma(model_patcher, s.end_percent)
            self.active = {i for i in range(steps) if lo <= self.sigmas[i] <= hi}
        self.capture = set(self.active) | {i - 1 for i in self.active if i > 0}
        traj = patch.reference.trajectory
        for i in sorted(self.capture):
            try:
                traj.index_of(self.sigmas[i])
            except ValueError as exc:
                raise ValueError(
                    f"DreamMatcher AMA: sampling step {i} (sigma {self.sigmas[i]:.6g}) is not in the "
                    f"reference trajectory. {exc} Use the same steps and scheduler in the sampler as in "
                    "DM_InvertReference."
                ) from None
        self.delegates = patch.resolve_delegates(transformer_options)
        self.ref_v: dict[int, dict[int, RefRecord]] = {}
        self.cond_masks: dict[int, dict] = {}
        #: Latest gated correspondence per (slot, row, grid): what ``current_correspondence`` reads.
        self.latest: dict = {}
        self.cur_step = -1
        #: Per-step gate figures of the cond rows (diagnostics), at the finest resolution matched.
        self.figures = core_diag.StepLog()
        self.stats = {"ref_passes": 0, "ref_rows": 0, "target_calls": 0, "injected": 0, "descriptors": 0,
                      "flows": 0, "skipped_no_features": 0, "off_schedule": 0, "prefetched": 0,
                      "bank_hits": 0, "bank_stores": 0, "bank_full": 0}
        self.corr = CorrespondenceCache(s.feature_layers, s.pca_dim, self.sigmas, self.stats, s.pca_solver)
        #: The patch's reference bank when it may be used in this run (else None: all passes live).
        self.bank = None
        if self.active:  # a run that injects nothing neither uses nor resets the bank
            items = host_model.unet_call_fingerprint(model_patcher, transformer_options)
            fingerprint = Fingerprint((patch.reference, *items)) if items is not None else None
            self.bank = patch.bank if patch.bank.begin_run(fingerprint) else None

    def __deepcopy__(self, memo):
        return self

    # ---------------------------------------------------------------- steps
    def step_of(self, t: torch.Tensor) -> int | None:
        """Schedule index of the call's sigma (None if off-schedule or rows disagree)."""
        tt = t.detach().float().reshape(-1).cpu()  # one host transfer, then CPU-only checks
        sigma = float(tt[0])
        if tt.numel() > 1 and not bool((tt == tt[0]).all()):
            return None
        for i, s in enumerate(self.sigmas[:-1]):
            if same_sigma(sigma, s):
                return i
        return None

    def begin_step(self, step: int) -> None:
        """Drop everything older than the previous step (the reference V bank holds only this step)."""
        if step == self.cur_step:
            return
        self.cur_step = step
        self.corr.begin_step(step)
        for k in [k for k in self.cond_masks if k < step - 1]:
            del self.cond_masks[k]
        for k in [k for k in self.ref_v if k != step]:
            del self.ref_v[k]

    def close(self) -> None:
        for d in (self.ref_v, self.cond_masks, self.latest):
            d.clear()
        self.corr.clear()
        self.figures = core_diag.StepLog()

    # ---------------------------------------------------------------- reference pass
    def make_call(self, mode: str, step: int, cou: list[int], rows: int) -> CallState:
        return CallState(self, mode, step, cou, rows)

    def reference_pass(self, executor, step: int, types: list[int], x, t, c_crossattn, transformer_options,
                       kwargs, cou: list[int]) -> None:
        """The reference branch of ``step`` for the chunk types ``types`` (:mod:`.refpass`)."""
        reference_pass(self, executor, step, types, x, t, c_crossattn, transformer_options, kwargs, cou)

    # ---------------------------------------------------------------- capture hooks
    def on_output_block(self, call: CallState, layer: int, h: torch.Tensor) -> None:
        """Keep the output of decoder layer ``layer`` per row (reference rows by chunk type)."""
        if layer not in self.patch.settings.feature_layers or call.step not in self.capture:
            return
        if call.mode == "record":
            bank = self.corr.ref_feats.setdefault(call.step, {})
            for j, ty in enumerate(call.cou):
                bank.setdefault(ty, {}).setdefault(layer, h[j:j + 1].detach())
            return
        bank = self.corr.tgt_feats.setdefault(call.step, {})
        for c, slot in enumerate(call.slots):
            for r in range(call.B):
                i = c * call.B + r
                bank.setdefault((slot, r), {}).setdefault(layer, h[i:i + 1].detach())

    def needs_own_mask(self, call: CallState, c: int, r: int = 0) -> bool:
        ty, occ = call.slots[c]
        if ty == 0:
            return True
        return (0, r) not in self.cond_masks.get(call.step - 1, {})

    def on_cross_attn(self, call: CallState, q, k, extra_options) -> None:
        """Accumulate head-mean softmax probabilities of the subject tokens (N × T per head: cheap)."""
        s = self.patch.settings
        if call.mode != "inject" or call.step not in self.capture or not s.auto_mask or k is None:
            return
        hw = hooks.attention_grid(extra_options, q)
        if hw is None:
            return
        tokens = list(s.subject_tokens)
        if max(tokens) >= k.shape[1]:
            raise ValueError(
                f"DreamMatcher AMA: subject token {max(tokens)} is outside the target conditioning "
                f"({k.shape[1]} tokens). Re-resolve the subject on Match Settings (or Semantic Match) with "
                "the prompt you sample with."
            )
        B = call.B
        for c in range(call.chunks):
            if not any(self.needs_own_mask(call, c, r) for r in range(B)):
                continue
            m = subject_token_map(q[c * B:(c + 1) * B], k[c * B:(c + 1) * B], hooks.heads(extra_options),
                                  tokens)  # [B, N]
            call.mask_maps.setdefault(c, []).append(m.reshape(B, 1, *hw))

    def finish_call(self, call: CallState) -> None:
        """After a target call: remember its cond masks (uncond chunks of the next step use them)."""
        if call.mode != "inject" or not self.patch.settings.auto_mask:
            return
        for c, (ty, occ) in enumerate(call.slots):
            if ty != 0 or occ != 0:
                continue
            m = call.token_map(c)
            if m is None:
                continue
            bank = self.cond_masks.setdefault(call.step, {})
            for r in range(call.B):
                bank.setdefault((0, r), m[r:r + 1])

    # ---------------------------------------------------------------- gating
    def token_map_of(self, call: CallState, c: int, r: int) -> torch.Tensor | None:
        """The subject token map ``[1, 1, h, w]`` that gates chunk ``c`` row ``r`` (None: no evidence).

        Cond chunks use their own; uncond chunks use the cond map of the previous step of the same
        row (see the module docstring), falling back to their own. Remembers the first cond map of
        the step for the next step's uncond chunks.
        """
        ty, occ = call.slots[c]
        m = self.cond_masks.get(call.step - 1, {}).get((0, r)) if ty != 0 else None
        if m is None:
            own = call.token_map(c)
            if own is None:
                return None
            m = own[r:r + 1]
            if ty == 0 and occ == 0:
                self.cond_masks.setdefault(call.step, {}).setdefault((0, r), m)
        return m

    def mask_at(self, call: CallState, c: int, r: int, hw: tuple[int, int], device) -> torch.Tensor:
        """Foreground mask ``[1,1,H,W]`` of chunk ``c`` row ``r`` at an AMA resolution."""
        s = self.patch.settings
        if s.user_mask is not None:
            return user_mask(s.user_mask, r, hw, device)
        m = self.token_map_of(call, c, r) if s.auto_mask else None
        if m is None:
            return torch.ones(1, 1, *hw, device=device)
        return subject_mask(m.to(device), s.mask_mode, hw)

    def prefetch(self, step: int, cou: list[int], rows: int) -> None:
        """Correspondences of an active step, computed before its UNet passes (``CorrespondenceCache``)."""
        if step in self.active:
            self.corr.prefetch(step, cou, rows)

    def gate(self, call: CallState, c: int, r: int, hw_t, hw_r, device) -> torch.Tensor | None:
        """``mask * confidence`` ``[1,1,Ht,Wt]`` for chunk c row r (cached per call and resolution)."""
        key = (c, r, tuple(hw_t), tuple(hw_r))
        if key not in call.gates:
            m = self.corr.get(call.step, call.slots[c], r, hw_t, hw_r)
            if m is None:
                call.gates[key] = None
                self.stats["skipped_no_features"] += 1
            else:
                mask = self.mask_at(call, c, r, tuple(hw_t), device)
                conf = core_matching.confidence(m.cycle_err.to(device), mask.to(m.cycle_err.dtype),
                                                self.patch.settings.lambda_c)
                info = Correspondence(m.flow_t2r, m.flow_r2t, m.cycle_err, conf, mask, m.sigma, m.step)
                self.latest[(call.slots[c], r, tuple(hw_t))] = info
                self.record_figures(call, c, r, info)
                for obs in self.patch.observers:
                    obs("match", call=call, chunk=c, row=r, match=info)
                call.gates[key] = (mask * conf).to(device)
        return call.gates[key]

    def record_figures(self, call: CallState, c: int, r: int, info: Correspondence) -> None:
        """Diagnostics: remember the gate figures of cond row ``r`` at this step's finest resolution.

        Only the first cond chunk is recorded (uncond rows reuse the cond mask, and their figures
        would double-count); no host synchronisation happens here (see ``StepLog``).
        """
        if call.slots[c] != (0, 0) or info.confidence is None or info.mask is None:
            return
        cells = info.confidence.shape[-1] * info.confidence.shape[-2]
        figures = core_diag.gate_figures(info.confidence, info.mask)
        self.figures.record(call.step, r, info.sigma, figures, cells)

    # ---------------------------------------------------------------- attention
    def on_self_attn(self, call: CallState, key3, q, k, v, extra_options) -> torch.Tensor:
        """V for the attention of one AMA layer (the original ``v`` if nothing is injected)."""
        hw = hooks.attention_grid(extra_options, q)
        if hw is None or k is None or v is None:
            return v
        if call.mode == "record":
            if call.store_v:
                for j, ty in enumerate(call.cou):
                    rec = self.ref_v.get(call.step, {}).get(ty)
                    if rec is not None:
                        rec.v[key3] = (v[j:j + 1].detach(), hw)
            return v
        if call.step not in self.active:
            return v
        s = self.patch.settings
        out = None
        B = call.B
        for c, (ty, _occ) in enumerate(call.slots):
            rec = self.ref_v.get(call.step, {}).get(ty)
            if rec is None or key3 not in rec.v:
                continue
            v_ref, hw_r = rec.v[key3]
            for r in range(B):
                g = self.gate(call, c, r, hw, hw_r, v.device)
                if g is None:
                    continue
                m = self.corr.get(call.step, call.slots[c], r, hw, hw_r)
                warped = core_matching.warp_tokens(v_ref, m.flow_t2r.to(v.device), hw_r, integral=True)
                i = c * B + r
                new = core_ama.inject_values(v[i:i + 1], warped, s.strength * g.reshape(1, -1, 1))
                if out is None:
                    out = v.clone()
                out[i:i + 1] = new
                for obs in self.patch.observers:
                    obs("inject", call=call, key=key3, chunk=c, row=r, hw=hw, delta=new - v[i:i + 1], gate=g)
        if out is None:
            return v
        self.stats["injected"] += 1
        return out
