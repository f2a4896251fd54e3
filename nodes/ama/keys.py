"""The names under which the AMA patch keeps its objects on a MODEL and in a sampling run."""

#: ModelPatcher attachment holding the :class:`~.patch.AMAPatch`, and the key of its keyed wrappers.
PATCH_KEY = "dreammatcher_ama"
#: ``transformer_options`` key of the per-run :class:`~.run.RunState` (set in OUTER_SAMPLE, dropped after).
RUN_KEY = "dreammatcher_ama_run"
#: ``transformer_options`` key of the per-call :class:`~.run.CallState` (set on a copy for one UNet call).
CALL_KEY = "dreammatcher_ama_call"
