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

