"""A release is consistent before it is published: pyproject.toml, CHANGELOG.md, the README and the
Registry's own validator agree.

WHY: the publish workflow uploads to the Comfy Registry as soon as ``pyproject.toml`` changes on
``main``, so a version bump without its changelog entry, or a ``requires-comfyui`` floor the changelog
and README do not state, would be published as it is. The agreement checks are plain functions on
text (:func:`changelog_problems`, :func:`readme_problems`) so that tests can feed them a deliberately
wrong changelog and see them fail.

``comfy node validate`` comes from comfy-cli, a test-only tool kept in its own virtual environment
(``.venv-tools``, made by ``scripts/setup_tools.sh``; ``make test`` runs it first) because its
dependency pins clash with the pinned host's. Without it the validator tests fail and say how to get
it: skipping would let a release pass untested. The validator reads ``pyproject.toml`` from the current
directory and runs ruff's security rules there; it needs no network. It runs with telemetry off
(``DO_NOT_TRACK``), no prompt (``--skip-prompt``), plain output (``--no-json``) and a temporary
``HOME``, so it writes no configuration outside the test.
"""

from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
CHANGELOG = REPO / "CHANGELOG.md"
PYPROJECT = REPO / "pyproject.toml"
SETUP_TOOLS = REPO / "scripts" / "setup_tools.sh"
COMFY = REPO / ".venv-tools" / "bin" / "comfy"
SETUP_HINT = "run `bash scripts/setup_tools.sh` (make test runs it before the tests)"

#: The subsection names Keep a Changelog 1.1.0 defines.
SECTIONS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
_ENTRY = re.compile(r"^## \[(?P<version>[^\]]+)\](?P<rest>.*)$", re.MULTILINE)
_DATED = re.compile(r"^ - (\d{4}-\d{2}-\d{2})\s*$")
_SEMVER = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")
_SUBSECTION = re.compile(r"^### (.+?)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Entry:
    """One ``## [version] - date`` section of the changelog; ``date`` is None when it has none."""

    version: str
    date: str | None
    body: str


def parse_changelog(text: str) -> list[Entry]:
    """The released entries, newest first as written; ``[Unreleased]`` is work not yet published."""
    heads = list(_ENTRY.finditer(text))
    entries = []
    for i, m in enumerate(heads):
        if m.group("version").strip().lower() == "unreleased":
            continue
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        dated = _DATED.match(m.group("rest"))
        entries.append(Entry(m.group("version").strip(), dated.group(1) if dated else None,
                             text[m.end():end]))
    return entries


def comfyui_floor(requires_comfyui: str) -> str:
    """The oldest ComfyUI a ``requires-comfyui`` specifier admits (its ``>=`` part)."""
    for part in requires_comfyui.split(","):
        m = re.fullmatch(r"\s*>=\s*(\d+\.\d+\.\d+)\s*", part)
        if m:
            return m.group(1)
    raise ValueError(f"requires-comfyui {requires_comfyui!r} has no '>=X.Y.Z' floor")


def names_comfyui(text: str, version: str) -> bool:
    """Whether prose names ``ComfyUI <version>`` (bold allowed), not a longer version that starts alike."""
    return re.search(rf"ComfyUI\s+\**{re.escape(version)}(?![\d.]*\d)", text) is not None


def _semver(version: str) -> tuple[int, int, int] | None:
    m = _SEMVER.match(version)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def changelog_problems(text: str, version: str, requires_comfyui: str) -> list[str]:
    """Everything that keeps the changelog from describing the release ``pyproject.toml`` declares.

    The top released entry must carry the project version and state the ``requires-comfyui`` floor;
    every entry needs a semantic version, a real date and Keep a Changelog subsections; versions and
    dates go down the file.
    """
    problems = []
    if "keepachangelog.com/en/1.1.0" not in text:
        problems.append("the header does not say it follows Keep a Changelog 1.1.0")
    entries = parse_changelog(text)
    if not entries:
        return problems + ["no released entry (## [X.Y.Z] - YYYY-MM-DD)"]
    top = entries[0]
    if top.version != version:
        problems.append(f"top released entry is {top.version}, pyproject.toml says {version}")
    floor = comfyui_floor(requires_comfyui)
    if not names_comfyui(top.body, floor):
        problems.append(f"top entry {top.version} does not name ComfyUI {floor}, the requires-comfyui floor")
    previous: Entry | None = None
    for e in entries:
        if _semver(e.version) is None:
            problems.append(f"entry {e.version!r} is not a semantic version X.Y.Z")
        if e.date is None:
            problems.append(f"entry {e.version} has no ' - YYYY-MM-DD' date")
        else:
            try:
                datetime.date.fromisoformat(e.date)
            except ValueError:
                problems.append(f"entry {e.version} has an impossible date {e.date}")
        names = _SUBSECTION.findall(e.body)
        if not names:
            problems.append(f"entry {e.version} has no ### Added/Changed/Fixed/... subsection")
        problems += [f"entry {e.version} has a subsection '{n}' outside {', '.join(SECTIONS)}"
                     for n in names if n not in SECTIONS]
        if previous is not None:
            newer, older = _semver(previous.version), _semver(e.version)
            if newer and older and not newer > older:
                problems.append(f"entry {e.version} comes after {previous.version}: versions must go down")
            if previous.date and e.date and previous.date < e.date:
                problems.append(f"entry {e.version} ({e.date}) is dated after {previous.version} "
                                f"({previous.date})")
        previous = e
    return problems


def readme_problems(readme: str, requires_comfyui: str) -> list[str]:
    """The README must name the same oldest supported ComfyUI as ``requires-comfyui``."""
    floor = comfyui_floor(requires_comfyui)
    return [] if names_comfyui(readme, floor) else [f"README.md does not name ComfyUI {floor}"]


def validate_output_problems(returncode: int, output: str) -> list[str]:
    """Read ``comfy node validate`` strictly: it exits 0 on warnings the Registry acts on.

    An invalid ``requires-comfyui`` or licence is a warning and the field is dropped at publish time;
    ruff's security findings (exec, eval, several statements on a line) are warnings announced as
    soon-to-be errors. Any of them is a failure here.
    """
    problems = [f"exit status {returncode}"] if returncode else []
    problems += [line.strip() for line in output.splitlines()
                 if re.search(r"\b(warning|error)\b", line, re.IGNORECASE)]
    if "All validation checks passed" not in output:
        problems.append("no 'All validation checks passed' line")
    return problems


def _pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _release_fields() -> tuple[str, str]:
    data = _pyproject()
    return data["project"]["version"], data["tool"]["comfy"]["requires-comfyui"]


def _comfy(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """Run the pinned comfy-cli offline-safe: no telemetry, no prompt, plain output, a private HOME."""
    if not COMFY.is_file():
        pytest.fail(f"comfy-cli is not installed at {COMFY.relative_to(REPO)}: {SETUP_HINT}", pytrace=False)
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HOME": str(home), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1",
           "PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run([str(COMFY), "--skip-prompt", "--no-json", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


# ---- agreement of pyproject.toml, CHANGELOG.md and README.md -------------------------------------------


def test_changelog_describes_the_version_pyproject_declares():
    version, requires = _release_fields()
    problems = changelog_problems(CHANGELOG.read_text(encoding="utf-8"), version, requires)
    assert not problems, "CHANGELOG.md and pyproject.toml disagree:\n" + "\n".join(problems)


def test_readme_names_the_requires_comfyui_floor():
    _, requires = _release_fields()
    problems = readme_problems((REPO / "README.md").read_text(encoding="utf-8"), requires)
    assert not problems, "\n".join(problems)


def test_comfy_cli_is_no_runtime_dependency():
    runtime = " ".join(_pyproject()["project"]["dependencies"]).lower()
    runtime += (REPO / "requirements.txt").read_text(encoding="utf-8").lower()
    assert "comfy-cli" not in runtime and "comfy_cli" not in runtime


_SYNTHETIC = """# Changelog

The format is based on [Keep a Changelog](https://keepachangelog.com/en/1.1.0/).

## [Unreleased]

### Added

- Something not yet published.

## [1.1.0] - 2026-02-01

Tested on ComfyUI 0.3.75 and newer.

### Fixed

- A fix.

## [1.0.0] - 2026-01-01

### Added

- The first release.
"""

#: case -> (text in the synthetic changelog, its replacement, a phrase the rejection must contain).
_MISMATCHES = {
    "top entry is not the pyproject version": ("[1.1.0]", "[1.0.9]", "pyproject.toml says"),
    "top entry omits the floor": ("ComfyUI 0.3.75", "ComfyUI 0.3.7", "requires-comfyui floor"),
    "floor only as a longer version": ("ComfyUI 0.3.75", "ComfyUI 0.3.750", "requires-comfyui floor"),
    "versions go up": ("[1.0.0]", "[1.2.0]", "versions must go down"),
    "dates go up": ("2026-01-01", "2026-03-01", "is dated after"),
    "no date": ("[1.0.0] - 2026-01-01", "[1.0.0]", "has no ' - YYYY-MM-DD' date"),
    "impossible date": ("2026-01-01", "2026-02-30", "impossible date"),
    "not semver": ("[1.0.0]", "[1.0]", "not a semantic version"),
    "no subsection": ("### Fixed\n", "", "has no ### Added"),
    "unknown subsection": ("### Fixed", "### Improved", "outside Added"),
    "no header": ("keepachangelog.com/en/1.1.0/", "example.com/", "Keep a Changelog 1.1.0"),
    "nothing released": (_SYNTHETIC[_SYNTHETIC.index("## [1.1.0]"):], "", "no released entry"),
}


def test_the_synthetic_changelog_is_accepted():
    """The control for the rejections below: ``[Unreleased]`` is skipped, the rest agrees."""
    assert changelog_problems(_SYNTHETIC, "1.1.0", ">=0.3.75") == []
    assert [e.version for e in parse_changelog(_SYNTHETIC)] == ["1.1.0", "1.0.0"]


@pytest.mark.parametrize("case", sorted(_MISMATCHES))
def test_a_mismatched_changelog_is_rejected(case: str):
    old, new, expected = _MISMATCHES[case]
    assert old in _SYNTHETIC
    text = _SYNTHETIC.replace(old, new)
    problems = changelog_problems(text, "1.1.0", ">=0.3.75")
    assert any(expected in p for p in problems), f"{case}: expected {expected!r} in {problems}"


def test_the_real_changelog_is_rejected_for_another_version_or_floor():
    version, requires = _release_fields()
    text = CHANGELOG.read_text(encoding="utf-8")
    assert any("pyproject.toml says" in p for p in changelog_problems(text, version + "1", requires))
    assert any("floor" in p for p in changelog_problems(text, version, ">=0.3.74"))


def test_readme_check_can_fail():
    assert readme_problems("Requires ComfyUI **0.3.75** or newer.", ">=0.3.75") == []
    assert readme_problems("Requires ComfyUI 0.3.76 or newer.", ">=0.3.75")
    with pytest.raises(ValueError):
        comfyui_floor("<0.4.0")


# ---- comfy node validate -----------------------------------------------------------------------------


def test_comfy_cli_is_the_pinned_version(tmp_path):
    pin = re.search(r'COMFY_CLI_PIN="comfy-cli==([^"]+)"', SETUP_TOOLS.read_text(encoding="utf-8"))
    assert pin, "scripts/setup_tools.sh names no comfy-cli pin"
    out = _comfy(["--version"], REPO, tmp_path)
    assert out.stdout.strip() == pin.group(1), f"installed {out.stdout.strip()!r}: {SETUP_HINT}"


def test_comfy_node_validate_passes(tmp_path):
    out = _comfy(["node", "validate"], REPO, tmp_path)
    problems = validate_output_problems(out.returncode, out.stdout + out.stderr)
    assert not problems, ("comfy node validate:\n" + "\n".join(problems)
                          + f"\n--- output ---\n{out.stdout}{out.stderr}")


@pytest.mark.parametrize(("field", "value"), [("version", '""'), ("requires-comfyui", '"newest"')])
def test_comfy_node_validate_can_fail(tmp_path, field: str, value: str):
    """An empty version (exit 1) and a malformed floor (a warning only) are both failures here."""
    text = PYPROJECT.read_text(encoding="utf-8")
    broken, n = re.subn(rf"^{re.escape(field)} = .*$", f"{field} = {value}", text, count=1,
                        flags=re.MULTILINE)
    assert n == 1, f"pyproject.toml has no {field} line"
    work = tmp_path / "pack"
    work.mkdir()
    (work / "pyproject.toml").write_text(broken, encoding="utf-8")
    out = _comfy(["node", "validate"], work, tmp_path / "home")
    assert validate_output_problems(out.returncode, out.stdout + out.stderr), out.stdout + out.stderr
