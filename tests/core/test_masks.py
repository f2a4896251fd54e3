"""Tests for dreammatcher_core.masks: attention-grid geometry for any aspect ratio, soft masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dreammatcher_core import masks as Ma

IMAGES = [(512, 512), (912, 1144), (1216, 832), (1024, 1024)]  # (height, width) in pixels
SD15_FACTORS = (1, 2, 4, 8)  # attention at latent/1, /2, /4 and the /8 middle block
SDXL_FACTORS = (2, 4)  # SDXL has no attention at full latent resolution


def _real_seq_len(latent_hw: tuple[int, int], factor: int) -> int:
    """Sequence length of a UNet attention layer, by running the real stride-2 downsampling convs."""
    x = torch.zeros(1, 1, *latent_hw)
    weight = torch.zeros(1, 1, 3, 3)
    levels = factor.bit_length() - 1
    for _ in range(levels):
        x = F.conv2d(x, weight, stride=2, padding=1)
    return x.shape[-2] * x.shape[-1]


@pytest.mark.parametrize("image_hw", IMAGES)
@pytest.mark.parametrize("family,factors", [("sd15", SD15_FACTORS), ("sdxl", SDXL_FACTORS)])
def test_token_count_equals_sequence_length(image_hw, family, factors):
    latent = (image_hw[0] // 8, image_hw[1] // 8)
    for factor in factors:
        seq = _real_seq_len(latent, factor)
        h, w = Ma.attention_hw(latent, seq)
        assert h * w == seq
        assert (h, w) == Ma.latent_hw_for_tokens(latent[0], latent[1], seq)
        assert (h, w) == Ma.downsample_hw(latent, factor.bit_length() - 1)
        # a mask on that layer's token axis has exactly seq tokens
        mask = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(seq))
        assert Ma.mask_to_tokens(mask, latent, seq).shape == (2, seq)
        # and cross-attention maps of that layer produce a mask at any requested size
        attn = torch.rand(2, 2, seq, 8, generator=torch.Generator().manual_seed(1)).softmax(-1)
        m = Ma.foreground_mask([attn], [5, 6], (h, w), latent_hw=latent)
        assert m.shape == (2, 1, h, w)
        assert m.reshape(2, -1).shape[1] == seq
        assert torch.isfinite(m).all() and m.min() >= 0 and m.max() <= 1


def test_odd_sizes_use_ceil_not_floor():
    # 912x1144 image -> latent 114x143 -> 57x72 (floor would give 57x71 and the wrong token count)
    assert Ma.attention_hw((114, 143), 57 * 72) == (57, 72)
    with pytest.raises(ValueError, match="57x72"):
        Ma.attention_hw((114, 143), 57 * 71)


def test_constant_input_gives_no_nan():
    attn = torch.full((2, 4, 16, 77), 1.0 / 77)
    m = Ma.foreground_mask(attn, 5, (32, 48), latent_hw=(64, 64))
    assert m.shape == (2, 1, 32, 48)
    assert torch.isfinite(m).all() and torch.all(m == 0)
    assert torch.all(Ma.minmax_normalise(torch.full((3, 1, 4, 4), 7.0)) == 0)


def test_official_aggregation_hand_example():
    # two layers, head-averaged already, 2x2 grid (latent 4x4 at factor 2), 3 text tokens
    l1 = torch.tensor([[[0.1, 0.2, 0.7], [0.3, 0.3, 0.4], [0.5, 0.1, 0.4], [0.2, 0.6, 0.2]]])
    l2 = torch.tensor([[[0.3, 0.0, 0.7], [0.1, 0.5, 0.4], [0.5, 0.3, 0.2], [0.2, 0.2, 0.6]]])
    m = Ma.foreground_mask([l1, l2], [1, 2], (2, 2), latent_hw=(4, 4))
    summed = ((l1 + l2) / 2)[0, :, 1:].sum(-1)  # tokens 1 and 2 -> [0.8, 0.8, 0.5, 0.8]
    expect = (summed - summed.min()) / (summed.max() - summed.min())
    torch.testing.assert_close(m.reshape(-1), expect)
    # per-head maps give the mean over heads first
    heads = torch.stack([l1, l1 * 0 + 1 / 3], dim=1)  # [B, heads=2, N, T]
    m_h = Ma.foreground_mask(heads, 2, (2, 2), latent_hw=(4, 4))
    mean_head = (l1[0, :, 2] + 1 / 3) / 2
    expect_h = (mean_head - mean_head.min()) / (mean_head.max() - mean_head.min())
    torch.testing.assert_close(m_h.reshape(-1), expect_h)
    # nearest upsampling to the AMA layer size replicates the 2x2 cells
    big = Ma.foreground_mask([l1, l2], [1, 2], (4, 4), latent_hw=(4, 4))
    assert torch.equal(big[0, 0, ::2, ::2].reshape(-1), m.reshape(-1))
    assert torch.equal(big[0, 0, 1::2, 1::2].reshape(-1), m.reshape(-1))


def test_layers_of_different_resolutions_are_averaged():
    latent = (16, 24)
    fine = torch.rand(1, 8 * 12, 4, generator=torch.Generator().manual_seed(2))
    coarse = torch.rand(1, 4 * 6, 4, generator=torch.Generator().manual_seed(3))
    m = Ma.foreground_mask([fine, coarse], 1, (8, 12), latent_hw=latent)
    up = F.interpolate(coarse[..., 1].reshape(1, 1, 4, 6), size=(8, 12), mode="bilinear", align_corners=False)
    mean = (fine[..., 1].reshape(1, 1, 8, 12) + up) / 2
    torch.testing.assert_close(m, Ma.minmax_normalise(mean))


def test_invalid_token_and_shapes():
    attn = torch.rand(1, 16, 5)
    with pytest.raises(ValueError, match="out of range"):
        Ma.foreground_mask(attn, 7, (4, 4), latent_hw=(4, 4))
    with pytest.raises(ValueError, match="tokens"):
        Ma.foreground_mask(attn, 1, (4, 4), latent_hw=(5, 5))
    with pytest.raises(ValueError):
        Ma.resize_mask(torch.rand(1, 1, 2, 2), (4, 4), mode="bicubic")


def test_foreground_from_token_maps_is_the_foreground_mask_pipeline():
    """The pieces the pack uses (per-layer token maps -> foreground_from_maps) give exactly the
    foreground mask of the raw attention, and the binary option thresholds the soft mask at 0.5."""
    g = torch.Generator().manual_seed(3)
    attn = [torch.rand(2, 4, 16, 5, generator=g).softmax(-1) for _ in range(3)]
    maps = [Ma.token_map(a, [1, 3]).reshape(2, 1, 4, 4) for a in attn]
    soft = Ma.foreground_mask(attn, [1, 3], (8, 8), latent_hw=(4, 4))
    assert torch.equal(Ma.foreground_from_maps(maps, (8, 8)), soft)
    assert torch.equal(Ma.mean_token_map(maps), torch.stack(maps).mean(0))
    binary = Ma.foreground_from_maps(maps, (8, 8), binary=True)
    assert torch.equal(binary, (soft > 0.5).to(soft.dtype))
    assert set(binary.unique().tolist()) <= {0.0, 1.0} and 0 < float(binary.mean()) < 1
