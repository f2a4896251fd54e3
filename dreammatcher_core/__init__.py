"""DreamMatcher core: the method's mathematics in pure torch (no ComfyUI import, ever).

Submodules: ``matching`` (argmax flows, warp, cycle error, confidence), ``features`` (co-PCA
descriptors), ``masks`` (cross-attention foreground masks, attention-grid geometry), ``ama``
(appearance-matching value injection), ``guidance`` (semantic matching guidance), ``viz`` (debug
images), ``diagnostics`` (per-step gate figures) and ``trajectory`` (stored reference trajectories).

Importing the package imports nothing heavy; submodules load on first attribute access
(``dreammatcher_core.matching``) or by ``import dreammatcher_core.matching``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["ama", "diagnostics", "features", "guidance", "masks", "matching", "trajectory", "viz"]


def __getattr__(name: str) -> ModuleType:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
