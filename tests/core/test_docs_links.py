"""The documents a person reads first stay readable and whole: the README stays short and in the order a
user needs, lists every node with a link to its page, keeps the test commands CI runs, and every
relative link or image in it, in ``docs/`` and in ``web/docs/`` points at a file of the repository.

Links are read the way Markdown renders them: inline links and images (``[text](target)``,
``![alt](target)``), reference definitions (``[name]: target``) and HTML ``src``/``href`` attributes,
outside fenced code blocks and inline code. Web links (``http(s)://``, ``mailto:``) are not followed;
a fragment (``page#section``) needs only its file part to exist.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import unquote

REPO = Path(__file__).resolve().parents[2]
README_MAX_LINES = 350
# The README's sections, in the order a ComfyUI user needs them (what it does comes before the first).
README_SECTIONS = ["Install", "Quick start", "Nodes", "Example workflows", "What the fidelity figures show",
                   "Performance", "Troubleshooting", "Development", "Citation", "Licence"]

_INLINE = re.compile(r"\]\(\s*(<[^>\n]*>|[^)\s]+)(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFDEF = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*(<[^>\n]*>|\S+)", re.M)
_HTML = re.compile(r"""\b(?:src|href)\s*=\s*["']([^"']+)["']""", re.I)
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_FENCE = re.compile(r"^\s{0,3}(```|~~~)")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)  # http:, https:, mailto:, data:, //host


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    kept, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(_CODE_SPAN.sub("", line))
    return "\n".join(kept)


def links(text: str) -> list[str]:
    """Every link and image target in a Markdown text, as written."""
    prose = _prose(text)
    found = _INLINE.findall(prose) + _REFDEF.findall(prose) + _HTML.findall(prose)
    return [t[1:-1] if t.startswith("<") and t.endswith(">") else t for t in found]


def broken_links(doc: Path, repo: Path = REPO) -> list[str]:
    """The relative targets in ``doc`` that are not a file or folder inside ``repo``."""
    bad = []
    for target in links(doc.read_text(encoding="utf-8")):
        if _EXTERNAL.match(target):
            continue
        path = unquote(target.split("#", 1)[0].split("?", 1)[0])
        if not path:  # a fragment of the same page
            continue
        resolved = ((repo / path.lstrip("/")) if path.startswith("/") else (doc.parent / path)).resolve()
        inside = resolved == repo.resolve() or repo.resolve() in resolved.parents
        if not (inside and resolved.exists()):
            bad.append(target)
    return bad


def _documents() -> list[Path]:
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    web_docs = REPO / "web" / "docs"
    if web_docs.is_dir():
        docs += sorted(web_docs.rglob("*.md"))
    return docs


def _h2(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"^## (.+)$", _prose(text), re.M)]


def test_readme_is_short():
    n = len((REPO / "README.md").read_text(encoding="utf-8").splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines, over {README_MAX_LINES}: move detail to docs/"


def test_readme_sections_come_in_the_users_order():
    assert _h2((REPO / "README.md").read_text(encoding="utf-8")) == README_SECTIONS


def test_readme_keeps_the_test_commands_ci_runs():
    """``.ci/run`` runs the README's test commands: they must stay in it, as commands."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)
    commands = {line.split("#", 1)[0].strip() for block in blocks for line in block.splitlines()}
    assert {"make test", "make test-compat"} <= commands
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M) and re.search(r"^\s*make test-compat$", ci, re.M)


def test_readme_links_every_node_to_its_page():
    """One row per registered node (the schema snapshot is the registered list), linking its page."""
    nodes = json.loads((REPO / "tests" / "host" / "schema_snapshot.json").read_text(encoding="utf-8"))
    targets = links((REPO / "README.md").read_text(encoding="utf-8"))
    missing = [node for node in nodes if f"web/docs/{node}.md" not in targets]
    assert not missing, f"README.md's node table has no link to the page of: {missing}"


def test_every_relative_link_and_image_resolves():
    bad = {str(doc.relative_to(REPO)): broken for doc in _documents() if (broken := broken_links(doc))}
    assert not bad, "links to files that are not in the repository:\n" + "\n".join(
        f"{doc}: {target}" for doc, targets in bad.items() for target in targets)


def test_the_link_checks_can_fail(tmp_path):
    md = ".md"  # the page names are built, so that this file names no document itself
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / f"there{md}").write_text("# There\n", encoding="utf-8")
    (tmp_path / "a b.png").write_bytes(b"\x89PNG")
    doc = tmp_path / "docs" / f"page{md}"
    doc.write_text(
        f"[ok](there{md}#there) [ok](<../a b.png>) ![ok](../a%20b.png) [ok](#local) [web](https://x.org/y{md})\n"
        f"[gone](gone{md}) ![gone](../img/none.png \"title\") <img src=\"../nope.jpg\">\n"
        f"[out](../../out{md})\n"
        f"`[code](code{md})`\n```\n[fenced](fenced{md})\n```\n[ref]: ../refdef{md}\n", encoding="utf-8")
    assert sorted(broken_links(doc, tmp_path)) == sorted(
        [f"gone{md}", "../img/none.png", "../nope.jpg", f"../../out{md}", f"../refdef{md}"])
    assert _h2("## A\n```\n## not a heading\n```\n## B\n") == ["A", "B"]
