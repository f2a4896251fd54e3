"""Tests for dreammatcher_core.viz: ComfyUI IMAGE outputs."""

from __future__ import annotations

import torch

from dreammatcher_core import viz as V


def test_flow_to_rgb_colour_wheel():
    flow = torch.zeros(2, 2, 3, 4)
    flow[0, 0, 0, 0] = 5.0  # +x: red at full saturation
    flow[0, 0, 0, 1] = -5.0  # -x: cyan
    flow[0, 1, 0, 2] = 2.5  # +y at half the maximum magnitude
    img = V.flow_to_rgb(flow)
    assert img.shape == (2, 3, 4, 3) and img.dtype == torch.float32
    assert img.min() >= 0 and img.max() <= 1
    torch.testing.assert_close(img[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(img[0, 0, 1], torch.tensor([0.0, 1.0, 1.0]))
    assert torch.all(img[0, 1:] == 1.0) and torch.all(img[1] == 1.0)  # zero flow is white
    assert img[0, 0, 2].min() == 0.5  # half saturation
    assert torch.all(V.flow_to_rgb(torch.zeros(1, 2, 2, 2)) == 1.0)


def test_features_to_rgb_joint_colours():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 16, 5, 6, generator=g)
    perm = torch.randperm(30, generator=g)
    b = a.reshape(1, 16, -1)[:, :, perm].reshape(1, 16, 5, 6)
    ra, rb = V.features_to_rgb([a, b])
    assert ra.shape == (1, 5, 6, 3) and rb.shape == (1, 5, 6, 3)
    assert ra.min() >= 0 and ra.max() <= 1
    # the same feature vector gets the same colour in both maps
    torch.testing.assert_close(rb.reshape(-1, 3), ra.reshape(-1, 3)[perm])
    assert ra.reshape(-1, 3).std(dim=0).min() > 0.05  # three informative channels
    (one,) = V.features_to_rgb([torch.randn(1, 2, 3, 3, generator=g)])
    assert torch.all(one[..., 2] == 0.5)  # only 2 components available


def test_mask_and_overlay():
    img = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(1))
    zero, full = torch.zeros(2, 1, 4, 4), torch.ones(1, 1, 4, 4)
    assert torch.equal(V.overlay(img, zero), img)
    green = torch.tensor([0.0, 1.0, 0.0]).expand(2, 8, 8, 3)
    torch.testing.assert_close(V.overlay(img, full, color=(0.0, 1.0, 0.0), alpha=1.0), green)
    m = V.mask_to_rgb(torch.tensor([[[[0.0, 1.0]]]]), size=(2, 4))
    assert m.shape == (1, 2, 4, 3)
    assert torch.equal(m[0, 0, :, 0], torch.tensor([0.0, 0.0, 1.0, 1.0]))
