"""The miniature-world demo workflow (API graph and reading layout), generated like the examples.

``scripts/make_examples.py --miniworld`` lays it out in the real frontend and writes
``scripts/miniworld/example_workflows/miniworld_demo.json`` (+ API twin and thumbnail), which the
demo folder serves as a template and ``make demo`` opens.
"""

from __future__ import annotations

from example_graphs import Group, Layout

WEIGHTS = "miniworld.safetensors"
REF = dict(shape="circle", texture="stripes", colour_1="red", colour_2="yellow", position="left", seed=0)
REF_PROMPT = "red yellow stripes circle left"
TARGET_PROMPT = "circle right"
SUBJECT = "circle"
SEED = 7
STEPS = 30
CFG = 4.0

NOTE_MODEL = (
    "The miniature world's trained model (a narrow SD1.5-layout UNet) and its word encoder. Prompts "
    "are word lists: colours, texture, shape, position (e.g. 'red yellow stripes circle left')."
)
NOTE_REFERENCE = (
    "A rendered 'photo' of the subject, its prompt, and DDIM Invert Reference (same steps and "
    "scheduler as the samplers). Change the shape, texture, colours or position here."
)
NOTE_MATCHING = (
    "The target prompt names only the shape and a new position: without DreamMatcher the model "
    "picks any appearance. AMA Model Patch takes the reference's appearance through decoder "
    "self-attention; the subject word's cross-attention is the mask."
)
NOTE_GENERATE = (
    "Stock KSampler on the patched model, AMA Diagnostics, and the Matching Guidance Sampler "
    "(fast mode). 32x32 latents: Empty Latent Image at 256x256 pixels gives them."
)
NOTE_COMPARE = (
    "The same seed without DreamMatcher, and the four images batched in order for the comparison "
    "in Results."
)
NOTE_RESULTS = (
    "Reference | baseline | AMA | AMA + matching guidance, enlarged 8x; then AMA Diagnostics: what AMA "
    "matched and injected at each step (its legend names the lines). Press Run (about 25 seconds on 2 "
    "CPU cores)."
)
#: The comparison preview's title and size: four 256-pixel images in one row, readable at load.
COMPARE_TITLE = "Compare: reference | baseline | AMA | AMA + guidance"
COMPARE_SIZE = (840, 270)
#: AMA Diagnostics' size: its report panel and the 512x320 plot.
DIAGNOSTICS_SIZE = (520, 640)


def _node(cls: str, **inputs) -> dict:
    return {"class_type": cls, "inputs": inputs}


def demo(steps: int = STEPS, size: int = 256) -> dict:
    def ks(model: list) -> dict:
        return _node(
            "KSampler",
            model=model,
            seed=SEED,
            steps=steps,
            cfg=CFG,
            sampler_name="ddim",
            scheduler="ddim_uniform",
            positive=["6", 0],
            negative=["4", 0],
            latent_image=["9", 0],
            denoise=1.0,
        )

    return {
        "1": _node("MW_LoadModel", weights=WEIGHTS),
        "2": _node("MW_RenderSubject", **REF),
        "3": _node("CLIPTextEncode", text=REF_PROMPT, clip=["1", 1]),
        "4": _node("CLIPTextEncode", text="", clip=["1", 1]),
        "5": _node(
            "DM_InvertReference",
            model=["1", 0],
            reference=["2", 1],
            reference_positive=["3", 0],
            steps=steps,
            scheduler="ddim_uniform",
            cfg=1.0,
            inversion_conditioning=["4", 0],
        ),
        "6": _node("CLIPTextEncode", text=TARGET_PROMPT, clip=["1", 1]),
        "7": _node(
            "DM_MatchSettings",
            lambda_c=0.4,
            mask_mode="soft",
            subject=SUBJECT,
            clip=["1", 1],
            target_prompt=TARGET_PROMPT,
        ),
        "8": _node(
            "DM_AMAPatch",
            model=["1", 0],
            reference=["5", 0],
            strength=1.0,
            start_percent=0.08,
            end_percent=1.0,
            layer_preset="paper (decoder 32²+64²)",
            custom_layers="",
            match=["7", 0],
            reference_bank_mib=2048,
        ),
        "9": _node("EmptyLatentImage", width=size, height=size, batch_size=1),
        "10": ks(["8", 0]),
        "11": _node("DM_AMADiagnostics", model=["8", 0], latent=["10", 0]),
        "12": _node("MW_LatentToImage", samples=["11", 0], scale=8),
        "13": _node("SaveImage", images=["12", 0], filename_prefix="miniworld/dreammatcher"),
        "14": _node(
            "DM_MatchingGuidanceSampler",
            model=["8", 0],
            reference=["5", 0],
            seed=SEED,
            steps=steps,
            cfg=CFG,
            scheduler="ddim_uniform",
            positive=["6", 0],
            negative=["4", 0],
            latent_image=["9", 0],
            denoise=1.0,
            guidance_scale=50.0,
            guidance_start=0.08,
            guidance_end=1.0,
            mode="fast",
            match=["7", 0],
        ),
        "15": _node("MW_LatentToImage", samples=["14", 0], scale=8),
        "16": _node("SaveImage", images=["15", 0], filename_prefix="miniworld/guidance"),
        "17": ks(["1", 0]),
        "18": _node("MW_LatentToImage", samples=["17", 0], scale=8),
        "19": _node("SaveImage", images=["18", 0], filename_prefix="miniworld/baseline"),
        "20": _node("MW_LatentToImage", samples=["2", 1], scale=8),
        "21": _node("ImageBatch", image1=["20", 0], image2=["18", 0]),
        "22": _node("ImageBatch", image1=["21", 0], image2=["12", 0]),
        "23": _node("ImageBatch", image1=["22", 0], image2=["15", 0]),
        "24": _node("PreviewImage", images=["23", 0]),
    }


def layout() -> Layout:
    return Layout(
        [
            Group("Model", 0, NOTE_MODEL, color="#444444", nodes=[("1", 0)]),
            Group(
                "1 Reference",
                1,
                NOTE_REFERENCE,
                color="#335533",
                nodes=[("2", 0), ("3", 1), ("4", 1), ("5", 2)],
            ),
            Group(
                "2 Appearance matching",
                4,
                NOTE_MATCHING,
                color="#553355",
                nodes=[("6", 0), ("7", 0), ("8", 1)],
            ),
            Group(
                "3 Generate",
                6,
                NOTE_GENERATE,
                color="#335566",
                nodes=[("9", 0), ("10", 1), ("14", 1), ("12", 2), ("15", 2), ("13", 3), ("16", 3)],
            ),
            Group(
                "Compare",
                7,
                NOTE_COMPARE,
                band=1,
                color="#665533",
                nodes=[
                    ("17", 0),
                    ("18", 1),
                    ("20", 1),
                    ("19", 2),
                    ("21", 2),
                    ("22", 3),
                    ("23", 4),
                ],
            ),
            Group(
                "Results",
                12,
                NOTE_RESULTS,
                color="#7a5c1e",
                nodes=[("24", 0), ("11", 1)],
                sizes={"24": COMPARE_SIZE, "11": DIAGNOSTICS_SIZE},
                titles={"24": COMPARE_TITLE},
            ),
        ]
    )
