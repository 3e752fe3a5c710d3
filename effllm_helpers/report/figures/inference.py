"""Axis 3 (inference): Fig. 5, each precision's normalised metrics per model as polar stacked
bars."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from effllm_helpers import catalog
from effllm_helpers.axes.spec import axis_of_figure
from effllm_helpers.report import scoring as E

from .common import (
    Drawn,
    _done,
    _new,
    _no_data_figure,
    _one_device,
    _order,
    _palette,
    _short,
    _why_empty,
    _wide,
    repeat_summary,
)

# the axis this figure draws, found through the spec by the figure's name
INFERENCE = axis_of_figure("fig5_precision_polar")[0].name
PRECISION_ORDER = catalog.PRECISION_ORDER


# ---------------------------------------------------------------- Fig. 5
# AMU is the memory a precision adds (the increment above the post-import baseline): the total
# is mostly the fixed baseline (interpreter, libraries, CUDA context), the same for every one
POLAR_RINGS = ["perf", "it", "amu_increment_gb", "al_s", "aec_w", "mcr"]
RING_LABEL = {"perf": "Performance", "it": "IT", "amu_increment_gb": "AMU (model)", "al_s": "AL",
              "aec_w": "AEC", "mcr": "MCR"}


def fig5_precision_polar(tidy_df: pd.DataFrame, out_dir: str | Path,
                         records_root: str | Path | None = None) -> Drawn:
    """Fig. 5: polar stacked bars per precision; one sector per model; rings = metrics.

    Each ring is a metric normalised within one model across precisions (1 = best precision
    for that model), so the total radius reads as "how good is this precision for this model".
    """
    name, title = "fig5_precision_polar", "Fig. 5 - precision per model (stacked normalised)"
    wide = _wide(tidy_df, INFERENCE)
    ok = E.ok_rows(wide) if not wide.empty else wide
    if ok.empty or "p.precision" not in ok:
        return _done(name, _no_data_figure(title, _why_empty(tidy_df, INFERENCE,
                                                             "a precision")), out_dir)
    why = _one_device(ok)
    if why:
        return _done(name, _no_data_figure(title, why), out_dir)
    parts = []
    for _, s in ok.groupby("p.model", dropna=False):
        q = E.quality_metric(s, INFERENCE)
        s = s.assign(perf=s[q] if q else np.nan)
        agg = repeat_summary(s, ["perf", *POLAR_RINGS[1:]], ["p.model", "p.precision"])
        hib = {"perf": E.higher_is_better(q) if q else True}
        n = E.normalise(agg, POLAR_RINGS, hib)
        n[["p.model", "p.precision"]] = agg[["p.model", "p.precision"]]
        n["perf_metric"] = q or ""
        parts.append(n)
    norm = pd.concat(parts, ignore_index=True)
    precs = _order(norm["p.precision"], PRECISION_ORDER)
    models = _order(norm["p.model"], [])
    ncols = min(3, len(precs))
    nrows = math.ceil(len(precs) / ncols)
    fig, axs = _new(4.3 * ncols, 4.4 * nrows + 0.8, nrows, ncols, polar=True)
    pal = _palette(POLAR_RINGS, "Set2")
    width = 2 * np.pi / max(len(models), 1)
    theta = np.arange(len(models)) * width
    for k, ax in enumerate(axs.flat):
        if k >= len(precs):
            ax.set_visible(False)
            continue
        p = precs[k]
        d = norm[norm["p.precision"] == p].set_index("p.model").reindex(models)
        bottom = np.zeros(len(models))
        for r in POLAR_RINGS:
            h = d[r].fillna(0).to_numpy(float)
            ax.bar(theta, h, width=width * 0.85, bottom=bottom, color=pal[r], edgecolor="white",
                   linewidth=0.6, align="center")
            bottom += h
        has = d[POLAR_RINGS].notna().any(axis=1).to_numpy()
        ticks = [f"{_short(m, 16)}\n" + (f"total {tot:.1f}" if h else "(failed / no run)")
                 for m, tot, h in zip(models, bottom, has, strict=True)]
        ax.set_xticks(theta, ticks, fontsize=8.5)
        ax.tick_params(axis="x", pad=-4)
        circle = np.linspace(0, 2 * np.pi, 200)
        ax.plot(circle, np.full_like(circle, len(POLAR_RINGS)), ls=":", lw=0.8, color="0.6")
        ax.set_ylim(0, len(POLAR_RINGS) + 0.8)
        ax.set_yticks([])
        ax.spines["polar"].set_visible(False)
        ax.grid(False)
        ax.set_title(catalog.precision_label(p), fontsize=11, pad=14, fontweight="bold")
    qs = sorted(set(norm["perf_metric"]) - {""})
    handles = [Patch(color=pal[r], label=RING_LABEL[r] + (f" ({'/'.join(qs)})" if r == "perf"
                                                            and qs else "")) for r in POLAR_RINGS]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(POLAR_RINGS), fontsize=8.5,
               title="rings, inside out: each normalised within its model across precisions "
                     "(0.1-1, higher = better; stacked total 0.6-6; gap = not measured)",
               title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    return _done(name, fig, out_dir)
