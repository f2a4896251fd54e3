"""Every registered node has a page for the frontend's node docs panel, and every page is whole.

The frontend shows ``WEB_DIRECTORY/docs/<NodeId>.md`` when a user asks for a node's help (the node
library's "?" button, the selection toolbox's info button). A node without a page gets only its
one-line description there, so a node added to the pack without a page, or a page left behind by a
renamed node, fails here. The registered nodes are the keys of ``tests/host/schema_snapshot.json``
(the host tier keeps that snapshot equal to what ComfyUI reports), so this test needs no ComfyUI.

Each page must have: a title naming the node id; one picture that exists, is described by its alt
text and stays within the size limits ``scripts/make_node_doc_images.py`` writes to (the panel is a
sidebar, and the pictures ship with the pack); the generated Inputs and Outputs tables, listing the
snapshot's inputs in order and its outputs' types (``scripts/make_node_docs.py --check`` compares the
rest of the tables with the live schema); a non-empty "Typical mistakes" section; and relative links
that resolve, because the page is read both on disk and as served under ``/extensions/<pack>/docs/``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "web" / "docs"
SNAPSHOT = REPO / "tests" / "host" / "schema_snapshot.json"
#: The limits scripts/make_node_doc_images.py writes to (a test below reads them from the script).
MAX_WIDTH = 480
MAX_BYTES = 60_000

_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*([^)\s]+)\s*\)")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(\s*([^)\s]+)\s*\)")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
_EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:|//)", re.I)


def snapshot() -> dict[str, dict]:
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


def registered() -> list[str]:
    return sorted(snapshot())


def page(node_id: str) -> str:
    path = DOCS / f"{node_id}.md"
    assert path.is_file(), f"{node_id} is registered but has no node docs page {path.relative_to(REPO)}"
    return path.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section (up to the next ``## `` heading); fails if absent."""
    m = re.search(rf"^## {re.escape(title)}[ \t]*\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"no '## {title}' section"
    return m.group(1)


def generated_rows(text: str, kind: str) -> list[list[str]]:
    """The cells of each data row of the generated ``kind`` ("inputs"/"outputs") table."""
    m = re.search(rf"<!-- {kind} table: generated.*?-->\n(.*?)<!-- end of {kind} table -->", text, re.S)
    assert m, f"no generated {kind} table (scripts/make_node_docs.py markers)"
    rows = []
    for line in m.group(1).splitlines():
        if not line.startswith("|") or line.startswith("|---") or line.startswith("| input |") \
                or line.startswith("| output |"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append(cells)
    return rows


def png_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from a PNG's IHDR chunk (no imaging library needed)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code, where a link is a link."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
            continue
        if not fenced:
            kept.append(_CODE_SPAN.sub("", line))
    return "\n".join(kept)


def test_every_registered_node_has_a_page_and_no_page_is_left_over():
    nodes = set(registered())
    assert len(nodes) >= 13, sorted(nodes)
    pages = {p.stem for p in DOCS.glob("*.md")}
    assert sorted(nodes - pages) == [], "registered nodes without a page in web/docs/"
    assert sorted(pages - nodes) == [], "pages in web/docs/ for nodes the pack does not register"
    # per-locale pages (docs/<NodeId>/<locale>.md) may only exist for registered nodes too
    folders = {p.name for p in DOCS.iterdir() if p.is_dir() and p.name != "images"}
    assert sorted(folders - nodes) == [], "locale folders in web/docs/ for unregistered nodes"


def test_limits_match_the_image_script():
    """The limits checked here are the ones the script that draws the pictures enforces."""
    source = (REPO / "scripts" / "make_node_doc_images.py").read_text(encoding="utf-8")
    assert re.search(rf"^MAX_WIDTH = {MAX_WIDTH}\b", source, re.M)
    assert re.search(rf"^MAX_BYTES = {MAX_BYTES:_}\b", source, re.M)


@pytest.mark.parametrize("node_id", registered())
def test_page_has_title_and_one_small_described_image(node_id: str):
    text = page(node_id)
    first = text.splitlines()[0]
    assert first.startswith("# ") and f"`{node_id}`" in first, f"title must name {node_id}: {first!r}"
    images = _IMAGE.findall(_prose(text))
    assert len(images) == 1, f"expected one picture, found {images}"
    alt, target = images[0]
    display = snapshot()[node_id]["display_name"]
    assert len(alt.split()) >= 6 and alt.strip() != display, (
        f"the alt text must say what the picture shows, not only the node's name: {alt!r}")
    assert target == f"images/{node_id}.png", target
    path = DOCS / target
    assert path.is_file(), f"{path.relative_to(REPO)} is missing (run scripts/make_node_doc_images.py)"
    size = path.stat().st_size
    width, height = png_size(path)
    assert size <= MAX_BYTES, f"{path.name}: {size} bytes > {MAX_BYTES}"
    assert 0 < width <= MAX_WIDTH and height > 0, f"{path.name}: {width}x{height}"


@pytest.mark.parametrize("node_id", registered())
def test_page_tables_follow_the_schema(node_id: str):
    text = page(node_id)
    spec = snapshot()[node_id]
    section(text, "Inputs")
    names = [re.sub(r"^`|`$", "", cells[0]) for cells in generated_rows(text, "inputs")]
    assert names == [i["name"] for i in spec["inputs"]], "inputs table vs the schema snapshot, in order"
    section(text, "Outputs")
    outputs = generated_rows(text, "outputs")
    assert [cells[1] for cells in outputs] == list(spec["outputs"]), "outputs table types vs the snapshot"
    if not spec["outputs"]:
        assert "no outputs" in section(text, "Outputs")


@pytest.mark.parametrize("node_id", registered())
def test_page_lists_typical_mistakes_with_messages(node_id: str):
    body = section(page(node_id), "Typical mistakes")
    items = [ln for ln in body.splitlines() if ln.startswith("- ")]
    assert items, "the 'Typical mistakes' section lists nothing"
    # each mistake quotes the message (or logged warning) the pack gives, in italics on its second line
    quoted = re.findall(r"^- .*\n  \*[^*\n]+\*$", body, re.M)
    assert len(quoted) == len(items), "each mistake must quote the message the pack gives for it"


@pytest.mark.parametrize("node_id", registered())
def test_page_links_resolve(node_id: str):
    path = DOCS / f"{node_id}.md"
    prose = _prose(page(node_id))
    targets = _LINK.findall(prose) + [t for _, t in _IMAGE.findall(prose)]
    bad = []
    for target in targets:
        if _EXTERNAL.match(target):
            continue
        file_part = unquote(target.split("#", 1)[0])
        if not file_part:
            continue
        resolved = (path.parent / file_part).resolve()
        # a link must also work where the page is served: inside web/docs/
        if not resolved.exists() or DOCS.resolve() not in resolved.parents:
            bad.append(target)
    assert not bad, f"links that do not resolve inside web/docs/: {bad}"


def test_no_unused_pictures():
    used = {f"{n}.png" for n in registered()}
    present = {p.name for p in (DOCS / "images").glob("*")}
    assert sorted(present - used) == [], "pictures in web/docs/images/ that no page shows"
