"""The repository explains itself: every document the code names is in it, and the code refers to
no issue numbers (a person who clones the repository has neither the tracker nor outside notes)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE_SUFFIXES = {".py", ".js", ".sh"}
_DOC_REF = re.compile(r"[A-Za-z0-9_./-]*[A-Za-z0-9_-]\.md\b")
_ISSUE_REF = re.compile(r"\bissues?\s*#?\d+|\(#\d+\)", re.IGNORECASE)


def _code_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
        files = [REPO / f for f in out]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        files = [p for p in REPO.rglob("*") if not any(part.startswith(".") for part in p.parts)]
    return [f for f in files if f.suffix in CODE_SUFFIXES or f.name in {"Makefile", "run"}]


def _exists(ref: str, source: Path) -> bool:
    candidates = [REPO / ref, source.parent / ref, REPO / "docs" / Path(ref).name]
    return any(c.is_file() for c in candidates)


def _is_output(ref: str, text: str) -> bool:
    """A file the code *writes* (``out / "<name>"``, or ``OUT/<name>`` in its docs), not a document."""
    name = ref.split("/")[-1]
    placeholder = re.fullmatch(r"[A-Z]+/" + re.escape(name), ref) is not None
    return f'/ "{name}"' in text and (ref == name or placeholder)


def test_referenced_documents_exist():
    missing = []
    for f in _code_files():
        if not f.is_file() or f.resolve() == Path(__file__).resolve():
            continue
        text = f.read_text(encoding="utf-8", errors="replace")
        for ref in _DOC_REF.findall(text):
            if not _exists(ref, f) and not _is_output(ref, text):
                missing.append(f"{f.relative_to(REPO)}: {ref}")
    assert not missing, "code names documents that are not in the repository:\n" + "\n".join(missing)


def test_code_refers_to_no_issue_numbers():
    found = []
    for f in _code_files():
        if not f.is_file() or f.resolve() == Path(__file__).resolve():
            continue
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if _ISSUE_REF.search(line):
                found.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, "code refers to issue numbers:\n" + "\n".join(found)


def test_the_checks_can_fail(tmp_path):
    assert _DOC_REF.findall("see method.md §6 and docs/host.md") == ["method.md", "docs/host.md"]
    assert not _exists("no-such-notes" + ".md", tmp_path / "x.py")
    assert _ISSUE_REF.search("DM_AMAPatch (issue 5 §6)") and not _ISSUE_REF.search("an issue with it")
    # a written output is not a document; a document merely named beside a write still is
    report = "report" + ".md"  # built, so that this file names no document itself
    assert _is_output(f"OUT/{report}", f'open(out / "{report}", "w")  # OUT/{report}')
    assert not _is_output(f"docs/{report}", f'open(out / "{report}", "w")')
    assert not _is_output(report, f"see {report}")


def test_the_registry_icon_is_in_the_repository():
    """``pyproject.toml`` names the icon by its URL on the main branch; that file must exist here."""
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    url = re.search(r'^Icon\s*=\s*"([^"]+)"', text, re.M).group(1)
    rel = url.split("/main/", 1)[1]
    assert (REPO / rel).is_file(), f"{rel} (from the Icon URL) is not in the repository"
    assert (REPO / rel).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
