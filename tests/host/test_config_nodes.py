"""DM_ExtractFeatures / DM_SemanticMatch in their configuration role, and subject resolution.

Subject tokens are resolved with ComfyUI's REAL SD1.5 / SDXL tokenizers (vocab files ship inside
the ComfyUI tree, no weights needed), wrapped in a real ``comfy.sd.CLIP`` so ``clip.tokenize`` is
the host's own method.
"""

from __future__ import annotations

import copy

import pytest
import torch

PROMPT = "a photo of sks dog on the beach"


def _clip(kind: str = "sd15", embedding_directory=None):
    import comfy.sd
    import comfy.sd1_clip
    import comfy.sdxl_clip

    clip = comfy.sd.CLIP(no_init=True)
    if kind == "sd15":
        clip.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=embedding_directory)
    else:
        clip.tokenizer = comfy.sdxl_clip.SDXLTokenizer(embedding_directory=embedding_directory)
    clip.tokenizer_options = {}
    return clip


@pytest.fixture(scope="module")
def sd15_clip(host):
    return _clip("sd15")


@pytest.fixture(scope="module")
def embeddings_dir(host, tmp_path_factory):
    """A temp embeddings folder registered with folder_paths, holding a 2-vector TI ``my_cat``."""
    import folder_paths
    import safetensors.torch

    d = tmp_path_factory.mktemp("embeddings")
    g = torch.Generator().manual_seed(0)
    vectors = torch.randn(2, 768, generator=g)
    safetensors.torch.save_file({"emb_params": vectors}, str(d / "my_cat.safetensors"))
    folder_paths.add_model_folder_path("embeddings", str(d))
    return folder_paths.get_folder_paths("embeddings")


def _words_at(clip, prompt, indices):
    """Decode the integer tokens at conditioning indices (chunks of 77) back to CLIP vocab strings."""
    chunks = clip.tokenize(prompt)["l"]
    flat = [tok for chunk in chunks for tok, _ in chunk]
    sd = clip.tokenizer.clip_l
    return [sd.inv_vocab[int(flat[i])] for i in indices]


def test_sd15_subject_tokens(dm, sd15_clip):
    subject = dm("nodes.subject")
    idx = subject.resolve_subject(sd15_clip, PROMPT, "sks dog")
    # <start> a photo of sks dog ... -> "sks" at 4, "dog" at 5 (position 0 is the start token)
    assert idx == (4, 5)
    assert _words_at(sd15_clip, PROMPT, idx) == ["sks</w>", "dog</w>"]
    assert subject.resolve_subject(sd15_clip, PROMPT, "dog") == (5,)
    assert subject.resolve_subject(sd15_clip, PROMPT, "  ") == ()


def test_every_occurrence_and_weights_and_case(dm, sd15_clip):
    subject = dm("nodes.subject")
    prompt = "a DOG, and (a dog:1.2) with another dog"
    idx = subject.resolve_subject(sd15_clip, prompt, "dog")
    assert len(idx) == 3
    assert set(_words_at(sd15_clip, prompt, idx)) == {"dog</w>"}


def test_long_prompt_second_chunk(dm, sd15_clip):
    """A subject beyond the first 75 tokens lands in chunk 1: index = 77 + position."""
    subject = dm("nodes.subject")
    prompt = " ".join(["red"] * 80) + " sks dog"
    idx = subject.resolve_subject(sd15_clip, prompt, "sks dog")
    chunks = sd15_clip.tokenize(prompt)["l"]
    assert len(chunks) == 2 and all(len(c) == 77 for c in chunks)
    # chunk 1 = <start> red*5 sks dog <end>...: positions 6 and 7
    assert idx == (77 + 6, 77 + 7)
    assert _words_at(sd15_clip, prompt, idx) == ["sks</w>", "dog</w>"]


def test_sdxl_tokenizer(dm, host):
    subject = dm("nodes.subject")
    clip = _clip("sdxl")
    toks = clip.tokenize(PROMPT)
    assert set(toks) == {"g", "l"}
    assert subject.resolve_subject(clip, PROMPT, "sks dog") == (4, 5)


def test_textual_inversion_subject(dm, embeddings_dir):
    subject = dm("nodes.subject")
    clip = _clip("sd15", embeddings_dir)
    prompt = "a photo of embedding:my_cat sitting on a sofa, a cat"
    toks = clip.tokenize(prompt)["l"][0]
    # the embedding really became two tensor tokens after "<start> a photo of"
    assert isinstance(toks[4][0], torch.Tensor) and isinstance(toks[5][0], torch.Tensor)
    assert subject.resolve_subject(clip, prompt, "embedding:my_cat") == (4, 5)
    # the class word still resolves independently of the TI vectors
    assert len(subject.resolve_subject(clip, prompt, "cat")) == 1
    # an embedding that is not in the prompt
    with pytest.raises(ValueError, match="is not in the target prompt"):
        subject.resolve_subject(clip, "a photo of a dog", "embedding:my_cat")
    # an embedding that does not exist at all
    with pytest.raises(ValueError, match="produced no tokens.*models/embeddings"):
        subject.resolve_subject(clip, prompt, "embedding:no_such_thing")


def test_missing_subject_error_names_words(dm, sd15_clip):
    subject = dm("nodes.subject")
    with pytest.raises(ValueError) as err:
        subject.resolve_subject(sd15_clip, PROMPT, "cat")
    msg = str(err.value)
    assert "'cat'" in msg and "is not in the target prompt" in msg
    assert "a, photo, of, sks, dog, on, the, beach" in msg
    assert "Type in 'subject'" in msg and "embedding:NAME" in msg
    with pytest.raises(ValueError, match="connect the CLIP"):
        subject.resolve_subject(None, PROMPT, "dog")
    with pytest.raises(ValueError, match="'target_prompt' is empty"):
        subject.resolve_subject(sd15_clip, "", "dog")


def test_match_node_config(dm, sd15_clip):
    match = dm("nodes.node_match")
    config = dm("nodes.config")
    out = match.SemanticMatch.execute(lambda_c=0.3, mask_mode="binary", subject="sks dog", clip=sd15_clip,
                                      target_prompt=PROMPT)
    cfg = out.args[0]
    assert isinstance(cfg, config.MatchConfig)
    got = (cfg.lambda_c, cfg.mask_mode, cfg.subject, cfg.subject_tokens)
    assert got == (0.3, "binary", "sks dog", (4, 5))
    assert cfg.target_prompt == PROMPT and cfg.mask is None
    # defaults: no subject, no clip needed
    cfg = match.SemanticMatch.execute().args[0]
    assert cfg == config.MatchConfig()
    # mask_mode none: a subject without CLIP is not an error (nothing to resolve)
    cfg = match.SemanticMatch.execute(mask_mode="none", subject="dog").args[0]
    assert cfg.subject_tokens == ()
    with pytest.raises(ValueError, match="connect the CLIP"):
        match.SemanticMatch.execute(subject="dog")
    with pytest.raises(ValueError, match="mask_mode"):
        config.match_config(mask_mode="hard")


def test_mask_override_survives_clone_without_copy(dm, tiny):
    match = dm("nodes.node_match")
    mask = torch.rand(1, 16, 16)
    cfg = match.SemanticMatch.execute(subject_mask=mask).args[0]
    assert torch.equal(cfg.mask.tensor, mask)
    # carried in model_options, a ModelPatcher clone deep-copies it: the holder must be shared
    model = tiny.build("sd15", 0)
    model.model_options["transformer_options"]["dm_test_cfg"] = cfg
    clone = model.clone()
    assert clone.model_options["transformer_options"]["dm_test_cfg"].mask is cfg.mask
    assert copy.deepcopy(cfg).mask is cfg.mask


def test_features_node_config(dm):
    features = dm("nodes.node_features")
    config = dm("nodes.config")
    out = features.ExtractFeatures.execute(layers="8, 5", pca_dim=128)
    cfg = out.args[0]
    assert isinstance(cfg, config.FeatureConfig)
    assert (cfg.layers, cfg.pca_dim, cfg.grid) == ((5, 8), 128, "finest")
    assert features.ExtractFeatures.execute().args[0] == config.FeatureConfig()
    with pytest.raises(ValueError, match="e.g. '5,8'"):
        config.parse_layers("five")
    with pytest.raises(ValueError, match="out of range"):
        config.parse_layers("5,11")
    with pytest.raises(ValueError, match="connect both 'model' and 'latent_a'"):
        features.ExtractFeatures.execute(latent_a={"samples": torch.zeros(1, 4, 8, 8)})


def test_config_nodes_in_a_graph(run_graph):
    """Executed by ComfyUI itself (validation, widget defaults, output nodes)."""
    prompt = {
        "1": {"class_type": "DM_ExtractFeatures",
              "inputs": {"layers": "5,8", "pca_dim": 64, "grid": "finest"}},
        "2": {"class_type": "DM_SemanticMatch",
              "inputs": {"lambda_c": 0.5, "mask_mode": "soft", "subject": ""}},
    }
    run_graph(prompt)


def test_schema_contract(dm):
    """Widget order is the saved-workflow contract: config widgets first, inspector ones last."""
    def order(cls):
        info = cls.GET_NODE_INFO_V1()
        return info["input_order"]["required"] + info["input_order"].get("optional", [])

    assert order(dm("nodes.node_features").ExtractFeatures) == [
        "layers", "pca_dim", "grid", "model", "latent_a", "latent_b", "conditioning", "noise_percent", "seed"]
    assert order(dm("nodes.node_match").SemanticMatch) == [
        "lambda_c", "mask_mode", "subject", "clip", "target_prompt", "subject_mask", "model", "reference",
        "target", "features", "conditioning", "vae", "reference_image", "target_image", "noise_percent",
        "seed"]
    info = dm("nodes.node_match").SemanticMatch.GET_NODE_INFO_V1()
    assert info["output"][0] == "DM_MATCH"
    assert dm("nodes.node_features").ExtractFeatures.GET_NODE_INFO_V1()["output"][0] == "DM_FEATURES"
