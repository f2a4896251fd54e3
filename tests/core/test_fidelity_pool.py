"""Pooling fidelity runs (pure arithmetic on per-sample rows, no model)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import fidelity_pool as P  # noqa: E402
from fidelity import MEASURES  # noqa: E402

SETTINGS = {"steps": 20, "cfg": 4.0, "sampler": "ddim", "scheduler": "ddim_uniform",
            "weights": "miniworld.safetensors", "palette": "v2"}


def _row(case: int, colour: float) -> dict:
    row = {k: 0.5 for k in MEASURES}
    row.update(colour_set_ok=colour, case=case, seed=case * 10)
    return row


def _run(kv: list[tuple[int, float]], name: str, extra_method: bool = False, **settings) -> dict:
    samples = {"baseline": [_row(c, 0.0) for c, _ in kv], "kv": [_row(c, v) for c, v in kv]}
    if extra_method:
        samples["ama"] = [_row(c, 1.0) for c, _ in kv]
    return {
        "_path": name,
        "cases": f"{name}.json",
        "settings": {**SETTINGS, **settings},
        "samples": samples,
        "n_samples": {m: len(r) for m, r in samples.items()},
        "methods": {"kv": {"colour_set_ok": sum(v for _, v in kv) / len(kv)}},
    }


def test_pooled_mean_counts_every_sample_and_cases_stay_apart_per_run():
    a = _run([(0, 1.0), (0, 1.0), (1, 0.0)], "a")           # 2 of 3
    b = _run([(0, 0.0), (0, 0.0), (1, 1.0), (1, 1.0)], "b", extra_method=True)  # 2 of 4
    p = P.pool([a, b])
    assert p["methods"]["kv"]["colour_set_ok"] == pytest.approx(4 / 7)
    assert p["n_samples"]["kv"] == 7
    assert p["n_cases"]["kv"] == 4  # case 0 of run a is not case 0 of run b
    assert list(p["methods"]) == ["baseline", "kv"]  # "ama" is only in one run
    assert p["controls"]["b_kv_transfer"]["pass"] is True


def test_control_b_fails_under_one_half():
    p = P.pool([_run([(0, 1.0), (1, 0.0), (2, 0.0)], "a")])
    b = p["controls"]["b_kv_transfer"]
    assert b["colour_set_ok"] == pytest.approx(1 / 3)
    assert b["pass"] is False


def test_case_interval_is_wider_than_the_sample_interval_when_seeds_agree_within_a_case():
    # Twelve cases, three identical seeds each: 36 samples but only 12 independent draws.
    rows = [(c, float(c % 2)) for c in range(12) for _ in range(3)]
    p = P.pool([_run(rows, "a")])
    lo_s, hi_s = p["ci95"]["kv"]["colour_set_ok"]
    lo_c, hi_c = p["ci95_cases"]["kv"]["colour_set_ok"]
    assert lo_s <= 0.5 <= hi_s and lo_c <= 0.5 <= hi_c
    assert (hi_c - lo_c) > 1.3 * (hi_s - lo_s)


def test_cluster_bootstrap_of_constant_groups_is_that_constant():
    assert P.cluster_bootstrap_ci([[1.0, 1.0], [1.0]]) == (1.0, 1.0)
    lo, hi = P.cluster_bootstrap_ci([[0.0], [1.0]])
    assert lo == 0.0 and hi == 1.0


def test_runs_of_different_models_refuse_to_pool():
    a = _run([(0, 1.0)], "a")
    b = _run([(0, 1.0)], "b", weights="miniworld-trained.safetensors")
    with pytest.raises(ValueError, match="weights: 'miniworld.safetensors' vs 'miniworld-trained"):
        P.pool([a, b])


H1, H2 = "1" * 64, "2" * 64


def test_one_file_under_two_names_pools_by_its_recorded_or_vouched_hash():
    candidate = _run([(0, 1.0)], "a", weights="miniworld-trained.safetensors")
    shipped = _run([(0, 0.0)], "b", weights_sha256=H1)
    with pytest.raises(ValueError, match="--weights-sha256 NAME=HASH"):
        P.pool([candidate, shipped])
    p = P.pool([candidate, shipped], {"miniworld-trained.safetensors": H1})
    assert p["n_samples"]["kv"] == 2
    assert p["settings"]["weights_identity"] == f"sha256:{H1}"
    assert p["settings"]["weights"] == ["miniworld-trained.safetensors", "miniworld.safetensors"]
    recorded = _run([(0, 1.0)], "c", weights="miniworld-trained.safetensors", weights_sha256=H1)
    assert P.pool([recorded, shipped])["n_samples"]["kv"] == 2


def test_one_name_over_two_files_refuses_to_pool_and_a_wrong_vouch_is_caught():
    a = _run([(0, 1.0)], "a", weights_sha256=H1)
    b = _run([(0, 1.0)], "b", weights_sha256=H2)
    with pytest.raises(ValueError, match="weights"):
        P.pool([a, b])
    with pytest.raises(ValueError, match="recorded SHA-256"):
        P.pool([a], {"miniworld.safetensors": H2})


def test_cli_writes_json_and_markdown_and_names_a_missing_run(tmp_path):
    run = _run([(0, 1.0), (1, 1.0)], "a")
    d = tmp_path / "run"
    d.mkdir()
    (d / "fidelity.json").write_text(json.dumps({k: v for k, v in run.items() if k != "_path"}))
    assert P.main([str(d), "--out", str(tmp_path / "out")]) == 0
    pooled = json.loads((tmp_path / "out" / "pooled.json").read_text())
    assert pooled["controls"]["b_kv_transfer"]["colour_set_ok"] == 1.0
    assert "(b) passed on the pooled samples" in (tmp_path / "out" / "pooled.md").read_text()
    with pytest.raises(SystemExit, match="no fidelity.json there"):
        P.main([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="NAME=HASH"):
        P.main([str(d), "--out", str(tmp_path / "out"), "--weights-sha256", "miniworld.safetensors=abc"])
