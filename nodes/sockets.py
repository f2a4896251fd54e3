"""Custom socket types shared by the nodes.

Their string names (``DM_REFERENCE``, ``DM_FEATURES``, ``DM_MATCH``) are part of the public
contract: saved workflows link sockets by these names.
"""

from __future__ import annotations

from .host import require_node_api

io = require_node_api().io

DMReference = io.Custom("DM_REFERENCE")
DMFeatures = io.Custom("DM_FEATURES")
DMMatch = io.Custom("DM_MATCH")

CATEGORY = "DreamMatcher"


def inspector_noise_inputs() -> list:
    """The trailing ``noise_percent`` and ``seed`` inputs shared by the two inspector nodes.

    Kept in one place so both nodes describe the feature pass identically (their order is part of
    the saved-workflow contract, locked by the schema snapshot test).
    """
    return [
        io.Float.Input(
            "noise_percent", default=0.25, min=0.0, max=0.99, step=0.01, optional=True,
            tooltip="Inspector only: how far into the noise schedule the latents are noised before "
                    "the feature pass (0 = clean, 0.99 = almost pure noise).",
        ),
        io.Int.Input(
            "seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, optional=True,
            tooltip="Inspector only: seed of the noise added to the latents (deterministic).",
        ),
    ]
