"""ComfyUI's input and output folders (the only roots reference files are read from or written to)."""

from __future__ import annotations

from pathlib import Path


def reference_roots() -> dict[str, Path]:
    """ComfyUI's output and input folders (the roots DM_Save/LoadReference work under)."""
    import folder_paths

    return {"output": Path(folder_paths.get_output_directory()),
            "input": Path(folder_paths.get_input_directory())}


