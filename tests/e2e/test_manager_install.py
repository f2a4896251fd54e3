"""e2e tier: the pack works when installed the way ComfyUI-Manager installs it.

The other e2e tests symlink the checkout into ``custom_nodes``. Manager does something else:
it ``git clone``s the repository into ``custom_nodes/<repository name>`` (here
``comfyui-dreammatcher``, not the ``dreammatcher`` the README's manual clone uses), then runs one
``pip install <line>`` per non-comment line of the clone's ``requirements.txt`` with ComfyUI's
own Python, then the user restarts ComfyUI. That path can break on its own: a file the package
needs but git does not ship, a folder name with a hyphen in the module name, a web folder
served under another URL, or a requirement that pulls a new torch into the user's environment.

This module repeats the three steps in a temporary ``--base-directory``:

1. **Clone.** ``git clone file://<checkout>`` (the pack protocol, as from a remote; nothing is
   shared with the checkout), then the working tree is laid over the clone: every file
   ``git ls-files -co --exclude-standard`` lists (tracked, plus untracked ones that are not
   ignored) is copied, and tracked files deleted in the working tree are deleted. So the test
   covers uncommitted work exactly as it would be committed, while ignored build outputs
   (``.venv``, ``.host``, caches) stay out, as they would from a real clone.
2. **Requirements.** Each line is installed as Manager does it (the whole stripped line as one
   argument to ``pip install``), with the server's Python and ``--no-index``, with pip's
   configuration files and ``PIP_*`` variables (such as a ``PIP_FIND_LINKS`` wheel folder) left
   out, and with torch, torchvision and torchaudio constrained to their installed versions. The
   claim tested: every requirement is already satisfied by the host environment, so Manager's
   install downloads nothing and changes nothing. A line that would need a download makes pip
   fail, and the test fails naming the line; the installed distributions must be identical
   before and after.
3. **Start.** The real server starts with the clone in ``custom_nodes``; every node ID the clone
   declares must be in ``/object_info`` (from the clone's module), the log must show no import
   error of the clone's folder, and the web extension and the icon must be served from
   ``/extensions/comfyui-dreammatcher/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from comfy_env import REPO, comfy_root
from server_fixture import ComfyServer, pack_node_ids

#: The folder ComfyUI-Manager's clone gives: the repository's name.
MANAGER_FOLDER = "comfyui-dreammatcher"
#: Never changed by a pack's requirements (Manager itself skips lines naming them).
TORCH_DISTS = ("torch", "torchvision", "torchaudio")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PIP_TIMEOUT_S = 300


@dataclass(frozen=True)
class PipRun:
    line: str  # the requirements.txt line, as Manager passes it
    returncode: int
    output: str


@dataclass(frozen=True)
class ManagerInstall:
    clone: Path
    pip_runs: tuple[PipRun, ...]
    installed_before: dict[str, str]  # distribution name -> version
    installed_after: dict[str, str]


def _git(*args: str, cwd: Path) -> str:
    """``git`` with no user or system configuration, so the host's settings cannot matter."""
    env = dict(os.environ, GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_TERMINAL_PROMPT="0")
    res = subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def clone_like_manager(dest: Path, repo: Path = REPO) -> list[str]:
    """``git clone`` ``repo`` into ``dest``, then lay its working tree over the clone.

    Returns the paths (relative) that the overlay copied or removed.
    """
    _git("clone", "--quiet", f"file://{repo}", str(dest), cwd=dest.parent)
    listed = _git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo)
    deleted = set(_git("ls-files", "-z", "--deleted", cwd=repo).split("\0")) - {""}
    touched = []
    for rel in sorted(set(listed.split("\0")) - {""}):
        src, dst = repo / rel, dest / rel
        if rel in deleted or not (src.exists() or src.is_symlink()):
            if dst.exists() or dst.is_symlink():
                dst.unlink()
                touched.append(rel)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or (dst.exists() and not dst.is_dir()):
            dst.unlink()
        shutil.copy2(src, dst, follow_symlinks=False)
        touched.append(rel)
    return touched


def requirement_lines(path: Path) -> list[str]:
    """The lines Manager installs: stripped, neither empty nor a ``#`` comment."""
    lines = (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _dist_name(line: str) -> str:
    """The normalised distribution name a requirement line starts with ("" for an option line)."""
    m = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", line)
    return re.sub(r"[-_.]+", "-", m.group(0)).lower() if m else ""


def _pip_env(tmp: Path) -> dict[str, str]:
    """The environment for pip: no config files, no ``PIP_*`` from outside, no prompts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_CACHE_DIR=str(tmp / "pip-cache"), PYTHONNOUSERSITE="1")
    return env


def installed_distributions(python: str, tmp: Path) -> dict[str, str]:
    """``{normalised name: version}`` of every distribution ``python`` sees (``pip list``)."""
    res = subprocess.run([python, "-m", "pip", "list", "--format=json"], env=_pip_env(tmp),
                         capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"pip list failed: {res.stderr.strip()}")
    return {_dist_name(d["name"]): d["version"] for d in json.loads(res.stdout)}


def pip_install_offline(python: str, line: str, tmp: Path, installed: dict[str, str],
                        cwd: Path | None = None) -> PipRun:
    """``pip install <line> --no-index`` as Manager runs it (in the pack's folder), torch pinned."""
    constraints = tmp / "torch-constraints.txt"
    constraints.write_text("".join(f"{d}=={installed[d]}\n" for d in TORCH_DISTS if d in installed))
    cmd = [python, "-m", "pip", "install", line, "--no-index", "--constraint", str(constraints)]
    res = subprocess.run(cmd, env=_pip_env(tmp), capture_output=True, text=True, timeout=PIP_TIMEOUT_S,
                         stdin=subprocess.DEVNULL, cwd=cwd)
    return PipRun(line, res.returncode, res.stdout + res.stderr)


def assert_satisfied_offline(run: PipRun) -> None:
    """The requirement was met by what is installed: pip succeeded and installed nothing."""
    if run.returncode != 0:
        pytest.fail(f"requirements.txt line {run.line!r} is not satisfied by the host environment: "
                    f"ComfyUI-Manager would have to download it (pip --no-index exited "
                    f"{run.returncode}):\n{run.output[-3000:]}")
    if "Successfully installed" in run.output or "Requirement already satisfied" not in run.output:
        pytest.fail(f"pip install {run.line!r} did not just find it installed:\n{run.output[-3000:]}")


@pytest.fixture(scope="module")
def manager_install(tmp_path_factory) -> ManagerInstall:
    """The clone in a fresh base directory, and what pip did with each of its requirement lines."""
    if not (REPO / ".git").exists():
        pytest.skip(f"{REPO} is not a git checkout: there is nothing to clone")
    base = tmp_path_factory.mktemp("manager_install")
    (base / "custom_nodes").mkdir()
    clone = base / "custom_nodes" / MANAGER_FOLDER
    overlaid = clone_like_manager(clone)
    lines = requirement_lines(clone / "requirements.txt")
    python = sys.executable  # the server's Python (ComfyServer's default)
    pip_tmp = tmp_path_factory.mktemp("pip")
    before = installed_distributions(python, pip_tmp)
    runs = tuple(pip_install_offline(python, ln, pip_tmp, before, clone) for ln in lines)
    after = installed_distributions(python, pip_tmp)
    print(f"\n[manager] cloned into {clone} ({len(overlaid)} working-tree files laid over); "
          f"pip --no-index: " + ", ".join(f"{r.line} -> {r.returncode}" for r in runs))
    return ManagerInstall(clone, runs, before, after)


@pytest.fixture(scope="module")
def manager_server(manager_install: ManagerInstall) -> Iterator[ComfyServer]:
    """The real server with the clone (not a symlink) as its pack folder."""
    base = manager_install.clone.parents[1]
    server = ComfyServer(comfy_root(), base, pack_folder=MANAGER_FOLDER)
    assert server.pack_link == manager_install.clone
    try:
        server.start()
        assert not server.pack_link.is_symlink()  # prepare() kept the clone
        print(f"\n[manager] {server.url} up in {server.startup_s:.1f} s; log: {server.log_path}")
        yield server
    finally:
        server.stop()


def _get(server: ComfyServer, path: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(server.url + path, timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read()


def test_requirements_are_satisfied_without_downloading(manager_install: ManagerInstall):
    """Manager's per-line ``pip install`` finds every requirement installed; nothing changes."""
    lines = [r.line for r in manager_install.pip_runs]
    assert lines, "requirements.txt lists nothing: the pack's runtime dependencies are not declared"
    named = [ln for ln in lines if _dist_name(ln) in TORCH_DISTS]
    assert not named, f"requirements.txt names torch (Manager must never touch it): {named}"
    for run in manager_install.pip_runs:
        assert_satisfied_offline(run)
    before, after = manager_install.installed_before, manager_install.installed_after
    changed = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
               if before.get(k) != after.get(k)}
    assert not changed, f"pip changed the environment (name: (before, after)): {changed}"
    assert "torch" in after, "the host environment has no torch"


def test_offline_install_failure_is_reported(tmp_path):
    """Negative control: a requirement that would need a download fails, naming the line."""
    line = "dreammatcher-no-such-distribution-for-tests>=1"
    run = pip_install_offline(sys.executable, line, tmp_path, {})
    assert run.returncode != 0, run.output
    with pytest.raises(pytest.fail.Exception, match="would have to download it"):
        assert_satisfied_offline(run)


def test_cloned_pack_registers_every_node(manager_server: ComfyServer, manager_install: ManagerInstall):
    """All node IDs of the clone are served from the clone's module, with no import error logged."""
    assert not manager_install.clone.is_symlink() and (manager_install.clone / ".git").is_dir()
    log = manager_server.startup_log
    errors = manager_server.pack_import_errors(log)
    assert not errors, "the cloned pack failed to import:\n" + "\n".join(errors)
    # the log scan also attributes failures to the pack inside a cloned (real, not linked) folder
    clone = manager_install.clone
    fake = (f"Traceback (most recent call last):\n  File \"{clone}/nodes/extension.py\", line 1, "
            f"in <module>\nImportError: boom\nCannot import {clone} module for custom nodes: boom\n")
    assert len(manager_server.pack_import_errors(log + fake)) == 2
    ids = manager_server.check_pack_loaded()
    assert ids, "no node_id=... in the clone's nodes/*.py"
    assert ids == pack_node_ids(), "the clone declares other nodes than the working tree"
    info = manager_server.get_json("/object_info")
    for node_id in sorted(ids):
        module = info[node_id]["python_module"]
        assert module.startswith(f"custom_nodes.{MANAGER_FOLDER}"), (node_id, module)
    assert f"{manager_server.pack_link}" in manager_server.startup_log  # loaded from this folder


def test_cloned_pack_serves_its_web_extension_and_icon(manager_server: ComfyServer,
                                                      manager_install: ManagerInstall):
    """``/extensions/comfyui-dreammatcher/`` serves the extension script and a valid PNG icon."""
    web = f"/extensions/{MANAGER_FOLDER}"
    listed = manager_server.get_json("/extensions")
    assert f"{web}/dreammatcher.js" in listed, f"the frontend would not load the extension: {listed}"

    status, ctype, body = _get(manager_server, f"{web}/dreammatcher.js")
    assert status == 200 and "javascript" in ctype, (status, ctype)
    assert body == (manager_install.clone / "web" / "dreammatcher.js").read_bytes()

    status, ctype, png = _get(manager_server, f"{web}/icon.png")
    assert status == 200 and ctype.startswith("image/png"), (status, ctype)
    assert len(png) > len(PNG_SIGNATURE) + 25 and png.startswith(PNG_SIGNATURE), png[:16]
    length, chunk, width, height = struct.unpack(">I4sII", png[8:24])
    assert chunk == b"IHDR" and length == 13 and width > 0 and height > 0, (chunk, length, width, height)
    assert png == (REPO / "web" / "icon.png").read_bytes()
