"""DM_SaveReference / DM_LoadReference: round trip, file list, validation and traversal refusal."""

from __future__ import annotations

import os
import shutil

import pytest
import torch


def _graph(prefix: str, steps: int = 2, layout: str = "sd15", batch: int = 1) -> dict:
    return {
        "1": {"class_type": "DMTest_TinyModel", "inputs": {"layout": layout, "seed": 1}},
        "2": {"class_type": "DMTest_Cond", "inputs": {"seed": 1, "tokens": 77}},
        "3": {"class_type": "DMTest_Latent",
              "inputs": {"seed": 3, "height": 16, "width": 16, "batch": batch}},
        "4": {"class_type": "DM_InvertReference", "inputs": {
            "model": ["1", 0], "reference": ["3", 0], "reference_positive": ["2", 0],
            "steps": steps, "scheduler": "ddim_uniform", "cfg": 1.0}},
        "5": {"class_type": "DM_SaveReference", "inputs": {"reference": ["4", 0], "filename_prefix": prefix}},
    }


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def test_save_load_round_trip_through_the_nodes(dm, tiny, host, run_graph):
    inv = dm("nodes.node_invert")
    outputs = run_graph(_graph("dreammatcher/roundtrip"), "rt")
    path = host.dirs["output"] / "dreammatcher" / "roundtrip_00001.dm.safetensors"
    assert path.is_file(), outputs
    assert "roundtrip_00001.dm.safetensors" in outputs["5"]["text"][0]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]

    value = "output/dreammatcher/roundtrip_00001.dm.safetensors"
    assert value in inv.LoadReference.INPUT_TYPES()["required"]["reference_file"][1]["options"]
    with torch.inference_mode():
        loaded = inv.LoadReference.execute(value).args[0]
        model = tiny.build("sd15", 1)
        ref = inv.InvertReference.execute(model, tiny.latent(3), tiny.cond(1), steps=2).args[0]
    assert isinstance(loaded, dm("nodes.reference").Reference)
    a, b = loaded.trajectory, ref.trajectory
    assert _bits(a.latents) == _bits(b.latents) and _bits(a.sigmas) == _bits(b.sigmas)
    assert a.meta == b.meta and a.extras == {} and a.fingerprint == b.fingerprint
    assert _bits(loaded.positive[0][0]) == _bits(ref.positive[0][0])
    assert _bits(loaded.negative[0][0]) == _bits(ref.negative[0][0])
    loaded.check_model(model)

    # Save the loaded reference again (a graph Load -> Save): the second file is identical data.
    run_graph({"1": {"class_type": "DM_LoadReference", "inputs": {"reference_file": value}},
               "2": {"class_type": "DM_SaveReference",
                     "inputs": {"reference": ["1", 0], "filename_prefix": "roundtrip"}}}, "rt2")
    again = dm("nodes.reference").Reference.load(path.with_name("roundtrip_00002.dm.safetensors"))
    assert _bits(again.trajectory.latents) == _bits(a.latents) and again.trajectory.meta == a.meta


def test_conditioning_entries_are_stored_or_dropped_with_a_note(dm, tiny, tmp_path, caplog):
    refmod = dm("nodes.reference")
    with torch.inference_mode():
        ref = dm("nodes.node_invert").InvertReference.execute(
            tiny.build("sd15", 1), tiny.latent(3), tiny.cond(1), steps=1).args[0]
    pooled = torch.randn(1, 32)
    positive = [[ref.positive[0][0], {"pooled_output": pooled, "width": 1024, "area": (8, 8, 0, 0),
                                      "hooks": object()}]]
    custom = refmod.Reference(ref.trajectory, positive, ref.negative, {"note": "x"})
    path = custom.save(tmp_path / "c.dm.safetensors")
    assert "positive[0].hooks" in caplog.text
    back = refmod.Reference.load(path)
    d = back.positive[0][1]
    assert torch.equal(d["pooled_output"], pooled) and d["width"] == 1024 and d["area"] == (8, 8, 0, 0)
    assert "hooks" not in d and back.info["note"] == "x"


def test_traversal_and_bad_names_are_refused(dm, host, tiny, run_graph, caplog):
    refmod, inv = dm("nodes.reference"), dm("nodes.node_invert")
    for bad in ("../evil", "dreammatcher/../../evil", "/tmp/evil", "a/b", "a\\b", "..", ""):
        with pytest.raises(ValueError, match="not allowed"):
            refmod.save_path(bad)
    for bad in ("output/../secret.dm.safetensors", "output/dreammatcher/../../x.dm.safetensors",
                "/etc/x.dm.safetensors", "models/x.dm.safetensors", "output/dreammatcher/x.safetensors"):
        with pytest.raises(ValueError, match="not allowed"):
            inv.LoadReference.execute(bad)
    # A symlink inside the input folder that points outside it is refused too.
    outside = host.dirs["temp"] / "outside.dm.safetensors"
    outside.write_bytes(b"x")
    link = host.dirs["input"] / "link.dm.safetensors"
    link.symlink_to(outside)
    try:
        with pytest.raises(ValueError, match="outside"):
            inv.LoadReference.execute("input/link.dm.safetensors")
    finally:
        link.unlink()
    # Through the executor: the save node reports the refusal and writes nothing.
    before = sorted(host.dirs["output"].rglob("*"))
    with pytest.raises(AssertionError, match="graph failed"):
        run_graph(_graph("../escape", steps=1), "trav")
    assert "filename_prefix '../escape' is not allowed" in caplog.text
    assert sorted(host.dirs["output"].rglob("*")) == before
    assert not (host.dirs["output"].parent / "escape_00001.dm.safetensors").exists()


def test_input_folder_files_are_listed_and_validated(dm, host, tiny, tmp_path):
    refmod, inv = dm("nodes.reference"), dm("nodes.node_invert")
    with torch.inference_mode():
        ref = inv.InvertReference.execute(tiny.build("sdxl", 1), tiny.latent(3), tiny.cond(1),
                                             steps=1).args[0]
    (host.dirs["input"] / "dreammatcher").mkdir(exist_ok=True)
    good = ref.save(host.dirs["input"] / "dreammatcher" / "xl.dm.safetensors")
    shutil.copy(good, host.dirs["input"] / "xl_copy.dm.safetensors")
    bad = host.dirs["input"] / "broken.dm.safetensors"
    bad.write_bytes(good.read_bytes()[:-64])
    try:
        files = refmod.list_files()
        assert {"input/dreammatcher/xl.dm.safetensors", "input/xl_copy.dm.safetensors",
                "input/broken.dm.safetensors"} <= set(files)
        loaded = inv.LoadReference.execute("input/xl_copy.dm.safetensors").args[0]
        assert loaded.trajectory.latent_format == "SDXL"
        with pytest.raises(ValueError, match="'SDXL' latent format.*uses 'SD15'"):
            loaded.check_model(tiny.build("sd15", 1))
        with pytest.raises(ValueError, match="truncated"):
            inv.LoadReference.execute("input/broken.dm.safetensors")
        # A bare trajectory (no conditionings) is not a reference.
        ref.trajectory.save(host.dirs["input"] / "bare.dm.safetensors")
        with pytest.raises(ValueError, match="bare trajectory"):
            inv.LoadReference.execute("input/bare.dm.safetensors")
    finally:
        for p in ("dreammatcher/xl.dm.safetensors", "xl_copy.dm.safetensors", "broken.dm.safetensors",
                  "bare.dm.safetensors"):
            (host.dirs["input"] / p).unlink(missing_ok=True)


def test_load_fingerprint_changes_when_the_file_changes(dm, host, tiny):
    inv = dm("nodes.node_invert")
    with torch.inference_mode():
        ref = inv.InvertReference.execute(tiny.build("sd15", 1), tiny.latent(3), tiny.cond(1),
                                             steps=1).args[0]
    path = ref.save(host.dirs["input"] / "fp.dm.safetensors")
    try:
        first = inv.LoadReference.fingerprint_inputs("input/fp.dm.safetensors")
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        assert inv.LoadReference.fingerprint_inputs("input/fp.dm.safetensors") != first
    finally:
        path.unlink()
