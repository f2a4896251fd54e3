"""The ComfyUI side of the pack: node declarations over runtimes over one host layer.

Layers, each importing only those below it (``tests/core/test_layering.py`` enforces it):
``dreammatcher_core`` (pure maths) <- ``layout``/``config``/``subject`` (plain data and policy) <-
``host`` (the only code importing ComfyUI) <- runtimes (``inversion``, ``reference``, ``capture``,
``ama``, ``guidance``/``guidance_run``, ``inspector``/``inspector_match``) <- node declarations
(``node_*.py``, ``sockets``, ``extension``). ``docs/architecture.md`` walks through it.
"""
