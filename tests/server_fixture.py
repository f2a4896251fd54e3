"""A real ComfyUI server for the e2e and browser tiers (docs/host.md).

The server runs ``main.py`` of the ComfyUI root (``COMFYUI_PATH`` or the pinned copy in
``.host/comfyui``) on a free loopback port, with every directory under a temporary
``--base-directory`` and this pack **symlinked** into its ``custom_nodes`` as ``dreammatcher``
(the folder name a git clone gives). Its log goes to a file.

ComfyUI only *logs* custom-node import failures, so :meth:`ComfyServer.check_pack_loaded`
turns them into test failures, and also fails if a node ID declared in ``nodes/*.py``
(``node_id="..."`` in a V3 schema) is missing from ``/object_info``.

Only the standard library is imported here: the root ``conftest.py`` imports this module for
every tier, including the core tier, which must stay light.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACK_FOLDER = "dreammatcher"
START_TIMEOUT_S = 120.0

_NODE_ID_RE = re.compile(r"""\bnode_id\s*=\s*["']([^"']+)["']""")
#: Log lines that mean the pack (or a part of it) did not load.
_FAILURE_MARKERS = ("IMPORT FAILED", "Cannot import", "Error while calling comfy_entrypoint",
                    "did not return a ComfyExtension", "did not return a list of nodes",
                    "Skip ", "is not callable")


def pack_node_ids(repo: Path = REPO) -> set[str]:
    """Every ``node_id="..."`` written in the pack's node modules (``nodes/*.py``).

    Read from source, not by importing the pack, so a module that fails to import still
    contributes its IDs and the server check reports them missing.
    """
    ids: set[str] = set()
    for path in sorted((repo / "nodes").glob("*.py")):
        ids.update(_NODE_ID_RE.findall(path.read_text(encoding="utf-8")))
    return ids


MINIWORLD_FOLDER = "dreammatcher_miniworld"


def link_miniworld(base: Path) -> Path:
    """Link ``scripts/miniworld`` (the demo node set) as a second custom-node folder under ``base``."""
    link = base / "custom_nodes" / MINIWORLD_FOLDER
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(REPO / "scripts" / "miniworld", target_is_directory=True)
    return link


def server_threads() -> str:
    """Torch/OpenMP threads for the server (and other heavy subprocesses of the tests).

    The test graphs are tiny (8x8 latents), where per-op thread synchronisation dominates:
    on a busy 2-core machine (pytest, the server and Chromium at once, or a noisy CI
    neighbour) two OpenMP threads made one UNet forward 35x slower than one thread
    (18 s vs 0.5 s, measured). ``DM_SERVER_THREADS`` overrides; an explicit
    ``OMP_NUM_THREADS`` is respected.
    """
    return os.environ.get("DM_SERVER_THREADS") or os.environ.get("OMP_NUM_THREADS") or "1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _traceback_only(block: str) -> str:
    """The traceback at the start of ``block``: its indented frame lines and the exception line."""
    lines = block.splitlines()
    end = 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        end += 1
    return "\n".join(lines[: end + 1])


class ServerError(RuntimeError):
    pass


class ComfyServer:
    """One ComfyUI process plus small HTTP helpers (``post_prompt``, ``wait_for``...)."""

    def __init__(self, comfy_root: Path, base: Path, python: str = sys.executable, *, cpu: bool = True,
                 extra_args: tuple[str, ...] = (), pack_folder: str = PACK_FOLDER) -> None:
        """``pack_folder`` names the pack's folder in ``custom_nodes`` (and so its module name and
        ``/extensions/<pack_folder>/`` URL). :meth:`prepare` symlinks the checkout there unless
        something is there already: a test may put a real copy there first (a git clone, as
        ComfyUI-Manager installs it).
        """
        self.comfy_root = comfy_root
        self.base = base
        self.pack_folder = pack_folder
        self.python = python
        self.cpu = cpu  # False: let ComfyUI pick the device (the GPU check)
        self.extra_args = tuple(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = base / "comfyui.log"
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self.client_id = uuid.uuid4().hex
        self.startup_s: float | None = None
        self.startup_log = ""  # the log up to the first answer of /object_info
        self.pack_ids: set[str] = set()  # set by the fixture after check_pack_loaded()

    # ---- directories ------------------------------------------------------------------------
    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def pack_link(self) -> Path:
        """The pack's folder in ``custom_nodes``: a symlink to the checkout, or a real copy."""
        return self.base / "custom_nodes" / self.pack_folder

    def prepare(self) -> None:
        for sub in ("custom_nodes", "user", "input", "output", "temp",
                    "models/checkpoints", "models/loras", "models/embeddings"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        if not self.pack_link.exists():
            self.pack_link.symlink_to(REPO, target_is_directory=True)

    # ---- process ----------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        self.prepare()
        cmd = [
            self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
            "--port", str(self.port), "--disable-auto-launch", "--base-directory", str(self.base),
            "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
            "--use-pytorch-cross-attention", *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", DO_NOT_TRACK="1",
                   OMP_NUM_THREADS=server_threads())
        self._log_file = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115 (closed in stop)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            cmd, cwd=str(self.comfy_root), stdout=self._log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n"
                                  + self.log_tail())
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"ComfyUI did not answer /object_info within {timeout:.0f} s:\n"
                                  + self.log_tail())
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0
        self.startup_log = self.log_text()

    def stop(self) -> None:
        """Terminate the server's process group, then kill it if it lingers."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=15)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    # ---- log --------------------------------------------------------------------------------
    def log_text(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_text()[-chars:]

    def pack_import_errors(self, text: str | None = None) -> list[str]:
        """Log lines showing that the pack failed to import (plus any traceback under it).

        ``text`` defaults to the server log. A traceback is attributed to the pack when one of
        its frames is in the pack's folder (``pack_link``: the symlink path or a real copy such as
        a git clone) or in the real checkout. Meant for the start-up log: a node that raises while
        running a prompt also logs a traceback.
        """
        text = self.log_text() if text is None else text
        link = str(self.pack_link)
        bad = [ln for ln in text.splitlines() if any(m in ln for m in _FAILURE_MARKERS) and link in ln]
        for block in re.split(r"(?m)^(?=Traceback \(most recent call last\))", text)[1:]:
            tb = _traceback_only(block)
            if any(self._in_pack(f) for f in re.findall(r'File "([^"]+)"', tb)):
                bad.append(tb[-3000:])
        return bad

    def _in_pack(self, path: str) -> bool:
        """Is ``path`` a file of this pack (via ``pack_link`` or the real checkout)?

        The hosts and their venvs live inside the checkout (``.host``, ``.venv``,
        ``.venv-compat``), so those are excluded.
        """
        p = Path(path)
        if p.is_relative_to(self.pack_link):
            return True
        inside = (".host", ".venv", ".venv-compat")
        return p.is_relative_to(REPO) and not any(p.is_relative_to(REPO / d) for d in inside)

    def check_pack_loaded(self) -> set[str]:
        """Fail on pack import errors or node IDs missing from ``/object_info``; return the IDs."""
        errors = self.pack_import_errors(self.startup_log)
        if errors:
            raise ServerError("the pack failed to import:\n" + "\n".join(errors) + "\n--- log tail ---\n"
                              + self.log_tail())
        ids = pack_node_ids(self.pack_link)  # the served copy's own IDs (a clone may differ)
        info = self.get_json("/object_info")
        missing = sorted(ids - set(info))
        if missing:
            raise ServerError(f"pack node IDs missing from /object_info: {missing}\n--- log tail ---\n"
                              + self.log_tail())
        return ids

    # ---- HTTP -------------------------------------------------------------------------------
    def get_json(self, path: str, timeout: float = 30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload, timeout: float = 30):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return json.loads(body) if body else None
        except urllib.error.HTTPError as exc:
            raise ServerError(f"POST {path} -> {exc.code}: {exc.read().decode(errors='replace')}") from exc

    def post_prompt(self, graph: dict) -> str:
        """Queue an API-format graph; return its prompt id (raises with node_errors on 400)."""
        res = self.post_json("/prompt", {"prompt": graph, "client_id": self.client_id})
        if res.get("node_errors"):
            raise ServerError(f"prompt rejected: {json.dumps(res['node_errors'])[:3000]}")
        return res["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = 120) -> dict:
        """Poll ``/history/<id>`` until the prompt is done; return its history entry.

        Fails with ComfyUI's execution error message when the prompt errored.
        """
        deadline = time.monotonic() + timeout
        while True:
            hist = self.get_json(f"/history/{urllib.parse.quote(prompt_id)}")
            entry = hist.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    msgs = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = msgs[0][1] if msgs else status
                    if isinstance(detail, dict):
                        detail = (f"{detail.get('node_type')} (node {detail.get('node_id')}): "
                                  f"{detail.get('exception_type')}: {detail.get('exception_message')}\n"
                                  + "".join(detail.get("traceback", []))[-3000:])
                    raise ServerError(f"prompt {prompt_id} failed: {detail}")
                return entry
            if self.proc is None or self.proc.poll() is not None:
                raise ServerError("ComfyUI died while running a prompt:\n" + self.log_tail())
            if time.monotonic() > deadline:
                raise ServerError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n"
                                  + self.log_tail())
            time.sleep(0.2)

    def run(self, graph: dict, timeout: float = 120) -> dict:
        return self.wait_for(self.post_prompt(graph), timeout)

    def output_images(self, entry: dict) -> list[Path]:
        """Paths of the images a finished prompt saved (``type == "output"``)."""
        paths = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                if img.get("type") == "output":
                    paths.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return paths
