"""The miniature world: a procedural scene renderer, its trained tiny model, and demo nodes.

Not part of the installed pack: ComfyUI only loads this folder when ``make demo`` (or a test, or the
fidelity benchmark) links it into ``custom_nodes`` as a second custom-node folder. Importing the
package itself stays light; the node classes import ComfyUI only when a node runs.
"""

from .demo_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
