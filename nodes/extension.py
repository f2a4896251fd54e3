"""Registration of the pack's nodes with ComfyUI (V3 ``ComfyExtension``), with an explicit node list.

The order is the display order in menus.
"""

from __future__ import annotations

from .host import require_node_api


def node_classes() -> list[type]:
    """Every node class of the pack (imported here, when ComfyUI asks, so the host is up)."""
    from .node_ama import AMAModelPatch
    from .node_diagnostics import AMADiagnostics
    from .node_features import ExtractFeatures
    from .node_guidance import MatchingGuidance, MatchingGuidanceSampler
    from .node_inspect import InspectFeatures, InspectMatch
    from .node_invert import InvertReference, LoadReference, SaveReference
    from .node_match import SemanticMatch
    from .node_settings import FeatureSettings, MatchSettings

    return [InvertReference, SaveReference, LoadReference, FeatureSettings, MatchSettings, AMAModelPatch,
            MatchingGuidanceSampler, MatchingGuidance, AMADiagnostics, InspectFeatures, InspectMatch,
            ExtractFeatures, SemanticMatch]


def make_extension():
    """Build the ``ComfyExtension`` that ComfyUI asks for in ``comfy_entrypoint``."""
    api = require_node_api()

    class DreamMatcherExtension(api.ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return node_classes()

    return DreamMatcherExtension()
