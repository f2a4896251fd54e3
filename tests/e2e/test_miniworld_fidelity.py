"""A fast subset of ``make fidelity`` that can fail.

On the shipped miniature-world model, AMA (at the AMA Model Patch's defaults, and with the subject
mask) must bring the reference's appearance: a clearly smaller colour-histogram distance to the
reference than the same-seed baseline. It must also keep the baseline's structure (subject mask overlap
and centroid), on development cases the report does not use. Strength 0 being the baseline bit for bit
is checked in the host tier (``tests/host/test_miniworld_model.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys

from comfy_env import REPO

CASES = REPO / "benchmarks" / "fidelity_cases" / "dev.json"
#: Thresholds fixed from the first shipped model's development run (same 4 cases, first seed): histogram
#: distance to the reference 0.69 baseline, 0.32 ama, 0.47 ama-mask; mask IoU with the baseline
#: 0.86 / 0.96; centroid shift 0.51 / 0.22 px. Kept unchanged since: the second shipped model (palette
#: v2) measured 0.75, 0.38, 0.33; IoU 0.86 / 0.92; shift 0.58 / 0.28 px; the current one (palette v3)
#: 0.83, 0.38, 0.49; IoU 0.93 / 0.94; shift 0.31 / 0.21 px.
MIN_HIST_GAIN = {"ama": 0.15, "ama-mask": 0.10}
MIN_MASK_IOU = 0.75
MAX_CENTROID_SHIFT = 1.5


def test_ama_brings_the_reference_appearance_and_keeps_the_structure(tmp_path):
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "fidelity.py"),
        "--cases",
        str(CASES),
        "--out",
        str(tmp_path),
        "--steps",
        "20",
        "--methods",
        "baseline,ama,ama-mask",
        "--pairs",
        "0",
        "--max-cases",
        "4",
        "--max-seeds",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "fidelity.json").read_text())
    print("\n" + (tmp_path / "fidelity.md").read_text())
    base = result["methods"]["baseline"]
    for name, gain in MIN_HIST_GAIN.items():
        ama = result["methods"][name]
        assert base["hist_dist"] - ama["hist_dist"] >= gain, (name, base, ama)
        assert ama["colour_set_ok"] >= base["colour_set_ok"], (name, base, ama)
        assert ama["mask_iou_vs_baseline"] >= MIN_MASK_IOU, (name, ama)
        assert ama["centroid_shift_px"] <= MAX_CENTROID_SHIFT, (name, ama)
        assert ama["shape_ok"] >= base["shape_ok"] - 0.25, (name, base, ama)
