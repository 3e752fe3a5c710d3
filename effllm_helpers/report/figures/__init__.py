"""The paper's figures (EfficientLLM Figs. 2-5) and ours, drawn from the tidy results table.

Why one package: the summary notebook and ``effllm report`` must produce the same figures from the
same table. Every figure function has the same shape, ``fig_x(tidy_df, out_dir, records_root=None)
-> Drawn``, saves ``<name>.png`` (150 dpi) and ``<name>.pdf`` into ``out_dir`` and returns the
matplotlib Figure with the paths. A figure whose data is missing still gets drawn and saved, with a
centred "no data: <why>" text on it, so a report never silently lacks a panel and never crashes.

Normalised axes point "higher is better" (scaled to [0.1, 1] within the plotted comparison set by
:func:`effllm_helpers.report.scoring.normalise`); raw ranges with units are printed beside them.
Repeats (runs whose params differ only in the seed) are averaged and drawn with 95 % confidence
intervals. Figures use matplotlib's object API (no pyplot state), so they are safe in loops.

Layout: ``common`` (the ``Drawn`` result, saving, "no data" panels, labels, units, orders,
palettes, repeat summaries), one module per axis (``architecture``: Figs. 3a-c, ``finetuning``:
Figs. 4a-b, ``inference``: Fig. 5, ``cross_modal``: Figs. 6a-b) and ``general`` (the rank table,
Fig. 2, and the figures drawn over every axis: Pareto fronts, loss curves, repeat error bars; a
run's own curves for its notebook). This module gathers them into ``FIGURES`` and ``draw_all`` and
re-exports the names the report, the notebooks and the tests use.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg", force=False)  # before any figure module imports matplotlib's drawing parts
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402

from effllm_helpers.axes.spec import SPECS  # noqa: E402

from .architecture import (  # noqa: E402
    ARCHITECTURE,
    ATTENTION_ORDER,
    BAR_METRICS,
    HOLD,
    POSITIONAL_ORDER,
    RADAR_METRICS,
    _arch_rows,
    _hold_fixed,
    fig3a_attention_radar,
    fig3b_positional_bars,
    fig3c_moe_bubbles,
)
from .common import (  # noqa: E402
    DEFAULT_UNIT,
    DPI,
    LABEL,
    NO_DATA,
    NORM_LABEL,
    Drawn,
    _ax_no_data,
    _config_cols,
    _done,
    _new,
    _no_data_figure,
    _order,
    _palette,
    _why_empty,
    _wide,
    axis_label,
    figure_keys,
    figure_texts,
    plain_text,
    repeat_summary,
    save,
    spread_note,
    studies_varying,
    unit,
)
from .cross_modal import (  # noqa: E402
    DIT_PANELS,
    TARGET_ORDER,
    XM_ATTENTION_ORDER,
    XM_AXIS,
    XM_METHOD_ORDER,
    fig6a_dit_attention,
    fig6b_peft_transfer,
)
from .finetuning import (  # noqa: E402
    FINETUNING,
    METHOD_ORDER,
    fig4a_peft_score_loss,
    fig4b_peft_area_loss,
)
from .general import (  # noqa: E402
    LABEL_KEY,
    REPEAT_METRICS,
    TIER_COLOURS,
    fig2_rank_table,
    fig_loss_curves,
    fig_pareto_fronts,
    fig_repeat_error_bars,
    pareto_mask,
    run_curves,
    show,
)
from .inference import (  # noqa: E402
    INFERENCE,
    POLAR_RINGS,
    PRECISION_ORDER,
    RING_LABEL,
    fig5_precision_polar,
)

# ---------------------------------------------------------------- all
# the figures one axis draws, by the names its spec lists (AxisSpec.figures)
AXIS_FIGURES: dict[str, Callable[..., Drawn]] = {
    "fig3a_attention_radar": fig3a_attention_radar,
    "fig3b_positional_bars": fig3b_positional_bars,
    "fig3c_moe_bubbles": fig3c_moe_bubbles,
    "fig4a_peft_score_loss": fig4a_peft_score_loss,
    "fig4b_peft_area_loss": fig4b_peft_area_loss,
    "fig5_precision_polar": fig5_precision_polar,
    "fig6a_dit_attention": fig6a_dit_attention,
    "fig6b_peft_transfer": fig6b_peft_transfer,
}
# every figure, in report order: the rank table, each axis's own (in the specs' order), then
# those drawn over all axes; an axis spec naming a figure that is not drawn here raises
FIGURES: dict[str, Callable[..., Drawn]] = {
    "fig2_rank_table": fig2_rank_table,
    **{f: AXIS_FIGURES[f] for s in SPECS.values() for f in s.figures},
    "pareto_fronts": fig_pareto_fronts,
    "loss_curves": fig_loss_curves,
    "repeat_error_bars": fig_repeat_error_bars,
}


def draw_all(tidy_df: pd.DataFrame, records_root: str | Path | None,
             out_dir: str | Path) -> list[Path]:
    """Draw every figure into ``out_dir``; return the PNG and PDF paths written.

    A figure that raises is replaced by a "no data: could not draw (...)" figure and a warning,
    so one bad panel does not cost the whole report.
    """
    paths: list[Path] = []
    for name, fn in FIGURES.items():
        try:
            paths += fn(tidy_df, out_dir, records_root).paths
        except Exception as exc:  # noqa: BLE001 - report, draw a placeholder, go on
            warnings.warn(f"figure {name} failed: {exc!r}", stacklevel=2)
            fig = _no_data_figure(name, f"could not draw ({type(exc).__name__}: {exc})")
            paths += save(fig, out_dir, name)
    return paths


# what the report, the notebooks and the tests use of the figures
__all__ = [
    "_ax_no_data", "axis_label", "_config_cols", "DEFAULT_UNIT", "_done", "DPI", "Drawn",
    "figure_keys", "figure_texts", "LABEL", "_new", "NO_DATA", "_no_data_figure", "NORM_LABEL",
    "_order", "_palette", "plain_text", "repeat_summary", "save", "spread_note", "studies_varying",
    "unit", "_why_empty", "_wide", "_arch_rows", "ARCHITECTURE", "ATTENTION_ORDER", "BAR_METRICS",
    "fig3a_attention_radar", "fig3b_positional_bars", "fig3c_moe_bubbles", "HOLD", "_hold_fixed",
    "POSITIONAL_ORDER", "RADAR_METRICS", "fig4a_peft_score_loss", "fig4b_peft_area_loss",
    "FINETUNING", "METHOD_ORDER", "fig5_precision_polar", "INFERENCE", "POLAR_RINGS",
    "PRECISION_ORDER", "RING_LABEL", "fig2_rank_table", "fig_loss_curves", "fig_pareto_fronts",
    "fig_repeat_error_bars", "LABEL_KEY", "pareto_mask", "REPEAT_METRICS", "run_curves", "show",
    "TIER_COLOURS", "DIT_PANELS", "fig6a_dit_attention", "fig6b_peft_transfer", "TARGET_ORDER",
    "XM_ATTENTION_ORDER", "XM_AXIS", "XM_METHOD_ORDER", "AXIS_FIGURES", "FIGURES", "draw_all",
]
