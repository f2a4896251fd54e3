"""The ``DM_REFERENCE`` object and its files (``<name>.dm.safetensors``).

A :class:`Reference` bundles what the reference branch needs at sampling time: the inverted
trajectory (core :class:`~dreammatcher_core.trajectory.Trajectory`) and the conditionings the
reference is denoised with (its own prompt for COND chunks, the empty prompt for UNCOND).
It is created once by DM_InvertReference and reused by many target generations, so it is a
read-only value: never mutated, shared (not copied) by ``ModelPatcher.clone()``.

Files: the trajectory's safetensors format, with the conditioning tensors stored as extra
tensors (``reference/<role>/<i>/...``) and the conditioning structure in the metadata. Dict
entries of a conditioning that are neither tensors nor plain scalars/number lists (hooks,
ControlNets, GLIGEN, ...) cannot be stored safely and are dropped with a logged note listed in
``info["dropped"]``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..dreammatcher_core.trajectory import SUFFIX, Trajectory, TrajectoryFileError
from .host import folders as host_folders
from .host import model as host_model

log = logging.getLogger("dreammatcher")

SUBFOLDER = "dreammatcher"
_COND_META = "reference/conditioning"
_INFO_META = "reference/info"
_PREFIX = "reference/"


@dataclass(eq=False)
class Reference:
    """The value flowing through ``DM_REFERENCE`` sockets (see the shared data contract)."""

    trajectory: Trajectory
    positive: list
    negative: list
    info: dict = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> Reference:
        return self

    # ---- checks used at sampling time ----------------------------------------------------

    def check_model(self, model_patcher) -> None:
        """Raise a clear ValueError if this reference was built for another model family/layout."""
        latent_format, fingerprint = host_model.model_fingerprint(model_patcher)
        self.trajectory.validate_against(latent_format, fingerprint)

    def check_schedule(self, sigmas) -> list[int]:
        """Map every sigma of a sampling schedule to its trajectory index.

        Raises a ValueError naming the first sigma the trajectory lacks (and the nearest
        recorded ones) so a steps/scheduler/denoise mismatch is reported before sampling.
        """
        return [self.trajectory.index_of(float(s)) for s in torch.as_tensor(sigmas).flatten().tolist()]

    # ---- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write trajectory + conditionings to one safetensors file (atomically)."""
        extras = dict(self.trajectory.extras)
        structure: dict[str, list] = {}
        dropped: list[str] = []
        for role in ("positive", "negative"):
            structure[role] = _pack_conditioning(getattr(self, role), f"{_PREFIX}{role}", extras, dropped)
        info = {k: v for k, v in self.info.items() if isinstance(v, (str, int, float, bool))}
        meta = dict(self.trajectory.meta)
        meta[_COND_META] = json.dumps(structure, sort_keys=True)
        meta[_INFO_META] = json.dumps(info, sort_keys=True)
        if dropped:
            log.warning("DreamMatcher: conditioning entries not saved (not tensors or scalars): %s", dropped)
        t = self.trajectory
        bundle = Trajectory(t.sigmas, t.latents, t.latent_format, t.fingerprint, meta=meta, extras=extras)
        return bundle.save(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Reference:
        """Read and validate a reference file (format, version, shapes, sigmas, conditionings)."""
        bundle = Trajectory.load(path)
        name = Path(path).name
        if _COND_META not in bundle.meta:
            raise TrajectoryFileError(
                f"{name} holds a bare trajectory without the reference conditionings; save it with "
                "'Save DreamMatcher Reference'."
            )
        try:
            structure = json.loads(str(bundle.meta[_COND_META]))
            info = json.loads(str(bundle.meta.get(_INFO_META, "{}")))
        except json.JSONDecodeError as exc:
            raise TrajectoryFileError(f"{name}: corrupt conditioning metadata ({exc}).") from None
        used: set[str] = set()
        conds = {}
        for role in ("positive", "negative"):
            conds[role] = _unpack_conditioning(structure.get(role), bundle.extras, used, name, role)
        extras = {k: v for k, v in bundle.extras.items() if not k.startswith(_PREFIX)}
        meta = {k: v for k, v in bundle.meta.items() if k not in (_COND_META, _INFO_META)}
        traj = Trajectory(bundle.sigmas, bundle.latents, bundle.latent_format, bundle.fingerprint,
                          meta=meta, extras=extras)
        info = dict(info) if isinstance(info, dict) else {}
        info["file"] = name
        return cls(traj, conds["positive"], conds["negative"], info)


def _pack_conditioning(cond: list, prefix: str, extras: dict, dropped: list[str]) -> list:
    """Turn ``[[tensor, dict], ...]`` into JSON structure + tensors in ``extras``."""
    out = []
    for i, (tensor, d) in enumerate(cond):
        key = f"{prefix}/{i}/cond"
        extras[key] = tensor.detach().to("cpu").contiguous()
        entry: dict = {"cond": key, "tensors": {}, "values": {}}
        for k, v in d.items():
            if isinstance(v, torch.Tensor):
                tk = f"{prefix}/{i}/{k}"
                extras[tk] = v.detach().to("cpu").contiguous()
                entry["tensors"][k] = tk
            elif isinstance(v, (str, int, float, bool)) or v is None:
                entry["values"][k] = v
            elif isinstance(v, (list, tuple)) and all(isinstance(e, (int, float)) for e in v):
                entry["values"][k] = {"tuple": list(v)}
            else:
                dropped.append(f"{prefix.split('/')[-1]}[{i}].{k}")
        out.append(entry)
    return out


def _unpack_conditioning(structure, extras: dict, used: set[str], name: str, role: str) -> list:
    if not isinstance(structure, list) or not structure:
        raise TrajectoryFileError(f"{name}: the {role} conditioning is missing or empty.")
    cond = []
    for entry in structure:
        try:
            tensor = extras[entry["cond"]]
            d = {k: extras[tk] for k, tk in entry["tensors"].items()}
            for k, v in entry["values"].items():
                d[k] = tuple(v["tuple"]) if isinstance(v, dict) else v
        except (KeyError, TypeError) as exc:
            raise TrajectoryFileError(f"{name}: the {role} conditioning lacks the tensor {exc}.") from None
        if tensor.ndim != 3:
            raise TrajectoryFileError(f"{name}: the {role} conditioning tensor has shape "
                                      f"{list(tensor.shape)}, expected [batch, tokens, channels].")
        cond.append([tensor, d])
    return cond


# ---- file names (DM_SaveReference / DM_LoadReference) ------------------------------------

_BAD_NAME = re.compile(r"[\x00-\x1f<>:\"|?*]")


def _safe_name(filename_prefix: str) -> str:
    """The file name part of a save prefix; refuses traversal, separators and odd characters."""
    raw = str(filename_prefix).strip()
    name = raw[len(SUBFOLDER) + 1:] if raw.startswith(SUBFOLDER + "/") else raw
    problems = []
    if not name:
        problems.append("it is empty")
    if ".." in name:
        problems.append("it contains '..'")
    if "/" in name or "\\" in name or os.path.isabs(raw):
        problems.append("it contains a path separator (only the 'dreammatcher/' folder prefix is allowed)")
    if _BAD_NAME.search(name):
        problems.append("it contains characters not allowed in file names")
    if problems:
        raise ValueError(
            f"filename_prefix {filename_prefix!r} is not allowed: {'; '.join(problems)}. Use a plain "
            f"name like 'my_dog' (files go to ComfyUI's output/{SUBFOLDER}/ folder)."
        )
    return name


def save_path(filename_prefix: str) -> Path:
    """Next free ``<output>/dreammatcher/<name>_NNNNN.dm.safetensors`` for ``filename_prefix``."""
    name = _safe_name(filename_prefix)
    folder = host_folders.reference_roots()["output"] / SUBFOLDER
    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(name) + r"_(\d{5,})" + re.escape(SUFFIX) + "$")
    used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.match(p.name))]
    return folder / f"{name}_{max(used, default=0) + 1:05d}{SUFFIX}"


def list_files() -> list[str]:
    """Combo values: ``output/dreammatcher/*``, ``input/dreammatcher/*`` and ``input/*`` references."""
    found = []
    roots = host_folders.reference_roots()
    for root_name, sub in (("output", SUBFOLDER), ("input", SUBFOLDER), ("input", "")):
        folder = roots[root_name] / sub if sub else roots[root_name]
        if folder.is_dir():
            for p in sorted(folder.iterdir()):
                if p.is_file() and p.name.endswith(SUFFIX):
                    found.append("/".join(x for x in (root_name, sub, p.name) if x))
    return found


def resolve_file(value: str) -> Path:
    """Resolve a combo value to a file inside the output/input folder, refusing traversal."""
    parts = str(value).replace("\\", "/").split("/")
    roots = host_folders.reference_roots()
    if (len(parts) < 2 or parts[0] not in roots or any(p in ("", ".", "..") for p in parts[1:])
            or os.path.isabs(str(value)) or not parts[-1].endswith(SUFFIX)):
        raise ValueError(
            f"reference_file {value!r} is not allowed: pick a '*{SUFFIX}' file from the list "
            f"(output/{SUBFOLDER}/..., input/{SUBFOLDER}/... or input/...); paths with '..' are refused."
        )
    root = roots[parts[0]].resolve()
    path = (root / Path(*parts[1:])).resolve()
    if os.path.commonpath([root, path]) != str(root):
        raise ValueError(f"reference_file {value!r} points outside ComfyUI's {parts[0]} folder; refused.")
    if not path.is_file():
        raise ValueError(f"reference file {value!r} does not exist (refresh the node list).")
    return path
