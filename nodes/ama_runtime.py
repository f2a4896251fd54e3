"""Per-run orchestration of Appearance Matching Self-Attention (AMA) inside ComfyUI sampling.

This is the method of DreamMatcher (method.md §0-§5) as a *model patch*: it works with the stock
samplers because everything happens in hooks ComfyUI calls anyway. Pure orchestration: the math
lives in ``dreammatcher_core``, the ComfyUI plumbing in ``nodes.host``.

Design (comfyui-host.md §11, design B), per model call (``APPLY_MODEL`` wrapper):

1. **Reference pass.** When the call's sigma is a *capture step* (the active window plus the step
   just before it), and the reference pass for that step and chunk type is not cached yet, the UNet
   runs once on the replayed reference latent ``trajectory.at(sigma)`` with one row per chunk type
   present in ``cond_or_uncond`` (reference positive for cond = 0, reference negative for
   uncond = 1; routed by ``cond_or_uncond``, never by position). That call carries a ``record``
   :class:`CallState` and stores the reference V of every AMA layer and the reference decoder
   features. A batch of B targets reuses it; a cond/uncond split (low memory) only computes the
   missing chunk types (cache per step and chunk type).
2. **Target pass** in ``inject`` mode. The output-block patch captures the target's decoder
   features (used at the *next* step: official "t+1", method.md §2); the attn2 replace on the
   mask layers accumulates cross-attention probabilities of the subject tokens; the attn1
   replace on the AMA layers computes ``V' = V + strength * mask * conf * (warp(V_ref) - V)``
   and runs the target's own Q/K with V' through the same kernel (or the delegated replace).

Matching per step: the descriptor (per-layer co-PCA, resize, concat, L2) is built once per
(step, chunk slot, row) from the previous step's features; flows and the cycle error are computed
once per AMA resolution and cached for all layers at that resolution.

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

Stable API for other nodes (the Matching Guidance sampler, the inspector), all taking the run-local
``model_options`` a sampler receives in ``extra_args["model_options"]``:
:func:`get_run`, :func:`current_match` (flows, cycle error, confidence, mask, sigma, step of the latest
matched step), :func:`current_features` (reference and target decoder features captured by the latest
pass) and :func:`reference_latent`. Diagnostics of the last finished run (per-step confidence
coverage, mask area, gate > 0.5; logged at DEBUG, summarised at INFO): :func:`last_diagnostics`
on a patched MODEL. Pure helpers: :func:`ama_blocks`, :func:`mask_blocks`,
:func:`default_feature_layers`, :func:`describe`. ``AMAPatch.observers`` receive ``("match", call=,
chunk=, row=, match=)`` and ``("inject", call=, key=, chunk=, row=, hw=, delta=, gate=)`` events.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import host

log = logging.getLogger("dreammatcher")

#: ``transformer_options`` key of the holder (the patch's static configuration).
HOLDER_KEY = "dreammatcher_ama"
#: ``transformer_options`` key of the per-run :class:`RunState` (set in OUTER_SAMPLE, dropped after).
RUN_KEY = "dreammatcher_ama_run"
#: ``transformer_options`` key of the per-call :class:`CallState` (set on a copy for one UNet call).
CALL_KEY = "dreammatcher_ama_call"

PRESETS = ("paper (decoder 32²+64²)", "all decoder", "custom")

#: Official/default feature layers (output-block ids whose *output* feeds the descriptor).
DEFAULT_FEATURE_LAYERS = {"sd15": (5, 8), "sdxl": (2, 5)}


def _core():
    from ..dreammatcher_core import matching

    return matching


def _features():
    from ..dreammatcher_core import features

    return features


def _masks():
    from ..dreammatcher_core import masks

    return masks


def _ama():
    from ..dreammatcher_core import ama

    return ama


def _diag():
    from ..dreammatcher_core import diagnostics

    return diagnostics


# ==================================================================================== settings
@dataclass(frozen=True)
class AMASettings:
    """Everything the patch needs, resolved against the model's layout (no tensors but ``user_mask``)."""

    strength: float
    start_percent: float
    end_percent: float
    ama_keys: tuple[tuple[str, int, int], ...]
    mask_keys: tuple[tuple[str, int, int], ...]
    feature_layers: tuple[int, ...]
    pca_dim: int
    lambda_c: float
    mask_mode: str
    subject_tokens: tuple[int, ...]
    user_mask: torch.Tensor | None = None

    @property
    def auto_mask(self) -> bool:
        """Whether the foreground mask comes from cross-attention (needs the attn2 replaces)."""
        return self.user_mask is None and self.mask_mode != "none" and len(self.subject_tokens) > 0

    def __deepcopy__(self, memo):
        return self


def parse_custom_layers(text: str) -> tuple[int, ...]:
    """"6,7,8" or "6-11" → output-block ids (all transformer indices of each block)."""
    ids: list[int] = []
    for part in text.replace(";", ",").replace(" ", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(p) for p in part.split("-", 1))
                ids.extend(range(min(a, b), max(a, b) + 1))
            else:
                ids.append(int(part))
        except ValueError:
            raise ValueError(
                f"custom_layers must list decoder output-block ids like '6,7,8,9,10,11' or '6-11'; "
                f"got '{text}'."
            ) from None
    return tuple(sorted(set(ids)))


def ama_blocks(layout: host.UNetLayout, preset: str, custom: str) -> tuple[host.AttnBlock, ...]:
    """Decoder attention blocks that get AMA.

    * paper: the decoder attention blocks at the two finest decoder attention resolutions — SD1.5
      output 6..11 (32²+64² at 512², the official up_blocks 2-3), SDXL output 0..5 (32²+64² at 1024²).
    * all decoder: every decoder attention block (SD1.5 3..11, SDXL 0..5).
    * custom: the listed output-block ids (every transformer index of each).
    """
    decoder = layout.decoder()
    if preset == PRESETS[0]:
        finest = sorted({b.factor for b in decoder})[:2]
        chosen = tuple(b for b in decoder if b.factor in finest)
    elif preset == PRESETS[1]:
        chosen = decoder
    elif preset == PRESETS[2]:
        ids = parse_custom_layers(custom)
        valid = [b.id for b in decoder]
        bad = [i for i in ids if i not in valid]
        if not ids or bad:
            raise ValueError(
                f"custom_layers: {bad or 'nothing'} is not a decoder attention block of this model; "
                f"valid output-block ids are {valid}."
            )
        chosen = tuple(b for b in decoder if b.id in ids)
    else:
        raise ValueError(f"layer_preset must be one of {list(PRESETS)}; got '{preset}'.")
    return chosen


def mask_blocks(layout: host.UNetLayout, ama: tuple[host.AttnBlock, ...]) -> tuple[host.AttnBlock, ...]:
    """Cross-attention blocks whose maps form the foreground mask.

    Official SD1.5: the five 16×16 layers (input 7, 8, output 3, 4, 5), i.e. the coarsest
    non-middle attention resolution, all of which run before the first AMA layer. The rule here:
    the cross-attention blocks at the coarsest encoder attention resolution that run *before the
    first AMA block* (so the mask is complete when AMA needs it): SD1.5 paper → input 7, 8 and
    output 3, 4, 5; SDXL paper → input 7, 8 and middle (all transformer indices).
    """
    coarsest = max(b.factor for b in layout.blocks if b.name == "input")
    first_ama = min(b.id for b in ama)
    out = []
    for b in layout.blocks:
        if not b.cross or b.factor != coarsest:
            continue
        if b.name == "output" and b.id >= first_ama:
            continue
        out.append(b)
    if not out:
        raise ValueError("No cross-attention layer runs before the chosen AMA layers, so no automatic "
                         "foreground mask can be computed; choose later decoder layers or connect a MASK.")
    return tuple(out)


def default_feature_layers(layout: host.UNetLayout) -> tuple[int, ...]:
    """SD1.5: outputs of output blocks 5 and 8 (official up_feat2/up_feat3); SDXL: blocks 2 and 5."""
    return DEFAULT_FEATURE_LAYERS.get(layout.family, DEFAULT_FEATURE_LAYERS["sd15"])


def resolve_settings(layout: host.UNetLayout, *, strength: float, start_percent: float, end_percent: float,
                     layer_preset: str, custom_layers: str, features=None, match=None,
                     mask: torch.Tensor | None = None) -> AMASettings:
    """Turn node inputs (+ optional DM_FEATURES / DM_MATCH configs) into :class:`AMASettings`."""
    ama = ama_blocks(layout, layer_preset, custom_layers)
    ama_keys = tuple(("output", b.id, i) for b in ama for i in range(b.depth))
    layers = tuple(getattr(features, "layers", None) or default_feature_layers(layout))
    n_out = len(layout.output_factor)
    bad = [k for k in layers if not 0 <= k < n_out - 1]
    if bad:
        raise ValueError(f"feature layers {bad} are not usable: output-block ids 0..{n_out - 2} are "
                         "available (the last block's output is not observable).")
    pca_dim = int(getattr(features, "pca_dim", 256) or 256)
    lambda_c = float(getattr(match, "lambda_c", 0.4))
    mask_mode = str(getattr(match, "mask_mode", "soft"))
    if mask_mode not in ("soft", "binary", "none"):
        raise ValueError(f"mask_mode must be 'soft', 'binary' or 'none'; got '{mask_mode}'.")
    tokens = tuple(int(t) for t in getattr(match, "subject_tokens", ()) or ())
    user_mask = mask
    if user_mask is None and getattr(match, "mask", None) is not None:
        user_mask = getattr(match.mask, "tensor", match.mask)
    if user_mask is not None:
        user_mask = user_mask.detach().float().cpu()
        if user_mask.ndim == 2:
            user_mask = user_mask[None]
        if user_mask.ndim != 3:
            raise ValueError(f"mask must be a ComfyUI MASK [B, H, W]; got shape {tuple(user_mask.shape)}.")
    auto = user_mask is None and mask_mode != "none" and len(tokens) > 0
    mkeys: tuple = ()
    if auto:
        mkeys = tuple((b.name, b.id, i) for b in mask_blocks(layout, ama) for i in range(b.depth))
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in 0..1, got {strength}.")
    return AMASettings(float(strength), float(start_percent), float(end_percent), ama_keys, mkeys, layers,
                       pca_dim, lambda_c, mask_mode, tokens, user_mask)


# ================================================================================= descriptor
def describe(tgt: list[torch.Tensor], ref: list[torch.Tensor],
             pca_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Official descriptor (method.md §2.2) of one target row and the reference → ``(desc_t, desc_r)``.

    ``tgt``/``ref``: the same decoder layers, ``[1, C_l, H_l, W_l]`` each (the core's
    ``features.describe``: per-layer co-PCA, resize to each side's finest grid, concat, L2).
    """
    from ..dreammatcher_core import features

    desc_r, desc_t = features.describe(ref, tgt, pca_dim=pca_dim)
    return desc_t, desc_r


# ==================================================================================== states
@dataclass
class RefRecord:
    """The reference pass of one step and chunk type: V per AMA layer and decoder features."""

    v: dict = field(default_factory=dict)  # key3 -> ([1, N, C], (H, W))
    feats: dict = field(default_factory=dict)  # output-block id -> [1, C, H, W]


@dataclass
class Match:
    """The correspondence of one target row at one resolution (what :func:`current_match` returns)."""

    flow_t2r: torch.Tensor  # [1, 2, Ht, Wt]
    flow_r2t: torch.Tensor  # [1, 2, Hr, Wr]
    cycle_err: torch.Tensor  # [1, 1, Ht, Wt]
    confidence: torch.Tensor | None = None  # [1, 1, Ht, Wt]
    mask: torch.Tensor | None = None  # [1, 1, Ht, Wt]
    sigma: float = 0.0
    step: int = -1


def chunk_slots(cou: list[int]) -> list[tuple[int, int]]:
    """``(chunk type, occurrence of that type)`` per chunk of ``cond_or_uncond`` (e.g. [1, 0] ->
    [(1, 0), (0, 0)]); the key under which a chunk's features and matches are stored."""
    occ: dict[int, int] = {}
    slots = []
    for ty in cou:
        slots.append((ty, occ.get(ty, 0)))
        occ[ty] = occ.get(ty, 0) + 1
    return slots


class CallState:
    """State of one UNet call: its mode, step, chunk layout and the mask accumulators."""

    def __init__(self, run: RunState, mode: str, step: int, cou: list[int], rows: int) -> None:
        self.run, self.mode, self.step, self.cou = run, mode, step, list(cou)
        self.chunks = len(self.cou)
        self.B = rows // max(1, self.chunks)
        self.slots = chunk_slots(self.cou)
        self.mask_sum: dict[int, torch.Tensor] = {}
        self.mask_n: dict[int, int] = {}
        self.mask_hw: tuple[int, int] | None = None
        self.gates: dict = {}
        self.store_v = True

    def __deepcopy__(self, memo):
        return self

    def soft_mask(self, c: int) -> torch.Tensor | None:
        """Min-max normalised mean cross-attention of chunk ``c``: ``[B, 1, h, w]`` (None if not seen)."""
        if c not in self.mask_sum or self.mask_hw is None:
            return None
        m = (self.mask_sum[c] / self.mask_n[c]).reshape(self.B, 1, *self.mask_hw)
        return _masks().minmax_normalise(m)


class RunState:
    """One sampling run of a patched model: window, banks and caches. Created in OUTER_SAMPLE and
    dropped in its ``finally``; nothing here outlives the run (and nothing here is deep-copied)."""

    def __init__(self, holder: AMAPatch, sigmas: torch.Tensor, model_patcher, transformer_options: dict):
        self.holder = holder
        s = holder.settings
        self.sigmas = [float(x) for x in sigmas.detach().float().cpu()]
        steps = len(self.sigmas) - 1
        self.active: set[int] = set()
        if s.strength > 0 and s.end_percent > s.start_percent:
            hi = host.percent_to_sigma(model_patcher, s.start_percent)
            lo = host.percent_to_sigma(model_patcher, s.end_percent)
            self.active = {i for i in range(steps) if lo <= self.sigmas[i] <= hi}
        self.capture = set(self.active) | {i - 1 for i in self.active if i > 0}
        traj = holder.reference.trajectory
        for i in sorted(self.capture):
            try:
                traj.index_of(self.sigmas[i])
            except ValueError as exc:
                raise ValueError(
                    f"DreamMatcher AMA: sampling step {i} (sigma {self.sigmas[i]:.6g}) is not in the "
                    f"reference trajectory. {exc} Use the same steps and scheduler in the sampler as in "
                    "DM_InvertReference."
                ) from None
        self.delegates = holder.resolve_delegates(transformer_options)
        self.ref_v: dict[int, dict[int, RefRecord]] = {}
        self.ref_feats: dict[int, dict[int, dict]] = {}
        self.tgt_feats: dict[int, dict] = {}
        self.cond_masks: dict[int, dict] = {}
        self.desc: dict = {}
        self.flows: dict = {}
        #: (target grid, reference grid) pairs matched so far in this run (see :meth:`prefetch`).
        self.match_grids: set = set()
        self.latest: dict = {}
        self.cur_step = -1
        #: Per-step gate figures of the cond rows (diagnostics), at the finest resolution matched.
        self.figures = _diag().StepLog()
        self.stats = {"ref_passes": 0, "ref_rows": 0, "target_calls": 0, "injected": 0, "descriptors": 0,
                      "flows": 0, "skipped_no_features": 0, "off_schedule": 0, "prefetched": 0}

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
            if abs(s - sigma) <= 1e-4 * abs(sigma) + 1e-6:
                return i
        return None

    def begin_step(self, step: int) -> None:
        """Drop everything older than the previous step (the reference V bank holds only this step)."""
        if step == self.cur_step:
            return
        self.cur_step = step
        for bank in (self.ref_feats, self.tgt_feats, self.cond_masks):
            for k in [k for k in bank if k < step - 1]:
                del bank[k]
        for k in [k for k in self.ref_v if k != step]:
            del self.ref_v[k]
        self.desc = {k: v for k, v in self.desc.items() if k[0] == step}
        self.flows = {k: v for k, v in self.flows.items() if k[0] == step}

    def close(self) -> None:
        for d in (self.ref_v, self.ref_feats, self.tgt_feats, self.cond_masks, self.desc, self.flows,
                  self.latest):
            d.clear()
        self.figures = _diag().StepLog()

    # ---------------------------------------------------------------- reference pass
    def reference_pass(self, executor, step: int, types: list[int], x, t, c_crossattn, transformer_options,
                       kwargs, cou: list[int]) -> None:
        """One UNet call on the replayed reference latent, one row per missing chunk type."""
        holder = self.holder
        ref = holder.reference
        sigma = self.sigmas[step]
        x_ref = ref.trajectory.at(sigma)[:1].to(device=x.device, dtype=x.dtype)
        n = len(types)
        total = x.shape[0]
        b = total // len(cou)
        rows_of = [cou.index(ty) * b for ty in types]
        ctxs = []
        for ty, row in zip(types, rows_of, strict=True):
            cond = ref.positive if ty == 0 else ref.negative
            if cond:
                ctxs.append(cond[0][0][:1])
            elif c_crossattn is not None:
                ctxs.append(c_crossattn[row:row + 1].detach().cpu())
            else:
                raise ValueError("DreamMatcher AMA: the reference has no conditioning for this chunk type.")
        length = math.lcm(*[c.shape[1] for c in ctxs])
        ctx = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in ctxs]).to(
            device=x.device, dtype=c_crossattn.dtype if c_crossattn is not None else x.dtype)
        t_ref = t[:1].expand(n).clone()
        kw = {}
        for k, v in kwargs.items():
            if torch.is_tensor(v) and v.ndim > 0 and v.shape[0] == total:
                kw[k] = v[rows_of]
            else:
                kw[k] = v
        ropts = dict(transformer_options)
        ropts["cond_or_uncond"] = list(types)
        uu = transformer_options.get("uuids")
        if isinstance(uu, list) and len(uu) == len(cou):
            ropts["uuids"] = [uu[cou.index(ty)] for ty in types]
        ropts["sigmas"] = t_ref
        call = CallState(self, "record", step, list(types), n)
        call.store_v = step in self.active
        ropts[CALL_KEY] = call
        for ty in types:
            self.ref_v.setdefault(step, {})[ty] = RefRecord()
        with torch.no_grad():
            executor(x_ref.expand(n, *x_ref.shape[1:]), t_ref, None, ctx, None, ropts, **kw)
        self.stats["ref_passes"] += 1
        self.stats["ref_rows"] += n

    # ---------------------------------------------------------------- capture hooks
    def on_output_block(self, call: CallState, block_id: int, h: torch.Tensor) -> None:
        layer = block_id - 1
        if layer not in self.holder.settings.feature_layers or call.step not in self.capture:
            return
        if call.mode == "record":
            bank = self.ref_feats.setdefault(call.step, {})
            for j, ty in enumerate(call.cou):
                bank.setdefault(ty, {}).setdefault(layer, h[j:j + 1].detach())
            return
        bank = self.tgt_feats.setdefault(call.step, {})
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
        s = self.holder.settings
        if call.mode != "inject" or call.step not in self.capture or not s.auto_mask or k is None:
            return
        hw = _grid(extra_options, q)
        if hw is None:
            return
        heads = extra_options["n_heads"]
        tokens = list(s.subject_tokens)
        if max(tokens) >= k.shape[1]:
            raise ValueError(
                f"DreamMatcher AMA: subject token {max(tokens)} is outside the target conditioning "
                f"({k.shape[1]} tokens). Re-resolve the subject on DM_SemanticMatch with the prompt you "
                "sample with."
            )
        B = call.B
        for c in range(call.chunks):
            if not any(self.needs_own_mask(call, c, r) for r in range(B)):
                continue
            qq = q[c * B:(c + 1) * B].float()
            kk = k[c * B:(c + 1) * B].float()
            d = qq.shape[-1] // heads
            qh = qq.reshape(B, -1, heads, d).transpose(1, 2)
            kh = kk.reshape(B, -1, heads, d).transpose(1, 2)
            probs = torch.softmax((qh @ kh.transpose(-1, -2)) * d ** -0.5, dim=-1)
            m = probs[..., tokens].sum(-1).mean(1)  # [B, N]
            call.mask_sum[c] = call.mask_sum.get(c, 0) + m
            call.mask_n[c] = call.mask_n.get(c, 0) + 1
            call.mask_hw = hw

    def finish_call(self, call: CallState) -> None:
        """After a target call: remember its cond masks (uncond chunks of the next step use them)."""
        if call.mode != "inject" or not self.holder.settings.auto_mask:
            return
        for c, (ty, occ) in enumerate(call.slots):
            if ty != 0 or occ != 0:
                continue
            m = call.soft_mask(c)
            if m is None:
                continue
            bank = self.cond_masks.setdefault(call.step, {})
            for r in range(call.B):
                bank.setdefault((0, r), m[r:r + 1])

    # ---------------------------------------------------------------- matching
    def mask_at(self, call: CallState, c: int, r: int, hw: tuple[int, int], device) -> torch.Tensor:
        """Foreground mask ``[1,1,H,W]`` of chunk ``c`` row ``r`` at an AMA resolution."""
        s = self.holder.settings
        if s.user_mask is not None:
            um = s.user_mask[r % s.user_mask.shape[0]][None, None].to(device)
            return _masks().resize_mask(um, hw, mode="bilinear").clamp(0, 1)
        if not s.auto_mask:
            return torch.ones(1, 1, *hw, device=device)
        ty, occ = call.slots[c]
        m = None
        if ty != 0:
            m = self.cond_masks.get(call.step - 1, {}).get((0, r))
        if m is None:
            own = call.soft_mask(c)
            if own is None:
                return torch.ones(1, 1, *hw, device=device)
            m = own[r:r + 1]
            if ty == 0 and occ == 0:
                self.cond_masks.setdefault(call.step, {}).setdefault((0, r), m)
        if s.mask_mode == "binary":
            m = (m > 0.5).to(m.dtype)
        return _masks().resize_mask(m.to(device), hw, mode="nearest")

    def descriptor(self, step: int, slot: tuple[int, int], r: int):
        key = (step, slot, r)
        if key not in self.desc:
            ref = self.ref_feats.get(step - 1, {}).get(slot[0])
            tgt = self.tgt_feats.get(step - 1, {}).get((slot, r))
            layers = self.holder.settings.feature_layers
            if ref is None or tgt is None or any(k not in ref or k not in tgt for k in layers):
                self.desc[key] = None
            else:
                self.desc[key] = describe([tgt[k] for k in layers], [ref[k] for k in layers],
                                          self.holder.settings.pca_dim)
                self.stats["descriptors"] += 1
        return self.desc[key]

    def prefetch(self, step: int, cou: list[int], rows: int) -> None:
        """Compute this step's correspondences *before* the step's UNet passes are queued.

        They depend only on the previous step's features, so computing them here gives the same
        results as computing them lazily at the first AMA layer. WHY: the PCA's eigen-solver and the
        exact tie checks synchronise with the GPU; done mid-UNet, every synchronisation made the CPU
        wait for the queued layers and then the GPU wait for the next launches (an H200 profile showed
        the GPU idle most of an AMA step). The grids are those matched at earlier steps of this run
        (the first matched step stays lazy).
        """
        if step not in self.active or not self.match_grids:
            return
        b = rows // max(1, len(cou))
        for slot in chunk_slots(cou):
            for r in range(b):
                for hw_t, hw_r in sorted(self.match_grids):
                    before = self.stats["flows"]
                    self.match(step, slot, r, hw_t, hw_r)
                    self.stats["prefetched"] += self.stats["flows"] - before

    def match(self, step: int, slot, r: int, hw_t, hw_r) -> Match | None:
        key = (step, slot, r, tuple(hw_t), tuple(hw_r))
        self.match_grids.add((tuple(hw_t), tuple(hw_r)))
        if key not in self.flows:
            desc = self.descriptor(step, slot, r)
            if desc is None:
                self.flows[key] = None
            else:
                core = _core()
                dt = _features().resize_descriptor(desc[0].float(), hw_t)
                dr = _features().resize_descriptor(desc[1].float(), hw_r)
                f_t2r, f_r2t = core.argmax_flows(dt, dr)
                err = core.cycle_error(f_t2r, f_r2t, integral=True)  # argmax flows are integral
                self.flows[key] = Match(f_t2r, f_r2t, err, sigma=self.sigmas[step], step=step)
                self.stats["flows"] += 1
        return self.flows[key]

    def gate(self, call: CallState, c: int, r: int, hw_t, hw_r, device) -> torch.Tensor | None:
        """``mask * confidence`` ``[1,1,Ht,Wt]`` for chunk c row r (cached per call and resolution)."""
        key = (c, r, tuple(hw_t), tuple(hw_r))
        if key not in call.gates:
            m = self.match(call.step, call.slots[c], r, hw_t, hw_r)
            if m is None:
                call.gates[key] = None
                self.stats["skipped_no_features"] += 1
            else:
                mask = self.mask_at(call, c, r, tuple(hw_t), device)
                conf = _core().confidence(m.cycle_err.to(device), mask.to(m.cycle_err.dtype),
                                          self.holder.settings.lambda_c)
                info = Match(m.flow_t2r, m.flow_r2t, m.cycle_err, conf, mask, m.sigma, m.step)
                self.latest[(call.slots[c], r, tuple(hw_t))] = info
                self.record_figures(call, c, r, info)
                for obs in self.holder.observers:
                    obs("match", call=call, chunk=c, row=r, match=info)
                call.gates[key] = (mask * conf).to(device)
        return call.gates[key]

    def record_figures(self, call: CallState, c: int, r: int, info: Match) -> None:
        """Diagnostics: remember the gate figures of cond row ``r`` at this step's finest resolution.

        Only the first cond chunk is recorded (uncond rows reuse the cond mask, and their figures
        would double-count); no host synchronisation happens here (see ``StepLog``).
        """
        if call.slots[c] != (0, 0) or info.confidence is None or info.mask is None:
            return
        cells = info.confidence.shape[-1] * info.confidence.shape[-2]
        self.figures.record(call.step, r, info.sigma, _diag().gate_figures(info.confidence, info.mask), cells)

    # ---------------------------------------------------------------- attention
    def on_self_attn(self, call: CallState, key3, q, k, v, extra_options) -> torch.Tensor:
        """V for the attention of one AMA layer (the original ``v`` if nothing is injected)."""
        hw = _grid(extra_options, q)
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
        s = self.holder.settings
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
                m = self.match(call.step, call.slots[c], r, hw, hw_r)
                warped = _core().warp_tokens(v_ref, m.flow_t2r.to(v.device), hw_r, integral=True)
                i = c * B + r
                new = _ama().inject_values(v[i:i + 1], warped, s.strength * g.reshape(1, -1, 1))
                if out is None:
                    out = v.clone()
                out[i:i + 1] = new
                for obs in self.holder.observers:
                    obs("inject", call=call, key=key3, chunk=c, row=r, hw=hw, delta=new - v[i:i + 1], gate=g)
        if out is None:
            return v
        self.stats["injected"] += 1
        return out


def _grid(extra_options: dict, q: torch.Tensor) -> tuple[int, int] | None:
    """(H, W) of this attention layer if its tokens are the full grid (guards HyperTile/ToMe)."""
    shape = extra_options.get("activations_shape")
    if shape is None or len(shape) < 4:
        return None
    h, w = int(shape[-2]), int(shape[-1])
    if q.shape[1] != h * w:
        return None
    return h, w


# ==================================================================================== holder
class AMAPatch:
    """The installed patch: settings + reference + install-time delegates. Shared by every clone
    (``__deepcopy__`` returns self), holds no per-run tensors (those live in :class:`RunState`)."""

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

    def __deepcopy__(self, memo):
        return self

    # ---------------------------------------------------------------- install
    def install(self, patcher) -> None:
        """Install hooks on ``patcher`` (a clone the caller owns)."""
        s = self.settings
        for attn, keys in (("attn1", s.ama_keys), ("attn2", s.mask_keys)):
            for key3 in keys:
                self.delegates[(attn, key3)] = host.existing_attn_replace(patcher.model_options, attn, key3)
                fn = self._make_replace(attn, key3)
                self.replaces[(attn, key3)] = fn
                host.set_attn_replace(patcher, attn, key3, fn)
        host.add_output_block_patch(patcher, self._make_output_block_patch())
        host.add_keyed_wrapper(patcher, "outer_sample", host.AMA_WRAPPER_KEY, self._make_outer_sample())
        host.add_keyed_wrapper(patcher, "apply_model", host.AMA_WRAPPER_KEY, self._make_apply_model())

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
        diag = _diag()
        log.info("DreamMatcher AMA: %s", diag.format_summary(steps))
        for f in steps:
            log.debug("DreamMatcher AMA step %d (sigma %.4g): confidence coverage %.3f, mask area %.3f, "
                      "gate>0.5 %.3f (%d row%s)", f.step, f.sigma, f.confidence_coverage, f.mask_area,
                      f.gate_above_half, f.rows, "" if f.rows == 1 else "s")

    def resolve_delegates(self, transformer_options: dict) -> dict:
        """Delegates for this run: the install-time replace, or a 2-tuple replace another pack added
        *after* us (our 3-tuple key shadows it, so we must call it ourselves)."""
        out = {}
        for (attn, key3), fn in self.replaces.items():
            table = host.attn_replace_table(transformer_options, attn)
            delegate = self.delegates.get((attn, key3))
            if table.get(key3) is not fn:
                log.warning("DreamMatcher AMA: another node replaced %s %s after the AMA patch; AMA is "
                            "inactive on that layer unless that node delegates to it.", attn, key3)
            later = table.get(key3[:2])
            if delegate is None and later is not None and getattr(later, "_dm_holder", None) is None:
                delegate = later
            out[(attn, key3)] = delegate
        return out

    def _attend(self, run: RunState | None, attn: str, key3, q, k, v, extra_options):
        delegate = run.delegates.get((attn, key3)) if run is not None else self.delegates.get((attn, key3))
        if delegate is not None:
            return delegate(q, k, v, extra_options)
        return host.call_attention(q, k, v, extra_options)

    def _make_replace(self, attn: str, key3):
        holder = self

        def replace(q, k, v, extra_options, **kwargs):
            run = extra_options.get(RUN_KEY)
            call = extra_options.get(CALL_KEY)
            if run is None or run.holder is not holder or call is None or call.run is not run:
                return holder._attend(run if run is not None and run.holder is holder else None,
                                      attn, key3, q, k, v, extra_options)
            if attn == "attn1":
                v = run.on_self_attn(call, key3, q, k, v, extra_options)
            else:
                run.on_cross_attn(call, q, k, extra_options)
            return holder._attend(run, attn, key3, q, k, v, extra_options)

        replace._dm_holder = holder
        return replace

    def _make_output_block_patch(self):
        holder = self

        def output_block_patch(h, hsp, transformer_options):
            run = transformer_options.get(RUN_KEY)
            call = transformer_options.get(CALL_KEY)
            if run is not None and run.holder is holder and call is not None and call.run is run:
                block = transformer_options.get("block")
                if block is not None and block[0] == "output":
                    run.on_output_block(call, int(block[1]), h)
            return h, hsp

        output_block_patch._dm_holder = holder
        return output_block_patch

    def _make_outer_sample(self):
        holder = self

        def outer_sample(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
            model_options = host.outer_sample_model_options(executor)
            host.refuse_multigpu(model_patcher=executor.class_obj.model_patcher, model_options=model_options,
                                 what="AMA")
            topts = model_options.setdefault("transformer_options", {})
            run = RunState(holder, sigmas, executor.class_obj.model_patcher, topts)
            previous = topts.get(RUN_KEY)
            topts[RUN_KEY] = run
            try:
                return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
            finally:
                holder.last_stats = dict(run.stats, active_steps=sorted(run.active))
                holder.finish_run(run)
                run.close()
                if previous is None:
                    topts.pop(RUN_KEY, None)
                else:
                    topts[RUN_KEY] = previous

        outer_sample._dm_holder = holder
        return outer_sample

    def _make_apply_model(self):
        holder = self

        def apply_model(executor, x, t, c_concat=None, c_crossattn=None, control=None,
                        transformer_options=None, **kwargs):
            topts = transformer_options if transformer_options is not None else {}
            run = topts.get(RUN_KEY)
            if run is None or run.holder is not holder or not run.capture:
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            step = run.step_of(t)
            cou = list(topts.get("cond_or_uncond", [0]))
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

        apply_model._dm_holder = holder
        return apply_model


# ================================================================================ public API
def get_run(model_options: dict) -> RunState | None:
    """The AMA run in progress for these (run-local) ``model_options``, or None.

    Stable API for other nodes (e.g. the Matching Guidance sampler): pass
    ``extra_args["model_options"]`` of a KSAMPLER function.
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


def current_match(model_options: dict, *, chunk_type: int = 0, row: int = 0,
                  resolution: tuple[int, int] | None = None) -> Match | None:
    """The most recent correspondence of target ``row`` for ``chunk_type`` (0 = cond, 1 = uncond).

    Returns a :class:`Match` (``flow_t2r``, ``flow_r2t``, ``cycle_err``, ``confidence``, ``mask``,
    ``sigma``, ``step``) at ``resolution`` (default: the finest AMA resolution seen), or None when no
    match was computed in this run (outside the window, strength 0, no previous-step features).
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


def current_features(model_options: dict, *, chunk_type: int = 0, row: int = 0, step: int | None = None):
    """Decoder features of the reference and of target ``row`` captured at ``step`` (default: the
    latest captured step): ``(ref: {block: [1,C,H,W]}, tgt: {block: [1,C,H,W]}, step)`` or None.

    Features are captured on every call inside the capture window (active steps and the one before).
    """
    run = get_run(model_options)
    if run is None or not run.tgt_feats:
        return None
    step = max(run.tgt_feats) if step is None else step
    tgt = run.tgt_feats.get(step, {}).get(((chunk_type, 0), row))
    ref = run.ref_feats.get(step, {}).get(chunk_type)
    if tgt is None or ref is None:
        return None
    return ref, tgt, step


def holder_of(model) -> AMAPatch | None:
    """The AMA patch carried by a MODEL (ModelPatcher), or None if it was not patched."""
    options = getattr(model, "model_options", None) or {}
    holder = options.get("transformer_options", {}).get(HOLDER_KEY)
    return holder if isinstance(holder, AMAPatch) else None


def last_diagnostics(model) -> tuple[int, list] | None:
    """``(run number, [StepFigures, ...])`` of the last sampling run of an AMA-patched MODEL.

    None if the model carries no AMA patch. The patch (and so this record) is shared by every clone
    of the patched model, so the figures are those of the most recent run of *any* sampler that used
    it; the run number tells runs apart.
    """
    holder = holder_of(model)
    if holder is None:
        return None
    return holder.runs, list(holder.last_diagnostics)


def reference_latent(model_options: dict, sigma: float) -> torch.Tensor | None:
    """The replayed reference latent ``[N,C,H,W]`` at ``sigma`` (CPU, model dtype), or None."""
    run = get_run(model_options)
    return None if run is None else run.holder.reference.trajectory.at(sigma)
