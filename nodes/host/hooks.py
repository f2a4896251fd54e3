"""ComfyUI's hook protocol: attention replaces, output-block patches, keyed wrappers, and the
arguments those hooks receive, turned into plain values.

The runtimes (AMA, guidance, inspector) install their hooks and read hook arguments only through
these functions, so the shape of ``transformer_options`` / ``extra_options`` is known in one place.
``docs/host.md`` ("Attention replacement", "Output block patches", "Keyed wrappers") has the facts.
"""

from __future__ import annotations

import torch

from . import require


def attention_kernel():
    """ComfyUI's ``optimized_attention`` (the kernel vanilla CrossAttention calls), looked up per call
    so a kernel chosen at start-up (sage/xformers/SDPA/...) is honoured."""
    return require("comfy.ldm.modules.attention", "optimized_attention").optimized_attention


#: Keys of an attention patch's ``extra_options`` that vanilla ``CrossAttention`` passes to its kernel
#: as keyword arguments. ``attn_precision`` exists on every supported host; ``preferred_attention``
#: (a per-layer kernel choice, e.g. a quantised attention from a checkpoint's config) appears on
#: newer hosts. A key the host does not put into ``extra_options`` is simply not forwarded, so the
#: same call is right on hosts with and without it.
_KERNEL_OPTIONS = ("attn_precision", "preferred_attention")


def call_attention(q, k, v, extra_options: dict):
    """Run attention exactly as the vanilla layer would: same kernel, heads, precision and per-layer
    kernel preference, with ``extra_options`` as ``transformer_options`` (kernel overrides read it).

    Every attention call the pack makes itself goes through here, so strength 0 stays bit-identical
    to vanilla whatever the host forwards to its kernels."""
    kw = {name: extra_options[name] for name in _KERNEL_OPTIONS if name in extra_options}
    kw.setdefault("attn_precision", None)
    return attention_kernel()(q, k, v, extra_options["n_heads"], transformer_options=extra_options, **kw)


def existing_attn_replace(model_options: dict, attn: str, key3: tuple):
    """The replace ComfyUI would call today for ``key3`` = (block, id, transformer_index): the 3-tuple
    key first, then the 2-tuple key it shadows (BasicTransformerBlock.forward's lookup order)."""
    table = model_options.get("transformer_options", {}).get("patches_replace", {}).get(attn, {})
    fn = table.get(tuple(key3))
    return fn if fn is not None else table.get(tuple(key3[:2]))


def attn_replace_table(transformer_options: dict, attn: str) -> dict:
    """``transformer_options["patches_replace"][attn]`` (read-only view; empty dict if absent)."""
    return transformer_options.get("patches_replace", {}).get(attn, {})


def set_attn_replace(model_patcher, attn: str, key3: tuple, fn) -> None:
    """Install ``fn`` as the attn1/attn2 replace on the 3-tuple key (on a clone the caller made)."""
    name, number, index = key3
    model_patcher.set_model_patch_replace(fn, attn, name, number, index)


def add_output_block_patch(model_patcher, fn) -> None:
    """``fn(h, hsp, transformer_options) -> (h, hsp)`` at the start of every output block."""
    model_patcher.set_model_output_block_patch(fn)


def add_keyed_wrapper(model_patcher, kind: str, key: str, fn) -> None:
    """Register ``fn(executor, *args, **kw)`` as a keyed WrappersMP wrapper (``kind``: outer_sample,
    apply_model, diffusion_model, ...). Keyed wrappers chain with other packs' wrappers."""
    mp = require("comfy.patcher_extension", "WrappersMP")
    model_patcher.add_wrapper_with_key(getattr(mp.WrappersMP, kind.upper()), key, fn)


def has_keyed_wrapper(model_patcher, kind: str, key: str) -> bool:
    mp = require("comfy.patcher_extension", "WrappersMP")
    return bool(model_patcher.get_wrappers(getattr(mp.WrappersMP, kind.upper()), key))


def outer_sample_model_patcher(executor):
    """The ``ModelPatcher`` an OUTER_SAMPLE wrapper samples with (its guider's)."""
    return executor.class_obj.model_patcher


def outer_sample_model_options(executor) -> dict:
    """The run-local ``model_options`` of the guider an OUTER_SAMPLE wrapper wraps (a per-run copy
    made by ``CFGGuider.sample``; everything the sampler and the UNet see derives from it)."""
    return executor.class_obj.model_options


def with_output_patch(model_options: dict, patch) -> dict:
    """A copy of ``model_options`` with ``patch`` appended to ``output_block_patch`` (no mutation)."""
    mo = dict(model_options)
    to = dict(mo.get("transformer_options", {}))
    patches = dict(to.get("patches", {}))
    patches["output_block_patch"] = [*patches.get("output_block_patch", []), patch]
    to["patches"] = patches
    mo["transformer_options"] = to
    return mo




def chunk_labels(options: dict) -> list[int]:
    """``cond_or_uncond`` of a model call: one label per chunk of rows (0 = cond, 1 = uncond).

    ComfyUI batches cond and uncond rows in chunks of equal size in this order; under memory
    pressure it makes one call per chunk type instead. Rows are routed by label, never by position.
    """
    return list(options.get("cond_or_uncond", [0]))


def chunks(x: torch.Tensor, labels: list[int]):
    """``(chunk index, label, rows)`` of each chunk of a batch laid out as ``labels``."""
    rows = x.shape[0] // max(1, len(labels))
    return [(c, label, x[c * rows:(c + 1) * rows]) for c, label in enumerate(labels)]


def options_for_rows(transformer_options: dict, labels: list[int], source_labels: list[int],
                     sigmas: torch.Tensor) -> dict:
    """``transformer_options`` for an extra model call (e.g. a reference pass) whose chunks carry
    ``labels``, derived from those of the call in flight (chunks ``source_labels``): its chunk
    labels, the matching per-chunk ``uuids`` and its own ``sigmas``. Nothing is mutated."""
    out = dict(transformer_options)
    out["cond_or_uncond"] = list(labels)
    uuids = transformer_options.get("uuids")
    if isinstance(uuids, list) and len(uuids) == len(source_labels):
        out["uuids"] = [uuids[source_labels.index(label)] for label in labels]
    out["sigmas"] = sigmas
    return out


def output_layer(transformer_options: dict) -> int | None:
    """The decoder layer whose *output* an output-block patch sees, or None.

    The patch of output block ``i`` receives the output of block ``i - 1`` as ``h``; feature layer
    ids name the block that produced the features.
    """
    block = transformer_options.get("block", (None, -1))
    return block[1] - 1 if block[0] == "output" else None


def heads(extra_options: dict) -> int:
    """The attention layer's number of heads."""
    return int(extra_options["n_heads"])


def attention_grid(extra_options: dict, q: torch.Tensor) -> tuple[int, int] | None:
    """(H, W) of this attention layer if its tokens are the full grid (guards HyperTile/ToMe)."""
    shape = extra_options.get("activations_shape")
    if shape is None or len(shape) < 4:
        return None
    h, w = int(shape[-2]), int(shape[-1])
    if q.shape[1] != h * w:
        return None
    return h, w
