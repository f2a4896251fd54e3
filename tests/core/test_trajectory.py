"""Oracle tests for :mod:`dreammatcher_core.trajectory` (pure torch, no ComfyUI)."""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dreammatcher_core.trajectory import FORMAT_VERSION, Trajectory, TrajectoryFileError

SIGMAS = torch.tensor([14.6146, 4.6917, 1.2, 0.4, 0.0291675, 0.0], dtype=torch.float32)


def make(dtype=torch.float32, n=2, fmt="SD15", fp="SD15/BaseModel/EPS/unet-abc", extras=True) -> Trajectory:
    gen = torch.Generator().manual_seed(0)
    lat = torch.randn(len(SIGMAS), n, 4, 8, 6, generator=gen).to(dtype)
    return Trajectory(
        sigmas=SIGMAS.clone(), latents=lat, latent_format=fmt, fingerprint=fp,
        meta={"steps": 5, "scheduler": "ddim_uniform", "recon_error": 0.00123456789, "ok": True},
        extras={"pooled": torch.randn(2, 3, generator=gen).half()} if extras else {},
    )


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    t = make(dtype)
    path = t.save(tmp_path / "ref.dm.safetensors")
    back = Trajectory.load(path)
    assert back.latents.dtype == dtype and back.sigmas.dtype == torch.float32
    assert _bits(back.latents) == _bits(t.latents)
    assert _bits(back.sigmas) == _bits(t.sigmas)
    assert back.meta == t.meta and back.latent_format == t.latent_format and back.fingerprint == t.fingerprint
    assert set(back.extras) == {"pooled"} and _bits(back.extras["pooled"]) == _bits(t.extras["pooled"])
    assert back.z0.shape == (2, 4, 8, 6) and torch.equal(back.z0, t.latents[-1])


def test_save_leaves_no_temp_files_and_is_atomic(tmp_path, monkeypatch):
    t = make()
    t.save(tmp_path / "a.dm.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dm.safetensors"]

    import safetensors.torch as st

    def boom(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt  # e.g. the user interrupts mid-write

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        t.save(tmp_path / "b.dm.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.dm.safetensors"]


def test_truncated_file_is_rejected(tmp_path):
    path = make().save(tmp_path / "r.dm.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(TrajectoryFileError, match="truncated"):
        Trajectory.load(path)
    path.write_bytes(data[:20])
    with pytest.raises(TrajectoryFileError, match="truncated"):
        Trajectory.load(path)
    path.write_bytes(b"")
    with pytest.raises(TrajectoryFileError, match="empty or truncated"):
        Trajectory.load(path)


def _rewrite_header(path: Path, edit) -> None:
    """Edit the DreamMatcher JSON header inside the safetensors metadata, keeping tensors."""
    tensors = load_file(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n])["__metadata__"]
    head = json.loads(meta["dreammatcher"])
    edit(head, tensors)
    save_file(tensors, path, metadata={"dreammatcher": json.dumps(head)})


def test_wrong_format_version_is_rejected(tmp_path):
    path = make().save(tmp_path / "r.dm.safetensors")
    _rewrite_header(path, lambda h, t: h.update(version=FORMAT_VERSION + 1))
    with pytest.raises(TrajectoryFileError, match=r"format version 2.*reads version 1.*Update"):
        Trajectory.load(path)
    _rewrite_header(path, lambda h, t: h.update(version=0))
    with pytest.raises(TrajectoryFileError, match="format version 0"):
        Trajectory.load(path)


def test_tampered_shape_is_rejected(tmp_path):
    path = make().save(tmp_path / "r.dm.safetensors")

    def reshape(head, tensors):  # same bytes, different shape: safetensors itself accepts this
        tensors["latents"] = tensors["latents"].reshape(6, 2, 4, 6, 8).contiguous()

    _rewrite_header(path, reshape)
    msg = r"'latents' has shape \[6, 2, 4, 6, 8\].*declares \[6, 2, 4, 8, 6\]"
    with pytest.raises(TrajectoryFileError, match=msg):
        Trajectory.load(path)

    path = make().save(tmp_path / "s.dm.safetensors")

    def drop_step(head, tensors):  # consistent header, but one sigma fewer than latents
        tensors["sigmas"] = tensors["sigmas"][1:].contiguous()
        head["sigmas"]["shape"] = [5]

    _rewrite_header(path, drop_step)
    with pytest.raises(TrajectoryFileError, match="6 steps but there are 5 sigmas"):
        Trajectory.load(path)


def test_tampered_sigmas_and_foreign_files_are_rejected(tmp_path):
    path = make().save(tmp_path / "r.dm.safetensors")

    def unsort(head, tensors):
        tensors["sigmas"] = tensors["sigmas"].flip(0).contiguous()

    _rewrite_header(path, unsort)
    with pytest.raises(TrajectoryFileError, match="last sigma must be 0.0"):
        Trajectory.load(path)

    plain = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(3)}, plain)
    with pytest.raises(TrajectoryFileError, match="not a DreamMatcher reference"):
        Trajectory.load(plain)
    junk = tmp_path / "junk.dm.safetensors"
    junk.write_bytes(struct.pack("<Q", 5) + b"{{{{{")
    with pytest.raises(TrajectoryFileError, match="corrupt safetensors header"):
        Trajectory.load(junk)


def test_file_from_another_latent_format_is_rejected(tmp_path):
    path = make(fmt="SDXL", fp="SDXL/BaseModel/EPS/unet-xyz").save(tmp_path / "xl.dm.safetensors")
    with pytest.raises(ValueError, match=r"'SDXL' latent format.*uses 'SD15'.*Invert the reference again"):
        Trajectory.load(path, latent_format="SD15", fingerprint="SD15/BaseModel/EPS/unet-abc")
    t = Trajectory.load(path)
    with pytest.raises(ValueError, match="'SDXL' latent format"):
        t.validate_against("SD15", "SD15/BaseModel/EPS/unet-abc")
    with pytest.raises(ValueError, match="another architecture.*unet-xyz.*unet-other"):
        t.validate_against("SDXL", "SDXL/BaseModel/EPS/unet-other")
    t.validate_against("SDXL", "SDXL/BaseModel/EPS/unet-xyz")  # same family: fine


def test_lookup_by_sigma_with_tolerance():
    t = make()
    for i, s in enumerate(SIGMAS.tolist()):
        assert t.index_of(s) == i
        assert t.index_of(s * (1 + 5e-5)) == i  # within rtol
        assert torch.equal(t.at(s), t.latents[i])
    # A sigma that went through float16 on a device still resolves.
    assert t.index_of(float(torch.tensor(4.6917).half())) == 1
    assert t.index_of(1e-7) == 5 and t.contains(0.0)
    assert not t.contains(2.0)
    with pytest.raises(ValueError) as err:
        t.index_of(1.0)
    msg = str(err.value)
    assert "sigma 1 is not in this reference trajectory" in msg
    assert "1.2 (step 2)" in msg and "0.4 (step 3)" in msg
    assert "steps=5, scheduler=ddim_uniform" in msg


def test_invariants_are_enforced():
    t = make()
    with pytest.raises(ValueError, match="strictly descending"):
        Trajectory(torch.tensor([2.0, 2.0, 0.0]), t.latents[:3], "SD15", "fp")
    with pytest.raises(ValueError, match="float32"):
        Trajectory(SIGMAS.double(), t.latents, "SD15", "fp")
    with pytest.raises(ValueError, match=r"\[S, N, C, H, W\]"):
        Trajectory(SIGMAS, t.latents[:, 0], "SD15", "fp")
    with pytest.raises(ValueError, match="meta"):
        Trajectory(SIGMAS, t.latents, "SD15", "fp", meta={"bad": [1, 2]})
    with pytest.raises(ValueError, match="latent_format"):
        Trajectory(SIGMAS, t.latents, "", "fp")


def test_deepcopy_shares_the_trajectory():
    t = make()
    holder = {"traj": t, "other": [1]}
    cp = copy.deepcopy(holder)
    assert cp["traj"] is t and cp["other"] is not holder["other"]
