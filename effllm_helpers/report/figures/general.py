"""The figures drawn over every axis: the rank table (Fig. 2), Pareto fronts, loss curves, repeat
error bars; and a run's own curves for its notebook (``run_curves``, ``show``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from effllm_helpers import results as R
from effllm_helpers.report import scoring as E

from .common import (
    LABEL,
    Drawn,
    _ax_no_data,
    _config_cols,
    _done,
    _new,
    _no_data_figure,
    _order,
    _palette,
    _short,
    _wide,
    axis_label,
    plain_text,
    repeat_summary,
)

TIER_COLOURS = {"best": "#1a9850", "top": "#a6d96a", "middle": "#fee08b", "bottom": "#f46d43",
                "n/a": "#eeeeee"}


# ---------------------------------------------------------------- Fig. 2
def _tier(rank: Any, n: int) -> str:
    if rank is None or pd.isna(rank):
        return "n/a"
    if rank == 1:
        return "best"
    pos = (rank - 1) / max(n - 1, 1)
    return "top" if pos <= 1 / 3 else ("middle" if pos <= 2 / 3 else "bottom")


def fig2_rank_table(tidy_df: pd.DataFrame, out_dir: str | Path,
                    records_root: str | Path | None = None) -> Drawn:
    """Fig. 2: techniques x metrics rank table per axis and study; 1 = best; tier colours."""
    name, title = "fig2_rank_table", "Fig. 2 - rank of each technique per metric (1 = best)"
    rt = E.rank_table(tidy_df) if tidy_df is not None and not tidy_df.empty else pd.DataFrame()
    if rt.empty:
        why = ("the results table is empty (no runs collected)" if tidy_df is None
               or tidy_df.empty else "no successful runs with metrics to rank")
        return _done(name, _no_data_figure(title, why), out_dir)
    axis_order = {a: i for i, a in enumerate(E.STUDY_AXES)}
    rt = (rt.assign(_a=rt["axis"].map(axis_order).fillna(9), _s=-rt["score"].fillna(-1))
          .sort_values(["_a", "study", "_s", "technique"]).drop(columns=["_a", "_s"])
          .reset_index(drop=True))
    cols = list(E.RANK_COLUMNS)
    n = len(rt)
    fig, axs = _new(9.5, 1.6 + 0.32 * n)
    ax = axs[0, 0]
    colour = np.ones((n, len(cols) + 1, 3))
    for i, row in rt.reset_index(drop=True).iterrows():
        for j, c in enumerate(cols):
            t = _tier(row[c], int(row["n_techniques"]))
            colour[i, j] = matplotlib.colors.to_rgb(TIER_COLOURS[t])
            tied = c in str(row.get("ties", "")).split(",")
            txt = "–" if pd.isna(row[c]) else f"{'=' if tied else ''}{int(row[c])}"
            if c == "Perf" and row.get("flag"):
                txt = "✗"  # quality flagged (e.g. perplexity worse than uniform): not ranked
            ax.text(j, i, txt, ha="center", va="center", fontsize=9)
        sc = row["score"]
        colour[i, -1] = matplotlib.colors.to_rgb("#d9e6f2" if pd.notna(sc) else "#eeeeee")
        ax.text(len(cols), i, "–" if pd.isna(sc) else f"{sc:.2f}", ha="center", va="center",
                fontsize=9)
    ax.imshow(colour, aspect="auto", interpolation="nearest")
    perf = {a: ", ".join(sorted(set(rt.loc[rt["axis"] == a, "perf_metric"]) - {""}))
            for a in rt["axis"].unique()}
    ax.set_xticks(range(len(cols) + 1), [*cols, "Eff.\nscore"], fontsize=9)
    ax.xaxis.tick_top()
    ax.set_yticks(range(n), [f"{r.axis} · {r.study}:  {r.technique}"
                             for r in rt.itertuples()], fontsize=8.5)
    ax.set_xticks(np.arange(-0.5, len(cols) + 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    keys = list(zip(rt["axis"], rt["study"], strict=True))
    for i in range(1, n):
        if keys[i] != keys[i - 1]:
            ax.axhline(i - 0.5, color="black", linewidth=1.5)
    for s in ax.spines.values():
        s.set_visible(False)
    handles = [Patch(color=c, label=t) for t, c in TIER_COLOURS.items()]
    fig.legend(handles=handles, loc="outside lower center", ncol=5, fontsize=8,
               title="tier (rank relative to the techniques compared)", title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    note = "; ".join(f"{a}: Perf = {p}" for a, p in perf.items() if p)
    ax.set_xlabel(f"{note}.\nRanks from metrics scaled within each comparison set, averaged "
                  "over sets; '–' = not measured for that axis;\n'=k' = tied (difference "
                  "inside the 95 % intervals); '✗' = quality not ranked (perplexity worse "
                  "than uniform).\nEff. score = mean efficiency score (0.1-1).", fontsize=8)
    return _done(name, fig, out_dir)


# ---------------------------------------------------------------- Pareto fronts
def pareto_mask(x: Sequence[float], y: Sequence[float], y_higher_better: bool) -> np.ndarray:
    """True for points no other point beats on both x (lower better) and y."""
    x = np.asarray(x, float)
    y = np.asarray(y, float) * (1 if y_higher_better else -1)
    keep = np.ones(len(x), bool)
    for i in range(len(x)):
        dom = (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        keep[i] = not dom.any()
    return keep


def _pareto_panel(ax: Axes, tidy: pd.DataFrame, wide: pd.DataFrame, axis: str,
                  xm: str | None, what: str) -> None:
    ok = E.ok_rows(wide)
    q = E.quality_metric(ok, axis)
    if ok.empty or q is None or xm is None:
        _ax_no_data(ax, f"no {axis} runs with quality and {what}")
        ax.set_title(f"{axis}: quality vs {what}", fontsize=10)
        return
    cfg = _config_cols(ok)
    varying = [c for c in cfg if ok[c].astype(str).nunique() > 1]
    agg = repeat_summary(ok, [q, xm], varying)
    agg = agg.dropna(subset=[q, xm]).reset_index(drop=True)
    colour_by = next((c for c in E.COMPARISON_KEYS.get(axis, ()) if c.startswith("p.")
                      and c in varying), None)
    if agg.empty:
        _ax_no_data(ax, f"{LABEL.get(q, q)} or {LABEL.get(xm, xm)} null in every run")
        ax.set_title(f"{axis}: quality vs {what}", fontsize=10)
        return
    lab = (agg[varying].astype(str).map(_short).agg(" ".join, axis=1) if varying
           else pd.Series(["run"] * len(agg)))
    front = pareto_mask(agg[xm], agg[q], E.higher_is_better(q))
    groups = _order(agg[colour_by], ["small", "medium", "large"]) if colour_by else ["all"]
    pal = _palette(groups)
    for g in groups:
        m = (agg[colour_by] == g).to_numpy() if colour_by else np.ones(len(agg), bool)
        ax.errorbar(agg.loc[m, xm], agg.loc[m, q], xerr=agg.loc[m, f"{xm}_ci95"].fillna(0),
                    yerr=agg.loc[m, f"{q}_ci95"].fillna(0), fmt="o", color=pal[g], alpha=0.6,
                    markersize=5, capsize=2, label=_short(g, 22) if colour_by else "runs")
    f = agg[front].sort_values(xm)
    ax.step(f[xm], f[q], where="post", color="black", linewidth=1.2, alpha=0.8)
    ax.scatter(f[xm], f[q], s=80, facecolor="none", edgecolor="black", linewidth=1.5,
               zorder=3, label="Pareto front")
    extra = []  # front points get a number on the plot and their name in the legend
    for k, i in enumerate(f.index, start=1):
        ax.annotate(str(k), (agg.loc[i, xm], agg.loc[i, q]), fontsize=7.5, fontweight="bold",
                    xytext=(5, 4), textcoords="offset points")
        extra.append(Line2D([], [], linestyle="none", label=f"{k}: {_short(lab[i], 30)}"))
    xs = agg[xm]
    if xs.min() > 0 and xs.max() / xs.min() > 30:
        ax.set_xscale("log")
    ax.set_xlabel(axis_label(tidy, xm), fontsize=9)
    ax.set_ylabel(axis_label(tidy, q), fontsize=9)
    ax.set_title(f"{axis}: quality vs {what}", fontsize=10)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    ax.legend(handles=handles + extra, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1),
              frameon=False, title=LABEL_KEY.get(colour_by or "", None), title_fontsize=7,
              handlelength=1.2)


LABEL_KEY = {"p.model.size": "model size", "p.base_model": "base model", "p.model": "model"}


def fig_pareto_fronts(tidy_df: pd.DataFrame, out_dir: str | Path,
                      records_root: str | Path | None = None) -> Drawn:
    """Ours: Pareto fronts per axis of quality vs energy and quality vs memory (front circled)."""
    name, title = "pareto_fronts", "Pareto fronts - quality vs energy and memory"
    if tidy_df is None or tidy_df.empty:
        return _done(name, _no_data_figure(title, "the results table is empty (no runs "
                                           "collected)"), out_dir)
    axes = [a for a in E.STUDY_AXES if a in set(tidy_df["axis"].dropna())]
    if not axes:
        return _done(name, _no_data_figure(title, "no runs of the study axes"), out_dir)
    fig, axs = _new(14, 3.9 * len(axes), len(axes), 2)
    for row, axis in zip(axs, axes, strict=True):
        wide = _wide(tidy_df, axis)
        energy = next((m for m in ("energy_j", "j_per_token", "aec_w")
                       if m in wide and wide[m].notna().any()), None)
        mem = "amu_gb" if "amu_gb" in wide and wide["amu_gb"].notna().any() else None
        _pareto_panel(row[0], tidy_df, wide, axis, energy, "energy")
        _pareto_panel(row[1], tidy_df, wide, axis, mem, "memory")
    fig.suptitle(title + " (black circles/step line = non-dominated runs; ±95 % CI over seeds)",
                 fontsize=11)
    return _done(name, fig, out_dir)


# ---------------------------------------------------------------- curves
def fig_loss_curves(tidy_df: pd.DataFrame, out_dir: str | Path,
                    records_root: str | Path | None = None) -> Drawn:
    """Ours: training loss vs tokens and vs joules, one line per run, a row per study."""
    name, title = "loss_curves", "Training loss vs tokens and vs energy"
    if records_root is None or not Path(records_root).exists():
        return _done(name, _no_data_figure(title, "no records folder given (curves live in "
                                           "record.json)"), out_dir)
    wide = _wide(tidy_df, None)  # every axis: label each curve with its technique
    tech = dict(zip(wide.get("run_id", []), wide.get("technique", []), strict=True))
    size = dict(zip(wide.get("run_id", []), wide.get("p.model.size", [""] * len(wide)),
                    strict=True)) if "p.model.size" in wide else {}
    curves: list[tuple[str, str, dict]] = []
    for _, rec in R.iter_records(records_root):
        c = rec.get("curves") or {}
        if rec.get("status") == "ok" and any(k in c for k in ("loss_vs_tokens",
                                                               "loss_vs_joules")):
            curves.append((str(rec.get("study")), str(rec.get("run_id")), c))
    if not curves:
        return _done(name, _no_data_figure(title, "no run record has loss curves"), out_dir)
    studies = _order([s for s, _, _ in curves], [])
    fig, axs = _new(11, 3.4 * len(studies), len(studies), 2)
    for row, study in zip(axs, studies, strict=True):
        runs = [(r, c) for s, r, c in curves if s == study]
        labels = [f"{tech.get(r, r)} {'' if pd.isna(size.get(r)) else size.get(r)}".strip()
                  for r, _ in runs]
        pal = _palette(_order(labels, []), "tab10")
        for j, key in enumerate(("loss_vs_tokens", "loss_vs_joules")):
            ax = row[j]
            seen: set[str] = set()
            drawn = False
            for (_rid, c), lab in zip(runs, labels, strict=True):
                cur = c.get(key)
                if not cur or not cur.get("x"):
                    continue
                ax.plot(cur["x"], cur["y"], color=pal[lab], linewidth=1.3, alpha=0.85,
                        label=None if lab in seen else lab)
                seen.add(lab)
                drawn = True
                xu, yu = cur.get("x_unit", ""), cur.get("y_unit", "")
                ax.set_xlabel(("tokens seen" if key.endswith("tokens") else "energy")
                              + (f" ({xu})" if xu else ""), fontsize=9)
                ax.set_ylabel("training loss" + (f" ({yu})" if yu else ""), fontsize=9)
            if not drawn:
                _ax_no_data(ax, f"no {key.replace('_', ' ')} curve in study {study}")
            else:
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7, frameon=False, ncol=2 if len(seen) > 6 else 1)
            ax.set_title(f"{study}: {key.replace('_', ' ')}", fontsize=10)
    fig.suptitle(title, fontsize=12)
    return _done(name, fig, out_dir)


def run_curves(curves: dict[str, Any], title: str = "") -> Figure:
    """One run's training curves for its notebook: loss vs tokens (train and any evaluation
    curve) beside loss vs joules, which says why it is empty where energy is not measured."""
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    ax_t, ax_j = fig.subplots(1, 2)
    for key, label, style in (("loss_vs_tokens", "train", "-"),
                              ("val_loss_vs_tokens", "validation", "o-"),
                              ("eval_loss_vs_tokens", "eval", "o-")):
        c = curves.get(key)
        if c and c.get("x"):
            ax_t.plot(c["x"], c["y"], style, label=label)
    ax_t.set(xlabel="tokens", ylabel="loss (nats/token)", title=f"{title} loss vs tokens".strip())
    ax_t.legend(frameon=False)
    j = curves.get("loss_vs_joules") or {}
    if j.get("x"):
        ax_j.plot(j["x"], j["y"])
    else:
        _ax_no_data(ax_j, "no energy measured here:\n" + j.get("reason", "no curve"))
    ax_j.set(xlabel="energy (J)", ylabel="loss (nats/token)", title="loss vs joules")
    return fig


def show(fig: Figure, dpi: int = 110) -> Any:
    """A notebook-displayable PNG of ``fig``: our figures are built on Agg without pyplot, so
    the kernel's inline backend never sees them."""
    import io

    from IPython.display import Image

    buf = io.BytesIO()
    plain_text(fig).savefig(buf, format="png", dpi=dpi)
    return Image(data=buf.getvalue(), format="png")


# ---------------------------------------------------------------- repeats
# the four panels per axis (quality first), from the axis specs
REPEAT_METRICS: dict[str, list[str]] = {a: list(E.spec_of(a).repeat_metrics)
                                        for a in E.STUDY_AXES}


def fig_repeat_error_bars(tidy_df: pd.DataFrame, out_dir: str | Path,
                          records_root: str | Path | None = None) -> Drawn:
    """Ours: key metrics per configuration, mean ± 95 % CI over seeds (n beside each bar)."""
    name, title = "repeat_error_bars", "Key metrics per configuration, mean ± 95 % CI"
    if tidy_df is None or tidy_df.empty:
        return _done(name, _no_data_figure(title, "the results table is empty (no runs "
                                           "collected)"), out_dir)
    axes = [a for a in REPEAT_METRICS if a in set(tidy_df["axis"].dropna())]
    wides = {a: E.ok_rows(_wide(tidy_df, a)) for a in axes}
    axes = [a for a in axes if not wides[a].empty]
    if not axes:
        return _done(name, _no_data_figure(title, "no successful runs"), out_dir)
    aggs, labels = {}, {}
    for a in axes:
        w = wides[a]
        cfg = [c for c in _config_cols(w) if w[c].astype(str).nunique() > 1]
        agg = repeat_summary(w, REPEAT_METRICS[a], cfg)
        aggs[a] = agg
        labels[a] = (agg[cfg].astype(str).map(_short).agg(" · ".join, axis=1) if cfg
                     else pd.Series(["all"] * len(agg)))
    heights = [max(2.2, 0.24 * len(aggs[a]) + 1.0) for a in axes]
    fig = Figure(figsize=(13, sum(heights) + 0.8), layout="constrained")
    axs = fig.subplots(len(axes), 4, squeeze=False, gridspec_kw={"height_ratios": heights})
    for row, a in zip(axs, axes, strict=True):
        agg, lab = aggs[a], labels[a]
        y = np.arange(len(agg))
        for j, m in enumerate(REPEAT_METRICS[a]):
            ax = row[j]
            if m not in agg or agg[m].isna().all():
                _ax_no_data(ax, f"{LABEL.get(m, m)} not measured in any run")
                ax.set_title(f"{a}: {LABEL.get(m, m)}", fontsize=9)
                continue
            e = agg[f"{m}_ci95"].fillna(0).to_numpy()
            ax.barh(y, agg[m].fillna(0), xerr=e if e.any() else None, capsize=2,
                    color=sns.color_palette("colorblind")[j], alpha=0.8)
            for yi, (v, n, c) in enumerate(zip(agg[m], agg[f"{m}_n"], e, strict=True)):
                if pd.notna(v):
                    ax.text(v + c, yi, f"  n={n}", va="center", fontsize=6.5, color="0.3")
            ax.set_yticks(y, lab if j == 0 else [""] * len(y), fontsize=7)
            ax.invert_yaxis()
            ax.set_xlabel(axis_label(tidy_df, m), fontsize=8)
            ax.set_title(f"{a}: {LABEL.get(m, m)}", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
            ax.margins(x=0.15)
    fig.suptitle(title + " over seeds (runs with the same params except the seed); "
                 "n = number of runs", fontsize=11)
    return _done(name, fig, out_dir)
