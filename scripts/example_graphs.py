"""Source of truth for the example workflows: each is an API-format graph plus a reading layout.

``scripts/make_examples.py`` loads each graph into the real ComfyUI frontend
(``app.loadApiJson``), lays it out as :class:`Layout` says (groups left to right, a Note at the
top of every group, every seed fixed so that the DreamMatcher image and its baseline share the
initial noise), serialises it into ``example_workflows/<name>.json`` and writes the API twin to
``example_workflows/api/<name>.json``; ``scripts/make_thumbnails.py`` draws ``<name>.jpg``, the
thumbnail the template browser shows. The name is the card's title there (the frontend shows a
pack's template file names as typed), so it reads as one. The e2e tier runs every API twin on
random checkpoints; the browser tier checks that each UI file converts back to its twin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

CKPT = "v1-5-pruned-emaonly.safetensors"
CKPT_SDXL = "sd_xl_base_1.0.safetensors"
REF_IMAGE = "example.png"
TARGET_IMAGE = "example.png"
REF_PROMPT = "a photo of sks dog"
TARGET_PROMPT = "a photo of sks dog swimming in a pool"
SUBJECT = "sks dog"
SEED = 42

NOTE_MODEL = ("Your checkpoint, the same one the subject was learned on. Put a LoRA loader here for a "
              "DreamBooth/LoRA subject; a TI embedding goes into the prompts as embedding:name.")
NOTE_REFERENCE = ("One photo of your subject, at the generation size. DDIM Invert Reference runs the "
                  "sampler backwards once and stores the path; the reference prompt describes the photo "
                  "('a photo of sks dog'). Check its reconstruction error on the node.")
NOTE_MATCHING = ("AMA Model Patch swaps the target's self-attention values for the reference's, warped "
                 "along the semantic correspondence. Match Settings: 'subject' = the subject's words as "
                 "they appear in the TARGET prompt (its cross-attention is the mask). Strength 0 = plain "
                 "sampling; start_percent 0.08 skips the first steps, where the layout forms.")
NOTE_GENERATE = ("The target prompt decides the layout; AMA brings the reference's appearance. The "
                 "sampler must use the reference's schedule (ddim_uniform, same steps). AMA Diagnostics "
                 "shows per step how much of the image was matched and injected.")
NOTE_GUIDANCE = ("Matching Guidance Sampler: DDIM with the paper's matching guidance, which pulls the "
                 "predicted image toward the warped reference inside the subject mask. guidance_scale "
                 "50 is the paper's; 'fast' mode skips the backward pass through the UNet that 'exact' "
                 "takes, and costs far less.")
NOTE_COMPARE = ("The same seed and prompt without DreamMatcher: what your checkpoint draws on its own. The "
                "preview shows baseline | DreamMatcher.")
NOTE_INSPECT_IMAGES = ("Two images of the same subject: the reference, and a target (e.g. a baseline "
                       "generation). Use the same size as your generations.")
NOTE_INSPECT_SETTINGS = ("The settings AMA would use. The subject's words must appear in the target "
                         "prompt; its cross-attention on the target is the foreground mask.")
NOTE_INSPECT = ("Inspect Features: the decoder features as colours (same colour = same semantics; paper "
                "Fig. 6). Inspect Match: the reference warped onto the target, the cycle-consistency "
                "confidence, the subject mask and the flow (Fig. 7); hover the target on the node. Each "
                "costs one UNet pass per image; a fixed seed keeps re-queues free.")


@dataclass
class Group:
    """A titled group of the layout: its column range starts at ``col``; ``band`` 1 sits below 0."""

    title: str
    col: int
    note: str
    band: int = 0
    color: str = "#3f5159"
    #: (node id, column offset inside the group); nodes sharing a column stack in this order (a
    #: list, because JavaScript objects put integer-like keys in numeric order)
    nodes: list[tuple[str, int]] = field(default_factory=list)
    #: node id -> (width, height) to give it before placing (e.g. a preview large enough to read)
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: node id -> the title it shows instead of its display name
    titles: dict[str, str] = field(default_factory=dict)


@dataclass
class Layout:
    groups: list[Group]


def _node(cls: str, **inputs) -> dict:
    return {"class_type": cls, "inputs": inputs}


def _model_and_reference(ckpt: str, steps: int, size: int) -> dict:
    return {
        "1": _node("CheckpointLoaderSimple", ckpt_name=ckpt),
        "2": _node("LoadImage", image=REF_IMAGE),
        "3": _node("ImageScale", image=["2", 0], upscale_method="bilinear", width=size, height=size,
                   crop="center"),
        "4": _node("VAEEncode", pixels=["3", 0], vae=["1", 2]),
        "5": _node("CLIPTextEncode", text=REF_PROMPT, clip=["1", 1]),
        "6": _node("CLIPTextEncode", text="", clip=["1", 1]),
        "7": _node("DM_InvertReference", model=["1", 0], reference=["4", 0], reference_positive=["5", 0],
                   steps=steps, scheduler="ddim_uniform", cfg=1.0, inversion_conditioning=["6", 0]),
    }


def _matching() -> dict:
    return {
        "9": _node("DM_MatchSettings", lambda_c=0.4, mask_mode="soft", subject=SUBJECT, clip=["1", 1],
                   target_prompt=TARGET_PROMPT),
        "10": _node("DM_AMAPatch", model=["1", 0], reference=["7", 0], strength=1.0, start_percent=0.08,
                    end_percent=1.0, layer_preset="paper (decoder 32²+64²)", custom_layers="",
                    match=["9", 0], reference_bank_mib=2048),
    }


def _ksampler(model: list, steps: int) -> dict:
    return _node("KSampler", model=model, seed=SEED, steps=steps, cfg=7.5, sampler_name="ddim",
                 scheduler="ddim_uniform", positive=["8", 0], negative=["6", 0], latent_image=["11", 0],
                 denoise=1.0)


def _baseline(steps: int, prefix: str) -> dict:
    """The same seed and prompts on the unpatched model, and a baseline | DreamMatcher preview."""
    return {
        "16": _ksampler(["1", 0], steps),
        "17": _node("VAEDecode", samples=["16", 0], vae=["1", 2]),
        "18": _node("SaveImage", images=["17", 0], filename_prefix=f"{prefix}_baseline"),
        "19": _node("ImageBatch", image1=["17", 0], image2=["13", 0]),
        "20": _node("PreviewImage", images=["19", 0]),
    }


def _generation_graph(ckpt: str, steps: int, size: int, prefix: str) -> dict:
    g = _model_and_reference(ckpt, steps, size)
    g.update(_matching())
    g["8"] = _node("CLIPTextEncode", text=TARGET_PROMPT, clip=["1", 1])
    g["11"] = _node("EmptyLatentImage", width=size, height=size, batch_size=1)
    g["12"] = _ksampler(["10", 0], steps)
    # what AMA did per step (coverage, mask area, gate > 0.5), between the sampler and the decoder
    g["15"] = _node("DM_AMADiagnostics", model=["10", 0], latent=["12", 0])
    g["13"] = _node("VAEDecode", samples=["15", 0], vae=["1", 2])
    g["14"] = _node("SaveImage", images=["13", 0], filename_prefix=prefix)
    g.update(_baseline(steps, prefix))
    return g


def _generation_layout(generate_note: str = NOTE_GENERATE) -> Layout:
    return Layout([
        Group("Model", 0, NOTE_MODEL, color="#444444", nodes=[("1", 0)]),
        Group("1 Reference", 1, NOTE_REFERENCE, color="#335533",
              nodes=[("2", 0), ("3", 0), ("5", 1), ("6", 1), ("4", 2), ("7", 2)]),
        Group("2 Appearance matching", 4, NOTE_MATCHING, color="#553355", nodes=[("9", 0), ("10", 0)]),
        Group("3 Generate", 5, generate_note, color="#335566",
              nodes=[("8", 0), ("11", 0), ("12", 1), ("15", 2), ("13", 2), ("14", 3)]),
        Group("Compare", 6, NOTE_COMPARE, band=1, color="#665533",
              nodes=[("16", 0), ("17", 1), ("18", 2), ("19", 2), ("20", 3)]),
    ])


def ama(steps: int = 50, size: int = 512) -> dict:
    """SD1.5: AMA patch + stock KSampler (paper Table 5 row IV), with the baseline beside it."""
    return _generation_graph(CKPT, steps, size, "dreammatcher/ama")


def full(steps: int = 50, size: int = 512) -> dict:
    """SD1.5: AMA patch + Matching Guidance Sampler (the paper's full method, Table 5 row V)."""
    g = _generation_graph(CKPT, steps, size, "dreammatcher/full")
    g["12"] = _node("DM_MatchingGuidanceSampler", model=["10", 0], reference=["7", 0], seed=SEED, steps=steps,
                    cfg=7.5, scheduler="ddim_uniform", positive=["8", 0], negative=["6", 0],
                    latent_image=["11", 0], denoise=1.0, guidance_scale=50.0, guidance_start=0.08,
                    guidance_end=1.0, mode="fast", match=["9", 0])
    return g


def sdxl(steps: int = 50, size: int = 1024) -> dict:
    """SDXL: AMA patch + stock KSampler at 1024², with the baseline beside it."""
    return _generation_graph(CKPT_SDXL, steps, size, "dreammatcher/sdxl")


def inspectors(steps: int = 50, size: int = 512) -> dict:
    """The two inspectors on a reference and a target image (paper Figs. 6 and 7)."""
    del steps  # no sampling: one UNet pass per image
    return {
        "1": _node("CheckpointLoaderSimple", ckpt_name=CKPT),
        "2": _node("LoadImage", image=REF_IMAGE),
        "3": _node("ImageScale", image=["2", 0], upscale_method="bilinear", width=size, height=size,
                   crop="center"),
        "4": _node("VAEEncode", pixels=["3", 0], vae=["1", 2]),
        "5": _node("LoadImage", image=TARGET_IMAGE),
        "6": _node("ImageScale", image=["5", 0], upscale_method="bilinear", width=size, height=size,
                   crop="center"),
        "7": _node("VAEEncode", pixels=["6", 0], vae=["1", 2]),
        "8": _node("CLIPTextEncode", text=TARGET_PROMPT, clip=["1", 1]),
        "9": _node("DM_MatchSettings", lambda_c=0.4, mask_mode="soft", subject=SUBJECT, clip=["1", 1],
                   target_prompt=TARGET_PROMPT),
        "10": _node("DM_FeatureSettings", layers="", pca_dim=256, grid="finest", pca_solver="exact"),
        "11": _node("DM_InspectFeatures", model=["1", 0], latent_a=["4", 0], latent_b=["7", 0],
                    features=["10", 0], conditioning=["8", 0], noise_percent=0.25, seed=0),
        "12": _node("DM_InspectMatch", model=["1", 0], match=["9", 0], reference=["4", 0], target=["7", 0],
                    features=["10", 0], conditioning=["8", 0], vae=["1", 2], noise_percent=0.25, seed=0),
    }


def _inspector_layout() -> Layout:
    return Layout([
        Group("Model", 0, NOTE_MODEL, color="#444444", nodes=[("1", 0)]),
        Group("1 Reference and target", 1, NOTE_INSPECT_IMAGES, color="#335533",
              nodes=[("2", 0), ("5", 0), ("3", 1), ("6", 1), ("4", 2), ("7", 2)]),
        Group("2 Settings", 4, NOTE_INSPECT_SETTINGS, color="#553355", nodes=[("8", 0), ("9", 0), ("10", 0)]),
        Group("3 Inspect", 5, NOTE_INSPECT, color="#335566", nodes=[("11", 0), ("12", 0)]),
    ])


@dataclass(frozen=True)
class Example:
    build: object  # (steps, size) -> API graph
    layout: Layout
    checkpoint: str  # the checkpoint family the graph needs ("sd15" or "sdxl")
    #: what the e2e tier runs it at (steps, size): small, on random weights
    smoke: tuple[int, int] = (4, 64)


#: File name (without ``.json``; also the template browser's card title) -> example.
EXAMPLES: dict[str, Example] = {
    "DreamMatcher - AMA with KSampler": Example(ama, _generation_layout(), "sd15"),
    "DreamMatcher - Full method with matching guidance": Example(
        full, _generation_layout(NOTE_GENERATE + " " + NOTE_GUIDANCE), "sd15"),
    "DreamMatcher - Inspect features and matches": Example(inspectors, _inspector_layout(), "sd15"),
    "DreamMatcher - AMA on SDXL": Example(sdxl, _generation_layout(), "sdxl", smoke=(4, 128)),
}


#: Roles of the images ``make run`` saves: SaveImage node id -> file name stem.
RUN_SAVES = {
    "14": "dreammatcher", "18": "baseline", "31": "inspect_match_composite", "32": "inspect_match_flow",
    "33": "inspect_match_warped", "34": "inspect_features_reference", "35": "inspect_features_dreammatcher",
}


def run_graph(*, ckpt: str, steps: int, size: int, prompt: str, subject: str, ref_prompt: str, seed: int,
              batch: int, lora: str | None = None, lora_strength: float = 1.0) -> dict:
    """The graph ``make run`` queues: the full method and its baseline, plus both inspectors.

    The reference image is ``REF_IMAGE`` in ComfyUI's input folder. With ``lora``, a LoraLoader
    sits after the checkpoint and everything that read the checkpoint's MODEL/CLIP reads it.
    The inspectors compare the reference with the DreamMatcher image(s).
    """
    g = full(steps, size)
    g["5"]["inputs"]["text"] = ref_prompt
    g["8"]["inputs"]["text"] = prompt
    g["9"]["inputs"].update(subject=subject, target_prompt=prompt)
    g["11"]["inputs"]["batch_size"] = batch
    for sampler in ("12", "16"):
        g[sampler]["inputs"]["seed"] = seed
    for stem, node in (("dreammatcher", "14"), ("baseline", "18")):
        g[node]["inputs"]["filename_prefix"] = f"dreammatcher_run/{stem}"
    del g["19"], g["20"]  # the side-by-side comparison is composed by the script
    g["1"]["inputs"]["ckpt_name"] = ckpt
    if lora:
        for node in g.values():
            for key, value in node["inputs"].items():
                if value in (["1", 0], ["1", 1]):
                    node["inputs"][key] = ["21", value[1]]
        g["21"] = _node("LoraLoader", model=["1", 0], clip=["1", 1], lora_name=lora,
                        strength_model=lora_strength, strength_clip=lora_strength)
    base_model = ["21", 0] if lora else ["1", 0]
    g["22"] = _node("DM_InspectMatch", model=base_model, match=["9", 0], reference=["4", 0], target=["12", 0],
                    conditioning=["8", 0], vae=["1", 2], noise_percent=0.25, seed=0)
    g["23"] = _node("DM_InspectFeatures", model=base_model, latent_a=["4", 0], latent_b=["12", 0],
                    conditioning=["8", 0], noise_percent=0.25, seed=0)
    outputs = {"31": ["22", 4], "32": ["22", 3], "33": ["22", 0], "34": ["23", 0], "35": ["23", 1]}
    for node, image in outputs.items():
        g[node] = _node("SaveImage", images=image, filename_prefix=f"dreammatcher_run/{RUN_SAVES[node]}")
    return g
