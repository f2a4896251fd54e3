"""The reference trajectory: DDIM-inverted reference latents at every sigma of a schedule.

DreamMatcher replays the reference image's inverted latent at each sampling step (docs/method.md,
"Reference inversion and trajectory"), so the trajectory is looked up by *sigma* (ComfyUI's native
step coordinate) rather than by step index: a lookup survives samplers that split or re-order model calls, and
a schedule mismatch becomes a clear error instead of a silently wrong latent.

Conventions (the shared data contract):

* ``sigmas`` ``[S]`` float32 on the CPU, strictly descending, ending with ``0.0``; bit-identical
  to the schedule ComfyUI's ``KSampler`` computes for the same model, steps and scheduler.
* ``latents`` ``[S, N, C, H, W]`` on the CPU in the model's dtype, in *model space* (after
  ``process_latent_in``), k-diffusion convention ``x = x0 + sigma * eps``; ``latents[i]`` is the
  reference at ``sigmas[i]`` and ``latents[-1]`` (sigma 0) is the clean ``z0``.

Files are safetensors (never pickle) with the header fields in JSON metadata and a format
version; :meth:`Trajectory.load` validates everything and says precisely what is wrong.
This module is pure torch and never imports ComfyUI.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: Written into every file; bump when the layout changes incompatibly.
FORMAT_VERSION = 1
FORMAT_NAME = "dreammatcher-trajectory"
#: The file suffix the nodes use (``<name>.dm.safetensors``).
#: How close a sampler's sigma must be to a recorded one to count as the same (sigmas travel
#: through devices and dtypes during sampling). The one tolerance every sigma comparison uses.
SIGMA_RTOL = 1e-4
SIGMA_ATOL = 1e-6


def same_sigma(a: float, b: float) -> bool:
    """Whether ``a`` equals the reference sigma ``b`` within ``SIGMA_ATOL + SIGMA_RTOL * |b|``."""
    return abs(float(a) - float(b)) <= SIGMA_ATOL + SIGMA_RTOL * abs(float(b))


SUFFIX = ".dm.safetensors"

#: dtypes a trajectory may hold (fp8 model weights store their latents in the compute dtype).
LATENT_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_EXTRA_PREFIX = "extra/"
_META_KEY = "dreammatcher"

MetaValue = str | float | int | bool


class TrajectoryFileError(ValueError):
    """A trajectory file is corrupt, truncated, of another version or inconsistent."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(eq=False)
class Trajectory:
    """Inverted reference latents at every sigma of one schedule (see module docstring).

    ``eq=False`` and :meth:`__deepcopy__` returning ``self``: ComfyUI deep-copies
    ``model_options`` on every ``ModelPatcher.clone()``, and a trajectory held there must be
    shared, never copied (it can be tens of megabytes).
    """

    sigmas: torch.Tensor
    latents: torch.Tensor
    latent_format: str
    fingerprint: str
    meta: dict[str, MetaValue] = field(default_factory=dict)
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def __deepcopy__(self, memo: dict) -> Trajectory:
        return self

    # ---- shape and access ---------------------------------------------------------------

    @property
    def z0(self) -> torch.Tensor:
        """The clean reference latent(s) ``[N, C, H, W]`` (the entry at sigma 0)."""
        return self.latents[-1]

    @property
    def steps(self) -> int:
        """Number of sampling steps the schedule has (``len(sigmas) - 1``)."""
        return int(self.sigmas.shape[0]) - 1

    @property
    def batch(self) -> int:
        """Number of reference images ``N``."""
        return int(self.latents.shape[1])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one latent ``(N, C, H, W)``."""
        return tuple(self.latents.shape[1:])

    @property
    def dtype(self) -> torch.dtype:
        return self.latents.dtype

    def _matches(self, sigma: float, rtol: float, atol: float) -> torch.Tensor:
        diff = (self.sigmas.double() - float(sigma)).abs()
        return diff <= atol + rtol * abs(float(sigma))

    def contains(self, sigma: float, *, rtol: float = SIGMA_RTOL, atol: float = SIGMA_ATOL) -> bool:
        """Whether ``sigma`` is (within tolerance) one of the recorded sigmas."""
        return bool(self._matches(sigma, rtol, atol).any())

    def index_of(self, sigma: float, *, rtol: float = SIGMA_RTOL, atol: float = SIGMA_ATOL) -> int:
        """Index of the recorded sigma equal to ``sigma`` within ``atol + rtol*|sigma|``.

        A tolerance is needed because sigmas travel through devices and dtypes during
        sampling; a miss almost always means the sampler uses another schedule, so the error
        names the nearest recorded sigmas and the schedule the reference was built with.
        """
        sigma = float(sigma)
        ok = self._matches(sigma, rtol, atol)
        diff = (self.sigmas.double() - sigma).abs()
        if bool(ok.any()):
            return int(torch.where(ok, diff, torch.full_like(diff, math.inf)).argmin())
        order = diff.argsort()[:2].tolist()
        nearest = ", ".join(f"{float(self.sigmas[i]):.6g} (step {i})" for i in sorted(order))
        sched = ""
        if "scheduler" in self.meta or "steps" in self.meta:
            sched = (f" It was inverted with steps={self.meta.get('steps', '?')}, "
                     f"scheduler={self.meta.get('scheduler', '?')}.")
        raise ValueError(
            f"sigma {sigma:.6g} is not in this reference trajectory; the nearest recorded sigmas "
            f"are {nearest}.{sched} Sample with the same steps and scheduler as the inversion "
            "(and denoise 1.0), or invert the reference again with the sampler's settings."
        )

    def at(self, sigma: float, *, rtol: float = SIGMA_RTOL, atol: float = SIGMA_ATOL) -> torch.Tensor:
        """The reference latents ``[N, C, H, W]`` at ``sigma`` (CPU, model dtype)."""
        return self.latents[self.index_of(sigma, rtol=rtol, atol=atol)]

    # ---- validation -----------------------------------------------------------------------

    def validate(self) -> None:
        """Check the invariants of the contract; raise :class:`ValueError` naming the problem."""
        s, lat = self.sigmas, self.latents
        if not isinstance(s, torch.Tensor) or not isinstance(lat, torch.Tensor):
            raise ValueError("Trajectory.sigmas and Trajectory.latents must be torch tensors.")
        if s.ndim != 1 or s.shape[0] < 2:
            raise ValueError(f"sigmas must be a 1-D tensor of at least 2 values, got shape {tuple(s.shape)}.")
        if s.dtype != torch.float32:
            raise ValueError(f"sigmas must be float32 (as ComfyUI schedules are), got {s.dtype}.")
        if lat.ndim != 5:
            raise ValueError(f"latents must be [S, N, C, H, W], got shape {tuple(lat.shape)}.")
        if lat.shape[0] != s.shape[0]:
            raise ValueError(
                f"latents hold {lat.shape[0]} steps but there are {s.shape[0]} sigmas; "
                "they must match one to one."
            )
        if min(lat.shape[1:]) < 1:
            raise ValueError(f"latents have an empty dimension: shape {tuple(lat.shape)}.")
        if lat.dtype not in LATENT_DTYPES.values():
            raise ValueError(f"latents dtype {lat.dtype} is not supported ({', '.join(LATENT_DTYPES)}).")
        if s.device.type != "cpu" or lat.device.type != "cpu":
            raise ValueError("A trajectory lives on the CPU; move sigmas and latents there first.")
        if not bool(torch.isfinite(s).all()):
            raise ValueError("sigmas contain NaN or infinity.")
        if float(s[-1]) != 0.0:
            raise ValueError(f"the last sigma must be 0.0 (the clean latent z0), got {float(s[-1])!r}.")
        if not bool((s[:-1] > s[1:]).all()):
            raise ValueError(
                "sigmas must be strictly descending; this schedule repeats or reorders values "
                "(choose fewer steps or another scheduler)."
            )
        if not isinstance(self.latent_format, str) or not self.latent_format:
            raise ValueError("latent_format must be a non-empty string (e.g. 'SD15', 'SDXL').")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise ValueError("fingerprint must be a non-empty string.")
        for k, v in self.meta.items():
            if not isinstance(k, str) or not isinstance(v, (str, float, int, bool)):
                raise ValueError(f"meta[{k!r}] must be a str, float, int or bool, got {type(v).__name__}.")
        for k, v in self.extras.items():
            if not isinstance(k, str) or not isinstance(v, torch.Tensor):
                raise ValueError(f"extras[{k!r}] must be a tensor, got {type(v).__name__}.")

    def validate_against(self, latent_format: str, fingerprint: str) -> None:
        """Raise a clear :class:`ValueError` if this trajectory was made for another model family.

        Used before sampling: a reference inverted with e.g. an SDXL model would otherwise
        fail deep inside attention with a shape error (or, worse, silently mis-match).
        """
        if latent_format != self.latent_format:
            raise ValueError(
                f"This DreamMatcher reference was inverted with a model using the '{self.latent_format}' "
                f"latent format, but the model it is used with uses '{latent_format}'. Invert the "
                "reference again (DDIM Invert Reference) with the same model family you sample with."
            )
        if fingerprint != self.fingerprint:
            raise ValueError(
                "This DreamMatcher reference was inverted with a model of another architecture "
                f"(reference: {self.fingerprint}; model in use: {fingerprint}). Invert the reference "
                "again (DDIM Invert Reference) with the model you sample with."
            )

    # ---- files ----------------------------------------------------------------------------

    def _header(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "latent_format": self.latent_format,
            "fingerprint": self.fingerprint,
            "latents": {"shape": list(self.latents.shape), "dtype": _dtype_name(self.latents.dtype)},
            "sigmas": {"shape": list(self.sigmas.shape), "dtype": "float32"},
            "extras": {k: {"shape": list(v.shape), "dtype": _dtype_name(v.dtype)}
                       for k, v in self.extras.items()},
            "meta": dict(self.meta),
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the trajectory to ``path`` (safetensors) atomically; return the path.

        The file is written to a temporary name in the same folder and renamed into place,
        so an interruption or a full disk never leaves a half-written reference behind.
        """
        from safetensors.torch import save_file

        self.validate()
        path = Path(path)
        tensors = {"sigmas": self.sigmas.contiguous(), "latents": self.latents.contiguous()}
        for k, v in self.extras.items():
            tensors[_EXTRA_PREFIX + k] = v.detach().to("cpu").contiguous().clone()
        metadata = {_META_KEY: json.dumps(self._header(), sort_keys=True)}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, latent_format: str | None = None,
             fingerprint: str | None = None) -> Trajectory:
        """Read and fully validate a trajectory file.

        Rejects, each with a message saying what is wrong: files that are not safetensors,
        truncated or padded files, files of another format or version, header fields whose
        declared shapes or dtypes disagree with the stored tensors, and (when
        ``latent_format``/``fingerprint`` are given) files made for another model family.
        """
        path = Path(path)
        if not path.is_file():
            raise TrajectoryFileError(f"No trajectory file at {path}.")
        data = path.read_bytes()
        header = _parse_safetensors_header(data, path)
        tensors = _load_tensors(data, path)
        meta_raw = header.get("__metadata__") or {}
        traj = _from_parts(tensors, meta_raw, path)
        if latent_format is not None or fingerprint is not None:
            traj.validate_against(latent_format if latent_format is not None else traj.latent_format,
                                  fingerprint if fingerprint is not None else traj.fingerprint)
        return traj


def _parse_safetensors_header(data: bytes, path: Path) -> dict:
    """Parse the safetensors header ourselves to give precise errors for damaged files."""
    name = path.name
    if len(data) < 8:
        raise TrajectoryFileError(f"{name} is empty or truncated ({len(data)} bytes); it is not a reference.")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise TrajectoryFileError(
            f"{name} is truncated or not a safetensors file: its header claims {n} bytes but the "
            f"file has only {len(data) - 8} after the length field."
        )
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrajectoryFileError(f"{name} has a corrupt safetensors header ({exc}).") from None
    if not isinstance(header, dict):
        raise TrajectoryFileError(f"{name} has a corrupt safetensors header (not a JSON object).")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            end = max(end, int(info["data_offsets"][1]))
        except (KeyError, TypeError, IndexError, ValueError):
            raise TrajectoryFileError(f"{name}: corrupt safetensors entry for '{key}'.") from None
    have = len(data) - 8 - n
    if have < end:
        raise TrajectoryFileError(
            f"{name} is truncated: the tensors need {end} bytes of data but only {have} are present. "
            "The file was probably cut short by an interrupted copy or download; save it again."
        )
    if have > end:
        raise TrajectoryFileError(f"{name} has {have - end} unexpected trailing bytes; it is corrupt.")
    return header


def _load_tensors(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error type
        raise TrajectoryFileError(f"{path.name} could not be read as safetensors: {exc}") from None


def _from_parts(tensors: dict[str, torch.Tensor], meta_raw: dict, path: Path) -> Trajectory:
    name = path.name
    if _META_KEY not in meta_raw:
        raise TrajectoryFileError(
            f"{name} is a safetensors file but not a DreamMatcher reference (no '{_META_KEY}' metadata)."
        )
    try:
        head = json.loads(meta_raw[_META_KEY])
    except json.JSONDecodeError as exc:
        raise TrajectoryFileError(f"{name}: the DreamMatcher metadata is corrupt ({exc}).") from None
    if not isinstance(head, dict) or head.get("format") != FORMAT_NAME:
        fmt = head.get("format") if isinstance(head, dict) else None
        raise TrajectoryFileError(f"{name}: unknown file format {fmt!r}, expected {FORMAT_NAME!r}.")
    version = head.get("version")
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise TrajectoryFileError(
            f"{name} uses reference format version {version!r}, but this DreamMatcher reads version "
            f"{FORMAT_VERSION}. "
            + ("Update the DreamMatcher nodes to load it." if newer
               else "Invert the reference again with this version.")
        )
    for key in ("latent_format", "fingerprint", "latents", "sigmas", "extras", "meta"):
        if key not in head:
            raise TrajectoryFileError(f"{name}: the metadata lacks the field '{key}'.")
    expected = {"sigmas": head["sigmas"], "latents": head["latents"]}
    expected.update({_EXTRA_PREFIX + k: v for k, v in head["extras"].items()})
    missing = sorted(set(expected) - set(tensors))
    unknown = sorted(set(tensors) - set(expected))
    if missing or unknown:
        raise TrajectoryFileError(f"{name}: tensors missing {missing} / unexpected {unknown}.")
    for key, spec in expected.items():
        t = tensors[key]
        if list(t.shape) != list(spec.get("shape", [])):
            raise TrajectoryFileError(
                f"{name}: tensor '{key}' has shape {list(t.shape)} but the metadata declares "
                f"{spec.get('shape')}; the file was modified or is corrupt."
            )
        if _dtype_name(t.dtype) != spec.get("dtype"):
            raise TrajectoryFileError(
                f"{name}: tensor '{key}' has dtype {_dtype_name(t.dtype)} but the metadata declares "
                f"{spec.get('dtype')}; the file was modified or is corrupt."
            )
    meta = head["meta"]
    if not isinstance(meta, dict):
        raise TrajectoryFileError(f"{name}: the 'meta' field must be a JSON object.")
    try:
        return Trajectory(
            sigmas=tensors["sigmas"], latents=tensors["latents"], latent_format=head["latent_format"],
            fingerprint=head["fingerprint"], meta=meta,
            extras={k[len(_EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)},
        )
    except ValueError as exc:
        raise TrajectoryFileError(f"{name}: {exc}") from None
