"""``make run`` without ``CKPT``: the same headless run on the miniature world's shipped model.

WHY: a new user has no SD checkpoint at hand, and a random-weight checkpoint only shows that the
pipeline runs. The miniature world (``scripts/miniworld``) has a trained model, a renderer that
"photographs" a subject and classifiers that read an image back, so a run without ``CKPT`` can show
DreamMatcher doing its job and say in words what each image shows.

The graph is the demo workflow's (``miniworld.demo_graph.demo``), so ``make run`` and ``make demo``
share their settings; this module only fills in the reference, the prompt, the subject, the seed and
the batch, and adds the reference view and both inspectors. Nothing here starts a server:
``run_example.py`` does that for both modes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from miniworld import demo_graph, measure, world
from miniworld.demo_nodes import palette_of

WEIGHTS = demo_graph.WEIGHTS
SIZE = 256  #: pixels of Empty Latent Image: the world's 32x32 latents (its "VAE" keeps the resolution)
SCALE = 8  #: nearest-neighbour enlargement of the saved 32x32 images, as the demo shows them

#: Roles of the images a miniature-world run saves (file stems), in the comparison's column order.
ROLES = ("reference", "baseline", "ama", "dreammatcher")
LABELS = ("reference", "baseline", "AMA", "DreamMatcher")
INSPECT_ROLES = ("inspect_match_composite", "inspect_match_flow", "inspect_match_warped",
                 "inspect_features_reference", "inspect_features_dreammatcher")


@dataclass(frozen=True)
class Reference:
    """The rendered reference: a subject and where it stands, read from a prompt of the world's words."""

    subject: world.Subject
    position: str

    @property
    def prompt(self) -> str:
        return " ".join([*self.subject.words(), self.position])


def _words(text: str, name: str) -> list[str]:
    words = world.split_prompt(text)
    try:
        world.check_words(words)
    except ValueError as exc:
        raise ValueError(f"{name}={text!r}: {exc}") from None
    if len(words) > world.MAX_TOKENS:
        raise ValueError(f"{name}={text!r}: a miniature-world prompt holds at most {world.MAX_TOKENS} words.")
    return words


def parse_reference(text: str) -> Reference:
    """A reference from words such as ``red yellow stripes circle left`` (colours, texture, shape, position).

    One shape; a texture (``solid`` may be left out for one colour); one colour for solid, two for a
    pattern (ink, then base); a position (default ``left``).
    """
    words = _words(text, "REF_PROMPT")
    shapes = [w for w in words if w in world.SHAPES]
    textures = [w for w in words if w in world.TEXTURES]
    colours = tuple(w for w in words if w in world.COLOUR_NAMES)
    positions = [w for w in words if w in world.POSITIONS]
    if len(shapes) != 1 or len(textures) > 1 or len(positions) > 1:
        raise ValueError(f"REF_PROMPT={text!r} must name one shape {list(world.SHAPES)}, at most one texture "
                         f"{list(world.TEXTURES)} and at most one position {list(world.POSITIONS)}, "
                         "e.g. 'red yellow stripes circle left'.")
    texture = textures[0] if textures else ("solid" if len(colours) == 1 else "")
    if not texture:
        raise ValueError(f"REF_PROMPT={text!r}: two colours need a texture {list(world.TEXTURES[1:])}, "
                         "e.g. 'red yellow stripes circle left'.")
    try:
        subject = world.Subject(shapes[0], texture, colours)
    except ValueError as exc:
        raise ValueError(f"REF_PROMPT={text!r}: {exc}") from None
    return Reference(subject, positions[0] if positions else "left")


def check_prompt(prompt: str, subject: str) -> None:
    """The target prompt and the subject must be the world's words (the word encoder knows no others)."""
    _words(prompt, "PROMPT")
    _words(subject, "SUBJECT")


def default_subject(prompt: str) -> str:
    """The target prompt's shape word (the subject whose cross-attention is the mask)."""
    shapes = [w for w in world.split_prompt(prompt) if w in world.SHAPES]
    return shapes[0] if shapes else demo_graph.SUBJECT


def _only(graph: dict, class_type: str, **inputs) -> str:
    """The id of the one node of ``class_type`` whose inputs include ``inputs`` (the demo must have it)."""
    ids = [nid for nid, node in graph.items() if node["class_type"] == class_type
           and all(node["inputs"].get(k) == v for k, v in inputs.items())]
    if len(ids) != 1:
        raise RuntimeError(f"the demo graph has {len(ids)} {class_type} nodes with {inputs}; expected one")
    return ids[0]


@dataclass
class WorldGraph:
    graph: dict
    saves: dict[str, str]  #: SaveImage node id -> role (file stem)
    diagnostics: str  #: the AMA Diagnostics node (its text is report.txt)


def build(*, reference: Reference, prompt: str, subject: str, steps: int, seed: int, batch: int,
          palette: str) -> WorldGraph:
    """The demo graph with this run's reference, prompt, subject, seed and batch, plus the inspectors."""
    g = demo_graph.demo(steps=steps, size=SIZE)
    render = _only(g, "MW_RenderSubject")
    colours = reference.subject.colours
    g[render]["inputs"].update(shape=reference.subject.shape, texture=reference.subject.texture,
                               colour_1=colours[0], colour_2=colours[1] if len(colours) > 1 else "none",
                               position=reference.position, palette=palette)
    invert = _only(g, "DM_InvertReference")
    g[g[invert]["inputs"]["reference_positive"][0]]["inputs"]["text"] = reference.prompt
    match = _only(g, "DM_MatchSettings")
    g[match]["inputs"].update(subject=subject, target_prompt=prompt)
    g[_only(g, "EmptyLatentImage")]["inputs"]["batch_size"] = batch
    patched = _only(g, "DM_AMAPatch")
    base_model = g[patched]["inputs"]["model"]
    ama = _only(g, "KSampler", model=[patched, 0])
    baseline = _only(g, "KSampler", model=base_model)
    guidance = _only(g, "DM_MatchingGuidanceSampler")
    target_text = g[ama]["inputs"]["positive"]
    g[target_text[0]]["inputs"]["text"] = prompt
    for sampler in (ama, baseline, guidance):
        g[sampler]["inputs"]["seed"] = seed
    diagnostics = _only(g, "DM_AMADiagnostics")

    def image_of(latent: list) -> str:
        return _only(g, "MW_LatentToImage", samples=latent)

    def add(class_type: str, **inputs) -> str:
        nid = str(max(int(n) for n in g) + 1)
        g[nid] = {"class_type": class_type, "inputs": inputs}
        return nid

    for nid in [n for n, node in g.items() if node["class_type"] == "SaveImage"]:
        del g[nid]  # the demo's own saves: the run saves each image once, under its role
    saves = {}
    for role, latent in (("ama", [diagnostics, 0]), ("dreammatcher", [guidance, 0]),
                         ("baseline", [baseline, 0]), ("reference", [render, 1])):
        view = image_of(latent)
        g[view]["inputs"]["scale"] = SCALE
        saves[add("SaveImage", images=[view, 0], filename_prefix=f"dreammatcher_run/{role}")] = role
    inspect = add("DM_InspectMatch", model=base_model, match=[match, 0], reference=[render, 1],
                  target=[guidance, 0], conditioning=target_text, reference_image=[image_of([render, 1]), 0],
                  target_image=[image_of([guidance, 0]), 0], noise_percent=0.25, seed=0)
    features = add("DM_InspectFeatures", model=base_model, latent_a=[render, 1], latent_b=[guidance, 0],
                   conditioning=target_text, noise_percent=0.25, seed=0)
    # the same outputs as the checkpoint run saves: composite, flow, warped; the two feature views
    for role, image in zip(INSPECT_ROLES, ([inspect, 4], [inspect, 3], [inspect, 0], [features, 0],
                                           [features, 1]), strict=True):
        saves[add("SaveImage", images=image, filename_prefix=f"dreammatcher_run/{role}")] = role
    return WorldGraph(g, saves, diagnostics)


def shipped_palette() -> str:
    """The palette the shipped model learned (its weights' metadata): renders and readings use it."""
    return palette_of(WEIGHTS)


def read_image(path: Path):
    """A saved image as the world's 32x32 RGB tensor [3, 32, 32] (the saves are nearest enlargements)."""
    import numpy as np
    import torch
    from PIL import Image

    img = Image.open(path).convert("RGB").resize((world.SIZE, world.SIZE), Image.NEAREST)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def reading(path: Path, palette: str) -> dict:
    """What the world's classifiers read in one image: shape, position, texture, colours."""
    d = measure.describe(read_image(path), palette)
    return {k: d[k] for k in ("shape", "position", "texture", "colours", "area")}


def _said(r: dict) -> str:
    if not r["area"]:
        return "no subject found (a blank or noisy image)"
    colours = " and ".join(sorted(r["colours"])) or "no palette colour"
    return f"a {r['texture'] or 'unclear'} {r['shape'] or 'blob'} at {r['position']}, {colours}"


def meaning(saved: dict[str, list[Path]], reference: Reference, prompt: str, palette: str) -> str:
    """The run's images in words: what each is, and what the world's classifiers read in it."""
    ref = reading(saved["reference"][0], palette)
    want_colours = set(reference.subject.colours)
    target = [w for w in world.split_prompt(prompt) if w in world.POSITIONS]
    lines = [
        "[run] What the images mean (the miniature world's shipped model, palette " + palette + "):",
        f"  reference     rendered from {reference.prompt!r}: the subject whose appearance is carried over"
        f" (read back: {_said(ref)})",
        f"  baseline      the plain model on {prompt!r}, same seed: the prompt names no appearance the "
        "reference has, so the model picks its own",
        "  ama           AMA Model Patch with the stock KSampler: the prompt keeps the layout, the reference "
        "gives the appearance",
        "  dreammatcher  AMA + Matching Guidance Sampler (the full method)",
        "  read back by the world's classifiers (colours, texture, shape, position):",
    ]
    for role in ("baseline", "ama", "dreammatcher"):
        for i, path in enumerate(saved.get(role, [])):
            r = reading(path, palette)
            carried = len(want_colours & set(r["colours"]))
            same_texture = r["texture"] == reference.subject.texture
            verdict = (f"{carried}/{len(want_colours)} of the reference's colours"
                       + (", its texture" if same_texture else ", not its texture"))
            if target:
                verdict += (", at the prompt's position" if r["position"] == target[0]
                            else f", not at {target[0]}")
            name = f"{role}_{i + 1}"
            lines.append(f"    {name:<15} {_said(r)}: {verdict}")
    lines.append("  A good result: the baseline differs from the reference, and ama / dreammatcher take the "
                 "reference's colours and texture at the prompt's position. Each image is 32x32, enlarged "
                 f"{SCALE}x; the inspectors show where the subject was matched.")
    return "\n".join(lines)
