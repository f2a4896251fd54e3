"""Thin ComfyUI adapters over :mod:`dreammatcher_core`.

Only :mod:`.host` touches ComfyUI internals (``comfy.*``); the other modules use the public
node API (``comfy_api.latest``) and the helpers that :mod:`.host` exposes.
"""
