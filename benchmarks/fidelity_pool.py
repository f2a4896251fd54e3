"""Pool the per-sample rows of several ``fidelity.py`` runs of one model and read control (b) on them.

WHY: one case file of a dozen subjects gives control (b) an interval about ±0.17 wide, so a model
near the bar of one half can neither pass nor fail it clearly. More cases, run separately and fixed
before their run, narrow it; this script joins them without rerunning anything. It refuses runs of
different models or settings, since pooling those would average two different experiments.

Two intervals are given for every pooled mean: the benchmark's own (a bootstrap over samples) and a
bootstrap over cases. The seeds of one case share a reference subject and a target prompt, so they
are not independent draws; resampling whole cases is the more cautious interval.

    python benchmarks/fidelity_pool.py RUN [RUN ...] --out DIR [--weights-sha256 NAME=HASH ...]

RUN is a ``fidelity.json`` or the folder holding one. Writes ``DIR/pooled.json`` and
``DIR/pooled.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from fidelity import MEASURES, _fmt, bootstrap_ci, control_b  # noqa: E402

#: Settings that must agree between pooled runs (the case file may differ; that is the point). The
#: weights are compared by their identity (``weights_identity``), not in this list.
SAME_SETTINGS = ("steps", "cfg", "sampler", "scheduler", "palette")


def weights_identity(settings: dict, known: dict[str, str]) -> str:
    """What makes two runs' weights the same file: the SHA-256 the run recorded, else one the caller
    vouches for by file name (``--weights-sha256 NAME=HASH``, for runs made before hashes were
    recorded), else the file name alone.

    WHY: a candidate model is measured under its candidate name and then shipped under another; its
    runs must still pool, and runs of two different files under one name must not.
    """
    name = settings.get("weights")
    recorded = settings.get("weights_sha256")
    vouched = known.get(str(name))
    if recorded and vouched and recorded != vouched:
        raise ValueError(f"{name}: the run recorded SHA-256 {recorded}, not the {vouched} given for it.")
    digest = recorded or vouched
    return f"sha256:{digest}" if digest else f"name:{name}"


def cluster_bootstrap_ci(groups: list[list[float]], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of all values, resampling whole groups (cases).

    Each resample draws as many groups as there are, with replacement, and takes the mean over the
    values of the drawn groups, so a group of three seeds weighs three samples, as in the plain mean.
    """
    groups = [g for g in groups if g]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    k = len(groups)
    means = []
    for _ in range(n):
        total, count = 0.0, 0
        for _ in range(k):
            g = groups[rng.randrange(k)]
            total += sum(g)
            count += len(g)
        means.append(total / count)
    means.sort()
    return (means[int(0.025 * n)], means[int(0.975 * n) - 1])


def load_run(path: Path) -> dict:
    """A run's ``fidelity.json``, from the file or its folder, with a clear error when it is unusable."""
    file = path / "fidelity.json" if path.is_dir() else path
    if not file.is_file():
        raise SystemExit(f"{path}: no fidelity.json there; pass a fidelity.py output folder or its JSON.")
    data = json.loads(file.read_text())
    if "samples" not in data:
        raise SystemExit(f"{file}: it holds no per-sample rows ('samples'); rerun fidelity.py to get them.")
    data["_path"] = str(file)
    return data


def pool(runs: list[dict], known_sha256: dict[str, str] | None = None) -> dict:
    """Pool the samples of the methods every run measured; cases are told apart per run."""
    if not runs:
        raise ValueError("no runs to pool.")
    known = known_sha256 or {}
    first = runs[0]["settings"]
    identity = weights_identity(first, known)
    for r in runs[1:]:
        differ = [k for k in SAME_SETTINGS if r["settings"].get(k) != first.get(k)]
        if weights_identity(r["settings"], known) != identity:
            differ.insert(0, "weights")
        if differ:
            detail = ", ".join(f"{k}: {first.get(k)!r} vs {r['settings'].get(k)!r}" for k in differ)
            if differ[0] == "weights" and identity.startswith("name:"):
                detail += " (the same file under two names pools with --weights-sha256 NAME=HASH)"
            raise ValueError(f"these runs differ in {detail}; only runs of one model and one setting pool.")
    methods = [m for m in runs[0]["samples"] if all(m in r["samples"] for r in runs)]
    if not methods:
        raise ValueError("the runs share no method; nothing to pool.")

    means: dict = {}
    ci_samples: dict = {}
    ci_cases: dict = {}
    n_samples: dict = {}
    n_cases: dict = {}
    for m in methods:
        rows = [(ri, row) for ri, r in enumerate(runs) for row in r["samples"][m]]
        n_samples[m] = len(rows)
        n_cases[m] = len({(ri, row["case"]) for ri, row in rows})
        means[m], ci_samples[m], ci_cases[m] = {}, {}, {}
        for k in MEASURES:
            vals = [row[k] for _, row in rows if row[k] == row[k]]
            groups: dict = {}
            for ri, row in rows:
                if row[k] == row[k]:
                    groups.setdefault((ri, row["case"]), []).append(row[k])
            means[m][k] = sum(vals) / len(vals) if vals else float("nan")
            ci_samples[m][k] = bootstrap_ci(vals)
            ci_cases[m][k] = cluster_bootstrap_ci(list(groups.values()))

    out = {
        "runs": [
            {
                "file": r["_path"],
                "cases": r.get("cases"),
                "n_samples": r["n_samples"],
                "kv_colour_set_ok": r["methods"].get("kv", {}).get("colour_set_ok"),
            }
            for r in runs
        ],
        "settings": {**{k: first.get(k) for k in SAME_SETTINGS}, "weights": sorted(
            {str(r["settings"].get("weights")) for r in runs}), "weights_identity": identity},
        "methods": means,
        "ci95": ci_samples,
        "ci95_cases": ci_cases,
        "n_samples": n_samples,
        "n_cases": n_cases,
        "controls": {},
    }
    if "kv" in means:
        b = control_b(means["kv"]["colour_set_ok"], ci_samples["kv"]["colour_set_ok"])
        b["ci95_cases"] = ci_cases["kv"]["colour_set_ok"]
        b["rule"] += " over the pooled samples"
        out["controls"]["b_kv_transfer"] = b
    return out


def markdown(p: dict) -> str:
    lines = []
    b = p["controls"].get("b_kv_transfer")
    runs = ", ".join(
        f"{Path(str(r['cases'])).name} ({r['n_samples'].get('kv', r['n_samples'].get('baseline', 0))} samples"
        + (f", kv {r['kv_colour_set_ok']:.2f}" if r["kv_colour_set_ok"] is not None else "")
        + ")"
        for r in p["runs"]
    )
    lines.append(f"Pooled over {len(p['runs'])} run{'s' if len(p['runs']) > 1 else ''}: {runs}.")
    lines.append("")
    if b:
        lines.append(
            f"(b) {'passed' if b['pass'] else 'FAILED'} on the pooled samples: key/value replacement "
            f"transfers the colour set in {_fmt(b['colour_set_ok'], b['ci95'])} over samples, "
            f"{_fmt(b['colour_set_ok'], b['ci95_cases'])} over cases ({b['rule']})."
        )
        lines.append("")
    lines.append("| method | samples (cases) | " + " | ".join(MEASURES) + " |")
    lines.append("|---|---|" + "---|" * len(MEASURES))
    for m, vals in p["methods"].items():
        cells = " | ".join(_fmt(vals[k], p["ci95_cases"][m][k]) for k in MEASURES)
        lines.append(f"| {m} | {p['n_samples'][m]} ({p['n_cases'][m]}) | {cells} |")
    lines.append(
        "\nIntervals in the table: 95% bootstrap over cases (the seeds of a case resampled together); "
        f"settings {p['settings']}."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="fidelity.json files or the folders holding them")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--weights-sha256",
        action="append",
        default=[],
        metavar="NAME=HASH",
        help="the SHA-256 of a weights file named in runs that recorded none (repeatable)",
    )
    args = ap.parse_args(argv)
    known = {}
    for item in args.weights_sha256:
        name, sep, digest = item.partition("=")
        if not sep or len(digest) != 64:
            raise SystemExit(f"--weights-sha256 {item!r}: expected NAME=HASH with a 64-digit SHA-256.")
        known[name] = digest.lower()
    try:
        pooled = pool([load_run(p) for p in args.runs], known)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pooled.json").write_text(json.dumps(pooled, indent=1))
    md = markdown(pooled)
    (args.out / "pooled.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'pooled.json'} and pooled.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
