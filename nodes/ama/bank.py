"""The reference bank: the reference branch's per-step values and features, kept across samplings.

WHY: the reference pass of a step (one UNet call on the replayed reference latent) depends only on
its inputs: the reference's latent at that sigma, the sigma, the reference conditioning (or the
target rows it borrows, such as SDXL's ``y``), the model's weights and patches, and the hooks
around the UNet. None of them depends on the target's noise or prompt, so for a fixed reference
every later generation repeats the same pass. The bank keeps what that pass produced (V of every
AMA layer, the matching features) and replays it when the same inputs come again.

Validity is checked, never assumed:

* per run, a :class:`Fingerprint` of everything around the UNet call: the reference object, the
  model object, its weight-patch generation (``patches_uuid``, renewed by every LoRA/patch change),
  its object patches and every patch, replace and wrapper function in ``transformer_options``.
  A different fingerprint empties the bank;
* per entry (sigma, chunk type), the exact inputs of the pass: the conditioning row and every
  per-row tensor argument, compared with ``torch.equal``, plus dtype and device. A mismatch is a
  miss; the pass runs live and its result replaces the entry.

Entries live on the CPU in the dtype the model computed them in (fp16/bf16 on GPUs, float32 on
CPUs): anything lossier would break the guarantee that a banked run equals a live one. Memory is
bounded by a budget in MiB: entries are stored in the order the steps run until the next would
exceed it; later steps are then computed live in every run (``stats["bank_full"]`` counts them).
A reference call is banked and replayed whole (every chunk type it computed) or not at all, so a
replayed step is bit for bit the call it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class Fingerprint:
    """An ordered tuple of items compared by identity (objects) or value (str, int, float, None).

    It holds its objects strongly, so their ``id`` cannot be reused while it lives.
    """

    _VALUE_TYPES = (str, int, float, bool, type(None))

    def __init__(self, items: tuple) -> None:
        self.items = items

    def same(self, other: Fingerprint | None) -> bool:
        if other is None or len(other.items) != len(self.items):
            return False
        for a, b in zip(self.items, other.items, strict=True):
            if isinstance(a, self._VALUE_TYPES) and isinstance(b, self._VALUE_TYPES):
                if a != b or type(a) is not type(b):
                    return False
            elif a is not b:
                return False
        return True


@dataclass
class BankEntry:
    """What one reference pass produced for one chunk type at one sigma, and the inputs it had."""

    v: dict  # key3 -> (tensor [1, N, C] on the CPU, (H, W))
    feats: dict  # output-block id -> tensor [1, C, H, W] on the CPU
    ctx: torch.Tensor  # the conditioning row the pass used, on the CPU
    kw: dict  # per-row tensor arguments (e.g. SDXL's y), on the CPU
    dtype: torch.dtype
    device: str
    nbytes: int


def _cpu(t: torch.Tensor, pin: bool = False) -> torch.Tensor:
    """A CPU copy; pinned when it will be copied back to a GPU (so the copy need not block)."""
    out = t.detach().to("cpu", copy=True).contiguous()
    return out.pin_memory() if pin else out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ReferenceBank:
    """Banked reference passes of one AMA patch (see the module docstring)."""

    def __init__(self, budget_mib: float) -> None:
        self.budget = int(max(0.0, float(budget_mib)) * 2**20)
        self.entries: dict[tuple[float, int], BankEntry] = {}
        self.fingerprint: Fingerprint | None = None
        self.nbytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    def __deepcopy__(self, memo):
        return self  # shared by every clone of the patched model, like the patch itself

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def begin_run(self, fingerprint: Fingerprint | None) -> bool:
        """Start a run: keep the entries if the fingerprint is the last run's, else drop them.

        ``None`` (something the bank cannot vouch for, e.g. conditioning hooks) disables the bank
        for the run and drops it. Returns whether the bank is usable in this run.
        """
        if fingerprint is None or not self.enabled:
            self.clear()
            self.fingerprint = None
            return False
        if not fingerprint.same(self.fingerprint):
            self.clear()
        self.fingerprint = fingerprint
        return True

    def lookup(self, sigma: float, ty: int, ctx: torch.Tensor, kw: dict, dtype: torch.dtype, device,
               need_v: bool, layers: tuple[int, ...]) -> BankEntry | None:
        """The entry for this pass if its inputs are exactly these and it holds what is needed."""
        e = self.entries.get((sigma, ty))
        if e is None or e.dtype != dtype or e.device != str(device):
            return None
        if (need_v and not e.v) or any(layer not in e.feats for layer in layers):
            return None
        if e.ctx.shape != ctx.shape or not torch.equal(e.ctx, ctx.detach().cpu()):
            return None
        if set(e.kw) != set(kw):
            return None
        for k, t in kw.items():
            if e.kw[k].shape != t.shape or not torch.equal(e.kw[k], t.detach().cpu()):
                return None
        return e

    def store(self, sigma: float, passes: list[tuple], dtype: torch.dtype, device) -> bool:
        """Bank the passes of one reference call, ``(ty, ctx, kw, v, feats)`` each: all or none.

        All or none, because a call's rows are computed together: replaying some of them and
        computing the others alone would change the batch the UNet sees, and with it the last bits
        of the result. Older entries for the same keys are replaced. False if over the budget.
        """
        sizes = [sum(_nbytes(t) for t, _ in v.values()) + sum(_nbytes(t) for t in feats.values())
                 + _nbytes(ctx) + sum(_nbytes(t) for t in kw.values()) for _, ctx, kw, v, feats in passes]
        for ty, *_ in passes:
            old = self.entries.pop((sigma, ty), None)
            if old is not None:
                self.nbytes -= old.nbytes
        if self.nbytes + sum(sizes) > self.budget:
            return False
        pin = torch.device(device).type == "cuda"
        for (ty, ctx, kw, v, feats), size in zip(passes, sizes, strict=True):
            self.entries[(sigma, ty)] = BankEntry(
                v={k: (_cpu(t, pin), hw) for k, (t, hw) in v.items()},
                feats={k: _cpu(t, pin) for k, t in feats.items()},
                ctx=_cpu(ctx), kw={k: _cpu(t) for k, t in kw.items()}, dtype=dtype, device=str(device),
                nbytes=size)
            self.nbytes += size
        return True
