"""``DM_AMADiagnostics`` ("AMA Diagnostics"): what the AMA patch did in the last sampling run.

The AMA patch records, per sampling step, the confidence coverage, the foreground-mask area and the
fraction of cells whose gate ``mask × confidence`` exceeds 0.5 (``dreammatcher_core.diagnostics``).
The patch node itself runs *before* sampling, so it cannot show them; this node takes the sampler's
output LATENT only to run *after* it, passes it through unchanged, and shows the figures as text and
a plot on the node (and as STRING / IMAGE outputs). The plot has a title, axes with their units
(sampling step; fraction of the target grid), labelled ticks and a legend, drawn with Pillow
(:mod:`.plot`); the legend's entries also go to the node's UI output as strings (``legend``).

Input names and order are a public contract (saved workflows).
"""

from __future__ import annotations

from ..dreammatcher_core import diagnostics as core_diag
from . import plot
from .ama import patch_of
from .host import require_node_api
from .sockets import CATEGORY

io = require_node_api().io

#: The plot's size (width, height): readable when the frontend fits it to a node 400 to 500 px wide.
PLOT_SIZE = (512, 320)
#: Line widths (output px) in the core's figure order: wider under narrower, so coinciding lines all show.
LINE_WIDTHS = (5.0, 3.0, 1.5)
#: What the plot's axes are, first of the legend strings in the node's UI output.
AXES_TEXT = "Plot: x = sampling step, y = fraction of the target grid (0 to 1)."


def diagnostics_report(model) -> tuple[str, list]:
    """``(text, steps)`` describing the last run of an AMA-patched ``model``.

    Raises ValueError if the model carries no AMA patch. A model that has not sampled yet, or a run
    in which nothing was injected, gives an explanatory text and no steps (not an error: the graph
    still produces its image).
    """
    patch = patch_of(model)
    if patch is None:
        raise ValueError("AMA Diagnostics needs the MODEL that went through 'AMA Model Patch' (or a node "
                         "after it, e.g. a LoRA loader). This MODEL carries no AMA patch.")
    if patch.runs == 0:
        return ("The patched model has not sampled yet. Connect 'latent' to the output of the sampler "
                "that uses this MODEL, so this node runs after it."), []
    steps = list(patch.last_diagnostics)
    head = f"AMA run #{patch.runs}: "
    if steps:
        return head + core_diag.format_table(steps), steps
    if not patch.last_stats.get("active_steps"):
        why = ("no sampling step fell inside the start/end window, or strength is 0. Widen "
               "start_percent/end_percent or raise strength.")
    else:
        why = ("the window's steps had no previous-step features to match (the window must not start at "
               "the first step), or the sampler evaluated off the reference's schedule.")
    return head + "nothing was injected: " + why, []


def diagnostics_chart(steps: list, runs: int) -> plot.Chart:
    """The figures of one run as a chart: title, step axis (with the sigma range), fraction axis, legend.

    Without steps the axes are still drawn, with a short reason in the middle (the report has the
    whole explanation), so the node never shows a blank image.
    """
    series = [plot.Series(label, colour, values, width)
              for (label, colour, values), width in zip(core_diag.curves(steps), LINE_WIDTHS, strict=True)]
    title = "AMA Diagnostics" + (f", run #{runs}" if runs else "")
    if steps:
        title += f": {len(steps)} matched step{'s' if len(steps) != 1 else ''}"
        note = ""
    else:
        note = "not sampled yet" if runs == 0 else "nothing was injected (see the report)"
    span = core_diag.sigma_span(steps)
    return plot.line_chart(
        [s.step for s in steps], series,
        title=title,
        x_label="sampling step" + (f" ({span})" if span else ""),
        y_label="fraction of target grid",
        y_ticks=[(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0)],
        grid=(0.0, 0.5, 1.0),
        note=note,
        size=PLOT_SIZE,
    )


class AMADiagnostics(io.ComfyNode):
    """Per-step figures of the last AMA run: confidence coverage, mask area, gate > 0.5."""

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="DM_AMADiagnostics",
            display_name="AMA Diagnostics",
            category=CATEGORY,
            description=(
                "Shows what 'AMA Model Patch' did in the last sampling run, per step: confidence coverage "
                "(cycle-consistent share of the target), mask area (subject share) and the share of the "
                "target where the gate mask × confidence is above 0.5, i.e. where the reference appearance "
                "is actually injected. Low numbers explain a weak effect. Put it after the sampler."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The AMA-patched MODEL the sampler used (the output of "
                                                "'AMA Model Patch', or of a node after it)."),
                io.Latent.Input("latent", tooltip="The sampler's output LATENT: connecting it makes this "
                                                  "node run after sampling. It is passed through unchanged."),
            ],
            outputs=[
                io.Latent.Output("latent_out", display_name="LATENT",
                                 tooltip="The input latent, unchanged (so the node can sit between the "
                                         "sampler and VAE Decode)."),
                io.String.Output("report", tooltip="The per-step table as text."),
                io.Image.Output("plot", tooltip="The three figures against the step: blue coverage, "
                                                "orange mask area, green gate > 0.5 (grid at 0, 0.5, 1)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, latent) -> io.NodeOutput:
        text, steps = diagnostics_report(model)
        image = diagnostics_chart(steps, patch_of(model).runs).image
        api = require_node_api()
        # what the plot's axes and colours are, in the image's words, as strings of their own: for the
        # API and a screen reader; the text panel keeps to the report, which it has to fit
        legend = [AXES_TEXT, *core_diag.legend_entries()]
        ui = {"text": [text], "legend": legend, "images": api.ui.PreviewImage(image, cls=cls).values}
        return io.NodeOutput(latent, text, image, ui=ui)
