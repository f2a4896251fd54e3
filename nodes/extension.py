"""Registration of the pack's nodes with ComfyUI (V3 ``ComfyExtension``)."""

from __future__ import annotations

import importlib
import logging

from .host import require_node_api

log = logging.getLogger("dreammatcher")

#: Modules (relative to this package) that hold node classes, each listing them in ``NODES``.
#: Order matters only for the display order in menus.
NODE_MODULES: tuple[str, ...] = (
    "invert",
    "features",
    "match",
    "ama",
    "guidance",
    "diagnostics",
)


def node_classes() -> list[type]:
    """Collect the node classes of every node module that exists.

    A module file that is absent (e.g. a trimmed install) is skipped; any other import error
    is raised, because hiding it would leave users with silently missing nodes.
    """
    classes: list[type] = []
    for name in NODE_MODULES:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        classes.extend(getattr(module, "NODES", ()))
    return classes


def make_extension():
    """Build the ``ComfyExtension`` that ComfyUI asks for in ``comfy_entrypoint``."""
    api = require_node_api()

    class DreamMatcherExtension(api.ComfyExtension):
        async def get_node_list(self) -> list[type]:
            return node_classes()

    return DreamMatcherExtension()
