"""The frozen case files of the fidelity benchmark: reproducible, and held-out sets truly held out."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "fidelity_cases"))

import make_cases  # noqa: E402

CASES_DIR = Path(make_cases.__file__).resolve().parent


def test_the_script_rewrites_every_frozen_case_file_byte_for_byte():
    built = make_cases.build()
    on_disk = sorted(p.name for p in CASES_DIR.glob("*.json"))
    assert sorted(built) == on_disk
    for name, case_list in built.items():
        assert make_cases.render(case_list) == (CASES_DIR / name).read_text(), name


def test_no_subject_appears_in_two_case_files_and_targets_move_the_subject():
    built = make_cases.build()
    seen: dict[tuple, str] = {}
    for name, case_list in built.items():
        for case in case_list:
            key = make_cases._key(case)
            assert key not in seen, f"{key} in {seen.get(key)} and {name}"
            seen[key] = name
            ref = case["reference"]
            assert case["target"][0] == ref["shape"] and case["target"][1] != ref["position"]
            assert len(set(case["seeds"])) == 3
