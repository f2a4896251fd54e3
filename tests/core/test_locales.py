"""The frontend translations (``locales/<lang>/``) cover exactly the registered nodes, in every language.

ComfyUI's frontend looks a node's texts up under ``nodeDefs.<id>.display_name``, ``.description``,
``.inputs.<input>.name``/``.tooltip`` and ``.outputs.<index>.name``/``.tooltip``, and each category
segment under ``nodeCategories``. A key it does not find silently falls back to the schema's English,
so a renamed input or a new node would leave a half-translated UI that no other test notices, and a
key for an input that no longer exists is dead text a translator keeps maintaining. So, for every
language: the files are valid UTF-8 JSON; ``nodeDefs.json`` names exactly the node ids, inputs and
number of outputs of ``tests/host/schema_snapshot.json`` (which the host tier keeps equal to the live
schema, so this core test needs no ComfyUI); every text is non-empty; every other language has exactly
English's key tree, tooltips and key order included (``scripts/make_locales.py`` writes English from
the schema); Chinese display names and descriptions are Chinese (an English copy has the right keys
but translates nothing); identifiers users type or see elsewhere (``sks``, ``ddim_uniform``, node ids,
type names) survive translation; ``main.json`` names the ``DreamMatcher`` category.

Each check is a function from loaded dicts to a list of problems, so the tests below also feed it a
deliberately broken copy and require it to complain: a check that cannot fail guards nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
LOCALES = REPO / "locales"
SNAPSHOT = REPO / "tests" / "host" / "schema_snapshot.json"
#: Languages the pack ships; each must exist. Any other folder under locales/ is checked as well.
LANGS = ("en", "zh")
#: Languages whose display names and descriptions must be written in CJK characters.
CJK_LANGS = ("zh",)
CJK = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
ENTRY_KEYS = {"display_name", "description", "inputs", "outputs"}
SLOT_KEYS = {"name", "tooltip"}
#: Input labels are shown on every slot and widget: a sentence there means a tooltip went astray.
MAX_INPUT_NAME = 32
#: Identifiers a user types or meets elsewhere (prompts, combo values, types, other docs); a translation
#: keeps each one its English text contains. Node ids (``DM_...``) are kept too.
PROTECTED = ("sks", "embedding:my_cat", "ddim_uniform", "cfg", "LoRA", "AMA", "DDIM", "PCA", "UNet", "CLIP",
             "LATENT", "MODEL", "IMAGE", "MASK", "SAMPLER", "UNCOND", "λc", "λg", "x_T", "SamplerCustom",
             "SamplerCustomAdvanced", "safetensors", "output/dreammatcher", "input/dreammatcher")
_PROTECTED = re.compile(r"(?<![\w:/])(" + "|".join(re.escape(p) for p in PROTECTED)
                        + r"|DM_[A-Za-z]+)(?![\w])")


def _make_locales() -> ModuleType:
    """``scripts/make_locales.py`` (the generator's key rules), loaded by path: scripts/ is no package."""
    spec = importlib.util.spec_from_file_location("dm_make_locales", REPO / "scripts" / "make_locales.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_locales = _make_locales()


def load_language(lang_dir: Path) -> dict[str, dict]:
    """``{file name: content}`` of one language folder; raises if a file is missing or not UTF-8 JSON."""
    files = {}
    for name in make_locales.FILES:
        content = json.loads((lang_dir / name).read_bytes().decode("utf-8"))
        if not isinstance(content, dict):
            raise ValueError(f"{lang_dir / name}: a JSON object expected, got {type(content).__name__}")
        files[name] = content
    return files


def load_snapshot() -> dict[str, dict]:
    """The registered schema as the host tier last locked it."""
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


def schema_problems(node_defs: dict, snapshot: dict) -> list[str]:
    """Node ids, input keys and output indices of ``node_defs`` that differ from the schema snapshot."""
    key = make_locales.i18n_key
    problems = []
    want_nodes = {key(nid): nid for nid in snapshot}
    for nid in sorted(set(want_nodes) - set(node_defs)):
        problems.append(f"missing node {nid}")
    for nid in sorted(set(node_defs) - set(want_nodes)):
        problems.append(f"stale node {nid} (not in the schema)")
    for nid, contract in snapshot.items():
        entry = node_defs.get(key(nid))
        if not isinstance(entry, dict):
            continue
        if set(entry) - ENTRY_KEYS:
            problems.append(f"{nid}: unknown keys {sorted(set(entry) - ENTRY_KEYS)}")
        inputs, outputs = entry.get("inputs"), entry.get("outputs")
        if not isinstance(inputs, dict) or not isinstance(outputs, dict):
            problems.append(f"{nid}: 'inputs' and 'outputs' must be objects")
            continue
        want_inputs = {key(i["name"]) for i in contract["inputs"]}
        for name in sorted(want_inputs - set(inputs)):
            problems.append(f"{nid}: missing input {name}")
        for name in sorted(set(inputs) - want_inputs):
            problems.append(f"{nid}: stale input {name}")
        want_outputs = {str(i) for i in range(len(contract["outputs"]))}
        if set(outputs) != want_outputs:
            problems.append(f"{nid}: outputs {sorted(outputs)}, the schema has {len(want_outputs)}")
    return problems


def _text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def text_problems(node_defs: dict) -> list[str]:
    """Empty or non-string texts, and input labels that are sentences rather than labels."""
    problems = []
    for nid, entry in node_defs.items():
        if not isinstance(entry, dict):
            problems.append(f"{nid}: not an object")
            continue
        for field in ("display_name", "description"):
            if not _text(entry.get(field)):
                problems.append(f"{nid}: empty or missing {field}")
        for kind in ("inputs", "outputs"):
            for slot, texts in (entry.get(kind) or {}).items():
                if not isinstance(texts, dict) or set(texts) - SLOT_KEYS:
                    problems.append(f"{nid}.{kind}.{slot}: only {sorted(SLOT_KEYS)} allowed")
                    continue
                if not _text(texts.get("name")):
                    problems.append(f"{nid}.{kind}.{slot}: empty or missing name")
                if "tooltip" in texts and not _text(texts["tooltip"]):
                    problems.append(f"{nid}.{kind}.{slot}: empty tooltip")
                if kind == "inputs" and _text(texts.get("name")) and len(texts["name"]) > MAX_INPUT_NAME:
                    problems.append(f"{nid}.inputs.{slot}: name is no short label: {texts['name']!r}")
    return problems


def _ordered_keys(tree: object, prefix: str = "") -> list[str]:
    """Every key path of a tree in document order (order matters to the translators who diff them)."""
    if not isinstance(tree, dict):
        return []
    paths = []
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        paths.append(path)
        paths.extend(_ordered_keys(value, path))
    return paths


def tree_problems(english: dict, other: dict) -> list[str]:
    """Keys ``other`` lacks or has beyond ``english`` (leaves included), then a differing key order."""
    want, have = make_locales.key_paths(english), make_locales.key_paths(other)
    problems = [f"missing {k}" for k in sorted(want - have)]
    problems += [f"not in English: {k}" for k in sorted(have - want)]
    if not problems and _ordered_keys(english) != _ordered_keys(other):
        problems.append("same keys as English but in another order")
    return problems


def cjk_problems(node_defs: dict) -> list[str]:
    """Display names and descriptions without a single CJK character (left in English)."""
    return [f"{nid}.{field}: no Chinese in {entry.get(field)!r}"
            for nid, entry in node_defs.items() for field in ("display_name", "description")
            if not CJK.search(str(entry.get(field, "")))]


def _leaves(tree: object, prefix: str = "") -> dict[str, str]:
    if not isinstance(tree, dict):
        return {prefix: tree if isinstance(tree, str) else ""}
    out: dict[str, str] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


def identifier_problems(english: dict, other: dict) -> list[str]:
    """Identifiers (``PROTECTED``, node ids) in an English text that its translation dropped or changed."""
    theirs = _leaves(other)
    problems = []
    for path, text in _leaves(english).items():
        for ident in sorted(set(_PROTECTED.findall(text))):
            if path in theirs and ident not in theirs[path]:
                problems.append(f"{path}: {ident!r} is not kept in {theirs[path]!r}")
    return problems


def category_problems(main: dict, snapshot: dict) -> list[str]:
    """Category segments of the schema without a non-empty entry under ``nodeCategories``."""
    categories = main.get("nodeCategories")
    if not isinstance(categories, dict):
        return ["main.json has no nodeCategories object"]
    segments = {"DreamMatcher"} | {s for c in snapshot.values() for s in c["category"].split("/")}
    return [f"category {s!r} missing or empty" for s in sorted(segments) if not _text(categories.get(s))]


def _lang_dirs() -> list[str]:
    """The shipped languages plus any other folder a contributor added."""
    found = sorted(p.name for p in LOCALES.iterdir() if p.is_dir()) if LOCALES.is_dir() else []
    return list(LANGS) + [name for name in found if name not in LANGS]


@pytest.fixture(scope="module")
def snapshot() -> dict[str, dict]:
    return load_snapshot()


@pytest.fixture(scope="module")
def english() -> dict[str, dict]:
    return load_language(LOCALES / "en")


# --- the shipped files -----------------------------------------------------------------------------


@pytest.mark.parametrize("lang", _lang_dirs())
def test_language_files_are_utf8_json_with_two_space_indent(lang: str):
    """Valid JSON, and in the generator's own format, so regenerating gives no whitespace-only diffs."""
    for name, content in load_language(LOCALES / lang).items():
        text = (LOCALES / lang / name).read_text(encoding="utf-8")
        assert text == make_locales.dump(content), f"{lang}/{name} is not in make_locales.dump's format"


@pytest.mark.parametrize("lang", _lang_dirs())
def test_node_defs_cover_exactly_the_registered_schema(lang: str, snapshot: dict):
    problems = schema_problems(load_language(LOCALES / lang)["nodeDefs.json"], snapshot)
    assert not problems, f"locales/{lang}/nodeDefs.json vs the schema snapshot:\n" + "\n".join(problems)


@pytest.mark.parametrize("lang", _lang_dirs())
def test_every_text_is_present_and_every_input_name_is_a_label(lang: str):
    problems = text_problems(load_language(LOCALES / lang)["nodeDefs.json"])
    assert not problems, f"locales/{lang}/nodeDefs.json:\n" + "\n".join(problems)


@pytest.mark.parametrize("lang", _lang_dirs())
def test_main_json_names_the_categories(lang: str, snapshot: dict):
    problems = category_problems(load_language(LOCALES / lang)["main.json"], snapshot)
    assert not problems, f"locales/{lang}/main.json:\n" + "\n".join(problems)


@pytest.mark.parametrize("lang", [lang for lang in _lang_dirs() if lang != "en"])
def test_translation_has_exactly_the_english_key_tree(lang: str, english: dict):
    other = load_language(LOCALES / lang)
    for name in make_locales.FILES:
        problems = tree_problems(english[name], other[name])
        assert not problems, f"locales/{lang}/{name} vs locales/en/{name}:\n" + "\n".join(problems)
    # the generator's own comparison agrees (it is what `make_locales.py` reports to translators)
    assert make_locales.key_differences(english, LOCALES / lang) == (set(), set())


@pytest.mark.parametrize("lang", [lang for lang in _lang_dirs() if lang != "en"])
def test_translation_keeps_the_identifiers(lang: str, english: dict):
    problems = identifier_problems(english["nodeDefs.json"], load_language(LOCALES / lang)["nodeDefs.json"])
    assert not problems, f"locales/{lang}/nodeDefs.json:\n" + "\n".join(problems)


@pytest.mark.parametrize("lang", CJK_LANGS)
def test_chinese_names_and_descriptions_are_chinese(lang: str):
    problems = cjk_problems(load_language(LOCALES / lang)["nodeDefs.json"])
    assert not problems, "\n".join(problems)


def test_english_display_names_are_the_schemas(english: dict, snapshot: dict):
    """English is the schema's own text: its display names are the snapshot's (a stale en/ shows here)."""
    node_defs = english["nodeDefs.json"]
    stale = {nid: (node_defs.get(make_locales.i18n_key(nid), {}).get("display_name"), c["display_name"])
             for nid, c in snapshot.items()
             if node_defs.get(make_locales.i18n_key(nid), {}).get("display_name") != c["display_name"]}
    assert not stale, f"(locales/en, snapshot) display names differ; run scripts/make_locales.py: {stale}"


def test_make_locales_imports_without_comfyui():
    """This tier imports the generator; its module level must stay free of ComfyUI and torch."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('m', {str(REPO / 'scripts/make_locales.py')!r})\n"
            "spec.loader.exec_module(importlib.util.module_from_spec(spec))\n"
            "heavy = ('comfy', 'comfy_api', 'folder_paths', 'nodes', 'server', 'torch', 'comfy_env')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


# --- the checks reject broken files ------------------------------------------------------------------


def _first(mapping: dict) -> str:
    return next(iter(mapping))


def test_checks_reject_a_stale_or_incomplete_node_defs(english: dict, snapshot: dict):
    good = english["nodeDefs.json"]
    assert schema_problems(good, snapshot) == []
    nid = _first(good)

    missing_node = copy.deepcopy(good)
    del missing_node[nid]
    assert schema_problems(missing_node, snapshot) == [f"missing node {nid}"]

    stale_node = copy.deepcopy(good)
    stale_node["DM_NoSuchNode"] = copy.deepcopy(good[nid])
    assert schema_problems(stale_node, snapshot) == ["stale node DM_NoSuchNode (not in the schema)"]

    renamed = copy.deepcopy(good)
    inputs = renamed[nid]["inputs"]
    old = _first(inputs)
    inputs["renamed_input"] = inputs.pop(old)
    assert set(schema_problems(renamed, snapshot)) == {f"{nid}: missing input {old}",
                                                      f"{nid}: stale input renamed_input"}

    extra_output = copy.deepcopy(good)
    outputs = extra_output[nid]["outputs"]
    outputs[str(len(outputs))] = {"name": "IMAGE"}
    assert len(schema_problems(extra_output, snapshot)) == 1


def test_checks_reject_empty_texts_and_sentence_labels(english: dict):
    good = english["nodeDefs.json"]
    assert text_problems(good) == []
    nid = _first(good)
    for field in ("display_name", "description"):
        broken = copy.deepcopy(good)
        broken[nid][field] = "  "
        assert text_problems(broken) == [f"{nid}: empty or missing {field}"]
    broken = copy.deepcopy(good)
    slot = _first(broken[nid]["inputs"])
    broken[nid]["inputs"][slot]["name"] = ""
    assert text_problems(broken) == [f"{nid}.inputs.{slot}: empty or missing name"]
    broken[nid]["inputs"][slot]["name"] = "x" * (MAX_INPUT_NAME + 1)
    assert len(text_problems(broken)) == 1


def test_checks_reject_a_different_key_tree_or_order(english: dict):
    good = english["nodeDefs.json"]
    assert tree_problems(good, copy.deepcopy(good)) == []
    nid = _first(good)
    slot = next(s for s, t in good[nid]["inputs"].items() if "tooltip" in t)

    no_tooltip = copy.deepcopy(good)
    del no_tooltip[nid]["inputs"][slot]["tooltip"]
    assert tree_problems(good, no_tooltip) == [f"missing {nid}.inputs.{slot}.tooltip"]

    extra = copy.deepcopy(good)
    extra[nid]["outputs"]["0"]["extra"] = "x"
    assert tree_problems(good, extra) == [f"not in English: {nid}.outputs.0.extra"]

    reordered = dict(reversed(list(copy.deepcopy(good).items())))
    assert tree_problems(good, reordered) == ["same keys as English but in another order"]


def test_checks_reject_an_english_copy_as_chinese(english: dict):
    good_zh = load_language(LOCALES / "zh")["nodeDefs.json"]
    assert cjk_problems(good_zh) == []
    # an untranslated copy has the right keys, so only this check catches it
    assert tree_problems(english["nodeDefs.json"], good_zh) == []
    assert len(cjk_problems(english["nodeDefs.json"])) == 2 * len(english["nodeDefs.json"])


def test_checks_reject_a_dropped_identifier(english: dict):
    en_defs = english["nodeDefs.json"]
    zh_defs = copy.deepcopy(load_language(LOCALES / "zh")["nodeDefs.json"])
    assert identifier_problems(en_defs, zh_defs) == []
    tip = zh_defs["DM_MatchSettings"]["inputs"]["subject"]["tooltip"]
    assert "embedding:my_cat" in tip
    changed = tip.replace("embedding:my_cat", "嵌入:我的猫")
    zh_defs["DM_MatchSettings"]["inputs"]["subject"]["tooltip"] = changed
    assert identifier_problems(en_defs, zh_defs) == [
        f"DM_MatchSettings.inputs.subject.tooltip: 'embedding:my_cat' is not kept in {changed!r}"]


def test_checks_reject_a_missing_category(snapshot: dict):
    assert category_problems({"nodeCategories": {"DreamMatcher": "DreamMatcher"}}, snapshot) == []
    assert category_problems({"nodeCategories": {}}, snapshot) == ["category 'DreamMatcher' missing or empty"]
    assert category_problems({}, snapshot) == ["main.json has no nodeCategories object"]


def test_a_broken_language_folder_is_rejected(tmp_path: Path, english: dict, snapshot: dict):
    """A copy of zh/ on disk: truncated JSON does not load, a removed node and tooltip are reported."""
    broken = tmp_path / "zh"
    shutil.copytree(LOCALES / "zh", broken)
    node_defs = json.loads((broken / "nodeDefs.json").read_text(encoding="utf-8"))
    nid = _first(node_defs)
    del node_defs[nid]
    slot = next(s for s, t in node_defs[_first(node_defs)]["inputs"].items() if "tooltip" in t)
    del node_defs[_first(node_defs)]["inputs"][slot]["tooltip"]
    (broken / "nodeDefs.json").write_text(make_locales.dump(node_defs), encoding="utf-8")
    loaded = load_language(broken)
    assert schema_problems(loaded["nodeDefs.json"], snapshot) == [f"missing node {nid}"]
    missing, extra = make_locales.key_differences(english, broken)
    assert extra == set() and f"nodeDefs.{_first(node_defs)}.inputs.{slot}.tooltip" in missing
    assert any(k.startswith(f"nodeDefs.{nid}.") for k in missing)

    (broken / "main.json").write_text('{"nodeCategories": {"DreamMatcher": ', encoding="utf-8")
    with pytest.raises(json.JSONDecodeError):
        load_language(broken)
    (broken / "main.json").write_bytes('{"nodeCategories": {"DreamMatcher": "梦"}}'.encode("gbk"))
    with pytest.raises(UnicodeDecodeError):
        load_language(broken)
    (broken / "main.json").unlink()
    with pytest.raises(FileNotFoundError):
        load_language(broken)
