"""The miniature world's renderer, latent map, prompts and pair attention (pure torch, no host)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from miniworld import world  # noqa: E402
from miniworld.training import attention, joint_attention, sample_batch, sourced_attention  # noqa: E402


def test_latent_map_is_standardised_and_inverts_exactly():
    gen = torch.Generator().manual_seed(5)
    rgb = torch.stack([world.render(world.random_scene(gen)) for _ in range(512)])
    lat = world.rgb_to_latent(rgb)
    assert lat.shape == (512, 4, world.SIZE, world.SIZE)
    assert lat.mean((0, 2, 3)).abs().max() < 0.05
    assert (lat.std((0, 2, 3)) - 1).abs().max() < 0.05
    assert torch.allclose(world.latent_to_rgb(lat), rgb, atol=1e-5)


def test_render_is_deterministic_and_draws_the_subject_where_asked():
    subject = world.Subject("square", "checker", ("red", "blue"))
    a = world.render(world.random_scene(torch.Generator().manual_seed(3), subject, "right"))
    b = world.render(world.random_scene(torch.Generator().manual_seed(3), subject, "right"))
    assert torch.equal(a, b)
    fg = (a - world.BACKGROUND).abs().sum(0) > 0.3
    ys, xs = torch.nonzero(fg, as_tuple=True)
    assert xs.float().mean() > 18 and abs(ys.float().mean() - 16) < 3


@pytest.mark.parametrize("words, needle", [(["pink", "circle"], "pink"), (["circle"] * 9, "at most 8")])
def test_bad_prompts_get_a_clear_error(words, needle):
    with pytest.raises(ValueError, match=needle) as err:
        world.tokenize_words(words)
    if needle == "pink":
        assert "stripes" in str(err.value) and "triangle" in str(err.value)


def test_subject_validation():
    with pytest.raises(ValueError, match="takes 2 colour"):
        world.Subject("circle", "dots", ("red",))
    with pytest.raises(ValueError, match="must differ"):
        world.Subject("circle", "dots", ("red", "red"))


def test_pair_attention_with_self_as_partner_is_plain_self_attention():
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 20, 16) for _ in range(3))
    plain = (
        torch.nn.functional.scaled_dot_product_attention(
            q.view(3, 20, 2, 8).transpose(1, 2),
            k.view(3, 20, 2, 8).transpose(1, 2),
            v.view(3, 20, 2, 8).transpose(1, 2),
        )
        .transpose(1, 2)
        .reshape(3, 20, 16)
    )
    out = joint_attention(q, k, v, 2, torch.tensor([1, 0, -1]))
    assert torch.allclose(out[2], plain[2], atol=1e-6)
    assert not torch.allclose(out[0], plain[0], atol=1e-3)  # a real partner changes the result
    # and the partner's tokens are what it adds: attending over [own; partner] by hand
    k0, v0 = torch.cat([k[0], k[1]]), torch.cat([v[0], v[1]])
    manual = (
        torch.nn.functional.scaled_dot_product_attention(
            q[0].view(20, 2, 8).transpose(0, 1),
            k0.view(40, 2, 8).transpose(0, 1),
            v0.view(40, 2, 8).transpose(0, 1),
        )
        .transpose(0, 1)
        .reshape(20, 16)
    )
    assert torch.allclose(out[0], manual, atol=1e-6)


def test_training_batches_pair_one_subject_at_two_positions():
    batch = sample_batch(torch.Generator().manual_seed(1), 12, 4)
    assert batch.latents.shape == (12, 4, world.SIZE, world.SIZE)
    for i in range(8):
        assert batch_pair(batch, i, int(batch.partner[i]))
    assert (batch.partner[8:] == -1).all()


def test_read_only_pairs_read_their_partner_only_and_leave_the_first_recipe_unchanged():
    plain = sample_batch(torch.Generator().manual_seed(3), 16, 3)
    mixed = sample_batch(torch.Generator().manual_seed(3), 16, 3, 2)
    # read_only=0: every row reads (itself, its partner or itself), the joint attention of the first recipe
    own = torch.arange(16)
    assert torch.equal(
        plain.sources, torch.stack([own, torch.where(plain.partner >= 0, plain.partner, own)], 1)
    )
    # the joint pairs are drawn first, from the same random stream
    assert torch.equal(mixed.latents[:6], plain.latents[:6]) and torch.equal(
        mixed.sources[:6], plain.sources[:6]
    )
    for first in (6, 8):  # the two read-only pairs
        second = first + 1
        assert batch_pair(mixed, first, second)
        assert mixed.sources[first].tolist() == [second, second]
        assert mixed.sources[second].tolist() == [second, second]
    assert (mixed.partner[10:] == -1).all() and torch.equal(mixed.sources[10:, 0], own[10:])
    # what a read-only row computes: plain attention of its queries to the partner's keys and values
    torch.manual_seed(0)
    q, k, v = (torch.randn(16, 12, 8) for _ in range(3))
    out = sourced_attention(q, k, v, 2, mixed.sources)
    assert torch.allclose(out[6], attention(q[6:7], k[7:8], v[7:8], 2)[0], atol=1e-6)
    assert torch.allclose(out[7], attention(q[7:8], k[7:8], v[7:8], 2)[0], atol=1e-6)
    assert not torch.allclose(out[6], attention(q[6:7], k[6:7], v[6:7], 2)[0], atol=1e-3)
    with pytest.raises(ValueError, match="pairs need 18 images"):
        sample_batch(torch.Generator().manual_seed(3), 16, 6, 3)


def batch_pair(batch, i: int, j: int) -> bool:
    """Rows ``i`` and ``j`` are partners showing one subject at two positions."""
    return (
        int(batch.partner[i]) == j
        and int(batch.partner[j]) == i
        and batch.scenes[i].subject == batch.scenes[j].subject
        and batch.scenes[i].position != batch.scenes[j].position
    )


def _rgb(palette: str) -> torch.Tensor:
    return torch.tensor(list(world.PALETTES[palette].values()))


def _closest_pair(palette: str) -> float:
    rgb = _rgb(palette)
    d = torch.cdist(rgb, rgb) + torch.eye(len(rgb)) * 9
    return float(d.min())


def test_each_palette_separates_its_closest_colours_further_than_the_one_before():
    names = sorted(world.PALETTES)
    assert names == ["v1", "v2", "v3"]
    gaps = [_closest_pair(n) for n in names]
    print("closest RGB pair per palette:", dict(zip(names, [round(g, 3) for g in gaps], strict=True)))
    assert gaps[0] < gaps[1] < gaps[2]
    assert gaps[2] > 0.58
    # no colour word sits on the light background
    for n in names:
        assert float((_rgb(n) - world.BACKGROUND).norm(dim=1).min()) > 0.5


def test_palettes_change_colours_only():
    subject = world.Subject("square", "stripes", ("orange", "blue"))
    scene = world.random_scene(torch.Generator().manual_seed(4), subject)
    v1, v2 = world.render(scene), world.render(scene, palette="v2")
    assert torch.equal(v1, world.render(scene, palette=world.DEFAULT_PALETTE))
    cover = world.render_mask(scene)
    background, inside = cover == 0, cover > 0.99
    assert torch.equal(v1[:, background], v2[:, background])
    assert not torch.equal(v1[:, inside], v2[:, inside])
    assert list(world.PALETTES["v2"]) == list(world.COLOUR_NAMES)
    with pytest.raises(ValueError, match="v1"):
        world.render(scene, palette="v9")
    # the same draws whatever the palette: only the rendered colours differ
    a = sample_batch(torch.Generator().manual_seed(2), 8, 2)
    b = sample_batch(torch.Generator().manual_seed(2), 8, 2, palette="v2")
    assert a.scenes == b.scenes and torch.equal(a.ids, b.ids) and not torch.equal(a.latents, b.latents)


def test_weights_record_their_palette(tmp_path, monkeypatch):
    from miniworld import demo_nodes
    from safetensors.torch import save_file

    monkeypatch.setattr(demo_nodes, "WEIGHTS", tmp_path)
    tensor = {"x": torch.zeros(1)}
    save_file(tensor, str(tmp_path / "old.safetensors"), metadata={"steps": "1"})
    save_file(tensor, str(tmp_path / "new.safetensors"), metadata={"palette": "v2"})
    save_file(tensor, str(tmp_path / "bad.safetensors"), metadata={"palette": "v9"})
    assert demo_nodes.palette_of("old.safetensors") == "v1"  # written before palettes existed
    assert demo_nodes.palette_of("new.safetensors") == "v2"
    with pytest.raises(ValueError, match="palette"):
        demo_nodes.palette_of("bad.safetensors")
    with pytest.raises(ValueError, match="No miniworld weights"):
        demo_nodes.palette_of("../new.safetensors")


def test_render_node_draws_in_the_shipped_models_palette():
    """The demo's reference must be drawn in the colours the shipped model learned: the renderer node's
    default palette is the one the shipped weights record, and its palette input changes only colours."""
    from miniworld import demo_nodes

    assert demo_nodes.palette_of("miniworld.safetensors") == world.SHIPPED_PALETTE
    node = demo_nodes.RenderSubject()
    default = node.INPUT_TYPES()["optional"]["palette"]
    assert default[1]["default"] == world.SHIPPED_PALETTE and set(default[0]) == set(world.PALETTES)
    args = ("square", "stripes", "orange", "blue", "left", 3)
    image, latent, prompt = node.run(*args)
    scene = world.random_scene(
        torch.Generator().manual_seed(3), world.Subject("square", "stripes", ("orange", "blue")), "left"
    )
    assert torch.equal(image[0].permute(2, 0, 1), world.render(scene, palette=world.SHIPPED_PALETTE))
    assert torch.equal(latent["samples"], world.rgb_to_latent(image.permute(0, 3, 1, 2)))
    other = next(p for p in world.PALETTES if p != world.SHIPPED_PALETTE)
    assert not torch.equal(node.run(*args, palette=other)[0], image)
    assert prompt == "orange blue stripes square left"
