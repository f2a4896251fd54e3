"""The split nodes: Feature/Match Settings and the two inspectors, against the all-in-one nodes.

``DM_FeatureSettings`` + ``DM_InspectFeatures`` and ``DM_MatchSettings`` + ``DM_InspectMatch`` must
give exactly what ``DM_ExtractFeatures`` / ``DM_SemanticMatch`` give for the same inputs (same
objects, ``torch.equal`` images), and the inspectors' seed must not be re-randomised by the
frontend after each queue (no "control after generate" widget), while the all-in-one nodes keep
theirs (saved workflows store its value).
"""

from __future__ import annotations

import pytest
import torch


def _latent(seed: int, h: int = 16, w: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    # smooth structure (a few gaussian blobs), so matching has something distinctive to find
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                            indexing="ij")
    x = torch.zeros(1, 4, h, w)
    for _ in range(5):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
        sig = torch.randn(4, generator=g) * 2
        x += sig.view(1, 4, 1, 1) * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 18.0)
    return {"samples": x}


@pytest.fixture(scope="module")
def sd15(tiny):
    return tiny.build("sd15", 0)


def test_settings_nodes_give_the_all_in_one_objects(dm):
    settings = dm("nodes.node_settings")
    features = dm("nodes.node_features")
    match = dm("nodes.node_match")
    f_new = settings.FeatureSettings.execute(layers="5, 8", pca_dim=32, grid="finest").args[0]
    f_old = features.ExtractFeatures.execute(layers="5, 8", pca_dim=32, grid="finest").args[0]
    assert f_new == f_old and f_new.layers == (5, 8) and f_new.pca_dim == 32
    m_new = settings.MatchSettings.execute(lambda_c=0.7, mask_mode="binary").args[0]
    m_old = match.SemanticMatch.execute(lambda_c=0.7, mask_mode="binary").args[0]
    assert m_new == m_old and m_new.lambda_c == 0.7 and m_new.mask_mode == "binary"
    with pytest.raises(ValueError, match="mask_mode must be one of"):
        settings.MatchSettings.execute(mask_mode="hard")
    with pytest.raises(ValueError, match="layers"):
        settings.FeatureSettings.execute(layers="five")


def test_inspect_match_equals_semantic_match_inspector(dm, sd15):
    settings = dm("nodes.node_settings")
    inspect = dm("nodes.node_inspect")
    match = dm("nodes.node_match")
    ref, tgt = _latent(1), _latent(2)
    feats = settings.FeatureSettings.execute(layers="", pca_dim=16, grid="finest").args[0]
    cfg = settings.MatchSettings.execute(lambda_c=0.5, mask_mode="none").args[0]
    new = inspect.InspectMatch.execute(model=sd15, match=cfg, reference=ref, target=tgt, features=feats,
                                       noise_percent=0.2, seed=5)
    old = match.SemanticMatch.execute(lambda_c=0.5, mask_mode="none", model=sd15, reference=ref, target=tgt,
                                      features=feats, noise_percent=0.2, seed=5)
    assert len(new.args) == 5 and len(old.args) == 6
    for a, b in zip(new.args, old.args[1:], strict=True):
        assert torch.equal(a, b)
    assert new.ui["dm_match"] and new.ui["images"] and "confidence coverage" in new.ui["text"][0]
    # the match settings change what is inspected: a stricter λc trusts fewer cells
    strict = settings.MatchSettings.execute(lambda_c=0.0, mask_mode="none").args[0]
    tight = inspect.InspectMatch.execute(model=sd15, match=strict, reference=ref, target=_latent(3),
                                         features=feats, noise_percent=0.2, seed=5)
    loose = inspect.InspectMatch.execute(model=sd15, match=cfg, reference=ref, target=_latent(3),
                                         features=feats, noise_percent=0.2, seed=5)
    print(f"\nconfidence coverage: λc 0 {tight.args[1].mean():.3f}, λc 0.5 {loose.args[1].mean():.3f}")
    assert tight.args[1].mean() <= loose.args[1].mean()
    with pytest.raises(ValueError, match="connect 'reference'"):
        inspect.InspectMatch.execute(model=sd15, target=tgt)


def test_inspect_features_equals_extract_features_inspector(dm, sd15):
    inspect = dm("nodes.node_inspect")
    features = dm("nodes.node_features")
    config = dm("nodes.config")
    a, b = _latent(4), _latent(5, 16, 24)
    cfg = config.FeatureConfig(pca_dim=16)
    new = inspect.InspectFeatures.execute(model=sd15, latent_a=a, latent_b=b, features=cfg, noise_percent=0.1,
                                          seed=3)
    old = features.ExtractFeatures.execute(model=sd15, latent_a=a, latent_b=b, pca_dim=16, noise_percent=0.1,
                                           seed=3)
    assert len(new.args) == 2
    for x, y in zip(new.args, old.args[1:], strict=True):
        assert torch.equal(x, y)
    assert len(new.ui["images"]) == 2
    # without a features input: the model's defaults (PCA 256), a different projection
    default = inspect.InspectFeatures.execute(model=sd15, latent_a=a, noise_percent=0.1, seed=3)
    assert default.args[0].shape == new.args[0].shape and len(default.ui["images"]) == 1


def _seed_spec(cls) -> dict:
    info = cls.GET_NODE_INFO_V1()
    return info["input"]["optional"]["seed"][1]


def test_inspector_seeds_stay_fixed(dm):
    inspect = dm("nodes.node_inspect")
    for cls in (inspect.InspectFeatures, inspect.InspectMatch):
        spec = _seed_spec(cls)
        # an explicit False: the frontend otherwise adds a "randomize" control to any input named seed
        assert spec.get("control_after_generate") is False, spec
        assert spec["default"] == 0
    for mod, name in (("nodes.node_features", "ExtractFeatures"), ("nodes.node_match", "SemanticMatch")):
        spec = _seed_spec(getattr(dm(mod), name))
        assert "control_after_generate" not in spec, (name, spec)  # saved workflows hold its value


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_split_nodes_in_a_graph(run_graph, layout):
    prompt = {
        "m": {"class_type": "DMTest_TinyModel", "inputs": {"layout": layout, "seed": 0}},
        "r": {"class_type": "DMTest_Latent", "inputs": {"seed": 1, "height": 16, "width": 16, "batch": 1}},
        "t": {"class_type": "DMTest_Latent", "inputs": {"seed": 2, "height": 16, "width": 16, "batch": 1}},
        "fs": {"class_type": "DM_FeatureSettings", "inputs": {"layers": "", "pca_dim": 16, "grid": "finest"}},
        "ms": {"class_type": "DM_MatchSettings",
               "inputs": {"lambda_c": 0.4, "mask_mode": "none", "subject": ""}},
        "if": {"class_type": "DM_InspectFeatures", "inputs": {
            "model": ["m", 0], "latent_a": ["r", 0], "latent_b": ["t", 0], "features": ["fs", 0],
            "noise_percent": 0.25, "seed": 0}},
        "im": {"class_type": "DM_InspectMatch", "inputs": {
            "model": ["m", 0], "match": ["ms", 0], "reference": ["r", 0], "target": ["t", 0],
            "features": ["fs", 0], "noise_percent": 0.25, "seed": 0}},
    }
    outputs = run_graph(prompt)
    assert outputs["im"]["dm_match"][0]["grid"][0] > 0 and outputs["im"]["images"]
    assert len(outputs["if"]["images"]) == 2


def test_pca_solver_reaches_the_descriptor(dm, sd15):
    """Feature Settings' ``pca_solver`` changes the solver actually used, and nearly nothing else.

    At PCA size 4 the tiny model's channels leave the low-rank solver room (it falls back to the exact
    one otherwise), so the views must differ, yet agree closely: the solver's leading directions are
    exact to float precision and only the last of the 4 may be off (docs/method.md, "A faster PCA").
    """
    settings = dm("nodes.node_settings")
    inspect = dm("nodes.node_inspect")
    exact = settings.FeatureSettings.execute(layers="", pca_dim=4, grid="finest").args[0]
    low = settings.FeatureSettings.execute(layers="", pca_dim=4, grid="finest", pca_solver="lowrank").args[0]
    assert (exact.pca_solver, low.pca_solver) == ("exact", "lowrank")
    with pytest.raises(ValueError, match="pca_solver must be one of"):
        settings.FeatureSettings.execute(pca_solver="fast")
    a, b = _latent(4), _latent(5)
    got = {}
    for name, cfg in (("exact", exact), ("lowrank", low)):
        got[name] = inspect.InspectFeatures.execute(model=sd15, latent_a=a, latent_b=b, features=cfg,
                                                    noise_percent=0.1, seed=3).args
    for e, lr in zip(got["exact"], got["lowrank"], strict=True):
        diff = (e.float() - lr.float()).abs()
        print(f"\nexact vs lowrank PCA view (RGB in [0, 1]): mean |diff| {diff.mean():.2e}, "
              f"max {diff.max():.2e}")
        assert e.shape == lr.shape and diff.mean() < 0.03 and diff.max() < 0.25  # measured: 0.01, 0.07
    assert any(not torch.equal(e, lr) for e, lr in zip(got["exact"], got["lowrank"], strict=True))
