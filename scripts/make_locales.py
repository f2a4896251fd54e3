"""Write the English frontend translations (``locales/en/*.json``) from the live schema.

The ComfyUI server serves every custom-node pack's ``locales/<lang>/main.json`` (merged with the
``nodeDefs.json`` next to it under the key ``nodeDefs``) at ``/i18n``, and the frontend looks up
``nodeDefs.<NodeId>.display_name``, ``.description``, ``.inputs.<input>.name``/``.tooltip``,
``.outputs.<index>.name``/``.tooltip`` and each category segment under ``nodeCategories``. The
English files are not written by hand: they are the texts the schema itself reports
(``GET_NODE_INFO_V1``), so they cannot drift from the code. Other languages are written by people
(or, where ``locales/README.md`` says so, by a machine) and must carry exactly the same keys.

    .venv/bin/python scripts/make_locales.py          # rewrite locales/en/ from the schema
    .venv/bin/python scripts/make_locales.py --check  # exit 1 if locales/en/ is stale (no writes)

Either way it lists the keys each other language lacks or has beyond English. It boots ComfyUI in
this process (CPU, temporary folders) and loads the pack the way the host tier does. Everything but
:func:`live_infos` is plain Python, so the tests can call it on the schema they already have.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCALES = REPO / "locales"
#: The files of one language that this pack ships (ComfyUI also reads settings.json, commands.json).
FILES = ("nodeDefs.json", "main.json")


def i18n_key(name: str) -> str:
    """The frontend's key for an identifier: dots would split the key path, so they become ``_``."""
    return name.replace(".", "_")


def _inputs(info: dict) -> dict[str, dict]:
    """Every input in the node's display order, with the label and tooltip the schema gives it."""
    out: dict[str, dict] = {}
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in info["input_order"].get(section, []):
            opts = spec[name][1] if len(spec[name]) > 1 else {}
            entry = {"name": opts.get("display_name") or name}
            if opts.get("tooltip"):
                entry["tooltip"] = opts["tooltip"]
            out[i18n_key(name)] = entry
    return out


def _outputs(info: dict) -> dict[str, dict]:
    """Outputs are keyed by their index (as strings, JSON's only key type), not by name."""
    tips = info.get("output_tooltips") or [None] * len(info["output"])
    out: dict[str, dict] = {}
    for index, (name, tip) in enumerate(zip(info["output_name"], tips, strict=True)):
        entry = {"name": name}
        if tip:
            entry["tooltip"] = tip
        out[str(index)] = entry
    return out


def node_texts(info: dict) -> dict:
    """One node's ``nodeDefs.json`` entry: the English texts of its ``GET_NODE_INFO_V1``."""
    entry: dict = {"display_name": info["display_name"]}
    if info.get("description"):
        entry["description"] = info["description"]
    entry["inputs"] = _inputs(info)
    entry["outputs"] = _outputs(info)
    return entry


def english(infos: dict[str, dict]) -> dict[str, dict]:
    """``{file name: content}`` of ``locales/en/`` for these nodes (``{node id: info}``, in order)."""
    node_defs = {i18n_key(nid): node_texts(info) for nid, info in infos.items()}
    segments: dict[str, str] = {}
    for info in infos.values():
        for segment in info["category"].split("/"):
            segments.setdefault(segment, segment)
    return {"nodeDefs.json": node_defs, "main.json": {"nodeCategories": segments}}


def dump(content: dict) -> str:
    """The files' on-disk form: readable, non-ASCII kept as is (translators read these files)."""
    return json.dumps(content, indent=2, ensure_ascii=False) + "\n"


def key_paths(tree: object, prefix: str = "") -> set[str]:
    """Every leaf of a translation tree as a dotted path (``nodeDefs.X.inputs.y.tooltip``)."""
    if not isinstance(tree, dict):
        return {prefix}
    paths: set[str] = set()
    for key, value in tree.items():
        paths |= key_paths(value, f"{prefix}.{key}" if prefix else key)
    return paths


def language_keys(lang_dir: Path) -> set[str]:
    """The leaves of one language folder, each file's keys under the file's stem."""
    keys: set[str] = set()
    for name in FILES:
        path = lang_dir / name
        if path.is_file():
            keys |= key_paths(json.loads(path.read_text(encoding="utf-8")), Path(name).stem)
    return keys


def key_differences(english_files: dict[str, dict], lang_dir: Path) -> tuple[set[str], set[str]]:
    """``(missing, stale)`` keys of a language folder against the English files."""
    want: set[str] = set()
    for name, content in english_files.items():
        want |= key_paths(content, Path(name).stem)
    have = language_keys(lang_dir)
    return want - have, have - want


_GENERATED_ID = re.compile(r"_\d+_.+_")


def node_info(cls) -> dict:
    """``cls.GET_NODE_INFO_V1()`` with every output named by its schema name, on every host.

    An output declared without a display name is reported by ComfyUI 0.3.75 under its type
    (``LATENT``, ``DM_REFERENCE``) and by 0.28.2 under its id (``inverted_noise``, ``reference``). The
    generated texts must not depend on the host, and the id says what the output is, so the display
    name, else the id, else the type is used (what 0.28.2 shows without translations).
    """
    info = dict(cls.GET_NODE_INFO_V1())
    outputs = cls.GET_SCHEMA().outputs or []
    # an output declared without an id gets a generated one (``_0_LATENT_``): its type names it then
    info["output_name"] = [o.display_name or (o.id if o.id and not _GENERATED_ID.fullmatch(o.id) else None)
                           or o.io_type for o in outputs]
    return info


def live_infos() -> dict[str, dict]:
    """``{node_id: GET_NODE_INFO_V1()}`` of every pack node in menu order, from an in-process host."""
    sys.path.insert(0, str(REPO / "tests"))
    from comfy_env import boot_in_process

    base = Path(tempfile.mkdtemp(prefix="dm-locales-"))
    _, _, pack_module = boot_in_process(base, cpu=True, extras=False)
    import importlib

    extension = importlib.import_module(pack_module + ".nodes.extension")
    infos = {}
    for cls in extension.node_classes():
        info = node_info(cls)
        infos[info["name"]] = info
    return infos


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report a stale locales/en/, write nothing")
    args = parser.parse_args()
    files = english(live_infos())
    stale = []
    for name, content in files.items():
        path = LOCALES / "en" / name
        text = dump(content)
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(path.relative_to(REPO))
            if not args.check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    print(f"{len(stale)} English file(s) {'stale' if args.check else 'written'}: "
          f"{', '.join(map(str, stale)) or 'none'}")
    incomplete = False
    for lang_dir in sorted(p for p in LOCALES.iterdir() if p.is_dir() and p.name != "en"):
        missing, extra = key_differences(files, lang_dir)
        for label, keys in (("missing", missing), ("not in English", extra)):
            if keys:
                incomplete = True
                print(f"{lang_dir.name}: {len(keys)} key(s) {label}:\n  " + "\n  ".join(sorted(keys)))
    return 1 if args.check and (stale or incomplete) else 0


if __name__ == "__main__":
    raise SystemExit(main())
