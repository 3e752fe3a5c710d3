"""Axis 1 (architecture): Figs. 3a-c, attention radar, positional bars, dense vs MoE bubbles;
each holds every setting but the one it compares at its reference."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from effllm_helpers import catalog
from effllm_helpers.axes.spec import axis_of_figure
from effllm_helpers.report import scoring as E

from .common import (
    LABEL,
    NORM_LABEL,
    Drawn,
    _agg_ci,
    _ax_no_data,
    _done,
    _fmt,
    _new,
    _no_data_figure,
    _one_device,
    _order,
    _palette,
    _scaled,
    _why_empty,
    _wide,
    figure_keys,
    repeat_summary,
    spread_note,
    studies_varying,
    unit,
)

# the axis each figure family draws, found through the spec by one of its figures' names, so
# that no figure names an axis of its own
ARCHITECTURE = axis_of_figure("fig3a_attention_radar")[0].name
ATTENTION_ORDER = catalog.ATTENTION  # orders are registration orders
POSITIONAL_ORDER = catalog.POSITIONAL
# reference of each architecture setting held fixed while another varies (None: the default,
# i.e. runs that leave it unset, else the most common value)
HOLD = {"p.model.attention": "gqa", "p.model.positional": "rope", "p.model.ffn": "dense",
        "p.model.family": "transformer", "p.model.d_ff_mult": None}


def _hold_fixed(wide: pd.DataFrame, vary: Sequence[str]) -> pd.DataFrame:
    """Architecture rows where every technique param except ``vary`` sits at its reference.

    Why: a radar of attention variants must not mix positional encodings or MoE runs; the
    reference is the paper's baseline (GQA, RoPE, dense, transformer) if present, else the mode.
    """
    out = E.ok_rows(wide)
    for col, ref in HOLD.items():
        if col in vary or col not in out or out.empty:
            continue
        if ref is None and out[col].isna().any():
            out = out[out[col].isna()]
            continue
        vals = out[col].dropna()
        if vals.empty:
            continue
        keep = ref if (vals == ref).any() else vals.mode().iloc[0]
        out = out[out[col] == keep]
    return out


def _arch_rows(tidy_df: pd.DataFrame | None, vary: Sequence[str],
               what: str) -> pd.DataFrame | str:
    """Ok architecture runs of the studies that vary ``vary[0]``, with every setting but
    ``vary`` held fixed, or why none.

    Why: other studies' runs (the moe study's dense baselines, attention_free's transformer)
    share settings with a study's runs but are not its seed repeats, so a figure keeps to the
    studies that vary its setting when there are any; it needs runs of one device and at least
    two distinct values of the varied setting to compare.
    """
    wide = _wide(tidy_df, ARCHITECTURE)
    if wide.empty or E.ok_rows(wide).empty:
        return _why_empty(tidy_df, ARCHITECTURE, what)
    studies = studies_varying(wide, vary[0])
    if studies:
        wide = wide[wide["study"].isin(studies)]
    why = _one_device(wide)
    if why:
        return why
    sub = _hold_fixed(wide, vary)
    key = vary[0]
    if sub.empty or key not in sub or sub[key].isna().all():
        return _why_empty(tidy_df, ARCHITECTURE, what)
    cols = [c for c in vary if c in sub]
    cfgs = sub[cols].astype(str).where(sub[cols].notna(), "").drop_duplicates()
    if len(cfgs) < 2:
        only = ", ".join(" ".join(v for v in row if v) for row in cfgs.itertuples(index=False))
        return f"only {only} in the runs (need two {key.rsplit('.', 1)[-1]} settings)"
    return sub


# ---------------------------------------------------------------- Fig. 3a
RADAR_METRICS = ["val_ppl", "amu_gb", "al_s", "tt", "aec_w"]


def fig3a_attention_radar(tidy_df: pd.DataFrame, out_dir: str | Path,
                          records_root: str | Path | None = None) -> Drawn:
    """Fig. 3a: a radar per model size; axes PPL, AMU, AL, TT, AEC; one series per attention."""
    name, title = "fig3a_attention_radar", "Fig. 3a - attention variants per model size"
    sub = _arch_rows(tidy_df, figure_keys(name), "an attention variant")
    if isinstance(sub, str):
        return _done(name, _no_data_figure(title, sub), out_dir)
    sizes = _order(sub["p.model.size"], ["small", "medium", "large"])
    attns = _order(sub["p.model.attention"], ATTENTION_ORDER)
    pal = _palette(attns)
    fig, axs = _new(4.6 * len(sizes), 5.2, 1, len(sizes), polar=True)
    angles = np.linspace(0, 2 * np.pi, len(RADAR_METRICS), endpoint=False)
    for ax, size in zip(axs[0], sizes, strict=True):
        agg = repeat_summary(sub[sub["p.model.size"] == size], RADAR_METRICS,
                             ["p.model.attention"])
        present = [m for m in RADAR_METRICS if agg[m].notna().any()]
        if agg.empty or not present:
            _ax_no_data(ax, f"no metrics for size {size}")
            continue
        norm = E.normalise(agg, RADAR_METRICS, ci=_agg_ci(agg, RADAR_METRICS))
        for i, a in enumerate(agg["p.model.attention"]):
            vals = norm.iloc[i].to_numpy(float)  # NaN (not measured) leaves a gap
            ang = np.r_[angles, angles[0]]
            ax.plot(ang, np.r_[vals, vals[0]], color=pal[a], linewidth=1.8, marker="o",
                    markersize=3, label=str(a).upper())
            if np.isfinite(vals).all():
                ax.fill(ang, np.r_[vals, vals[0]], color=pal[a], alpha=0.08)
        labels = []
        for m in RADAR_METRICS:
            x = agg[m].dropna()
            rng = f"{_fmt(x.min())}-{_fmt(x.max())} {unit(tidy_df, m)}" if len(x) \
                else "not measured"
            nd = spread_note(agg, m)
            labels.append(f"{LABEL[m]}\n{rng}" + (f"\n({nd})" if nd else ""))
        ax.set_xticks(angles, labels, fontsize=8)
        ax.tick_params(axis="x", pad=14)
        ax.set_ylim(0, 1.05)
        ax.set_yticks([0.25, 0.5, 0.75, 1.0], ["0.25", "0.5", "0.75", "1"], fontsize=7,
                      color="0.4")
        ax.set_rlabel_position(90 / len(RADAR_METRICS))
        n_runs = int(agg[[f"{m}_n" for m in RADAR_METRICS]].max(axis=1).sum())
        ax.set_title(f"size: {size}  ({n_runs} runs)", fontsize=10, pad=22)
    handles = [Line2D([], [], color=pal[a], linewidth=2, label=str(a).upper()) for a in attns]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(attns), fontsize=9,
               title=f"attention; radius = {NORM_LABEL}; raw range under each axis",
               title_fontsize=8)
    fig.suptitle(title, fontsize=12)
    return _done(name, fig, out_dir)


# ---------------------------------------------------------------- Fig. 3b
BAR_METRICS = ["amu_gb", "al_s", "tt", "aec_w"]


def fig3b_positional_bars(tidy_df: pd.DataFrame, out_dir: str | Path,
                          records_root: str | Path | None = None) -> Drawn:
    """Fig. 3b: grouped bars per positional encoding (AMU, AL, TT, AEC) with a PPL line."""
    name, title = "fig3b_positional_bars", "Fig. 3b - positional encodings"
    sub = _arch_rows(tidy_df, figure_keys(name), "a positional encoding")
    if isinstance(sub, str):
        return _done(name, _no_data_figure(title, sub), out_dir)
    counts = sub.groupby("p.model.size")["p.model.positional"].nunique()
    sizes = [s for s in _order(counts.index, ["small", "medium", "large"]) if counts[s] > 1] \
        or _order(counts.index, ["small", "medium", "large"])
    fig, axs = _new(max(6.5, 1.6 * sub["p.model.positional"].nunique() + 2) * len(sizes) ** .5,
                    4.3 * len(sizes), len(sizes), 1)
    pal = _palette(BAR_METRICS)
    for ax, size in zip(axs[:, 0], sizes, strict=True):
        s = sub[sub["p.model.size"] == size]
        agg = repeat_summary(s, [*BAR_METRICS, "val_ppl"], ["p.model.positional"])
        order = _order(agg["p.model.positional"], POSITIONAL_ORDER)
        agg = agg.set_index("p.model.positional").loc[order].reset_index()
        norm, ci = _scaled(agg, [*BAR_METRICS, "val_ppl"])
        x = np.arange(len(agg))
        w = 0.8 / len(BAR_METRICS)
        for k, m in enumerate(BAR_METRICS):
            err = ci[m].fillna(0).to_numpy()
            ax.bar(x + (k - (len(BAR_METRICS) - 1) / 2) * w, norm[m].fillna(0), w,
                   yerr=err if err.any() else None, capsize=2, color=pal[m],
                   label=f"{LABEL[m]} ({_fmt(agg[m].min())}-{_fmt(agg[m].max())} "
                         f"{unit(tidy_df, m)})" if agg[m].notna().any()
                   else f"{LABEL[m]} (not measured)")
        ax.plot(x, norm["val_ppl"], color="black", marker="o", linewidth=2,
                label=f"PPL ({_fmt(agg['val_ppl'].min())}-{_fmt(agg['val_ppl'].max())})")
        for xi, v in zip(x, agg["val_ppl"], strict=True):
            ax.annotate(f"ppl {_fmt(v)}", (xi, 1.07), ha="center", fontsize=7.5, color="0.2")
        ax.set_xticks(x, [str(p) for p in agg["p.model.positional"]], fontsize=9)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel(NORM_LABEL, fontsize=9)
        ax.set_title(f"size: {size}", fontsize=10)
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
                  title="metric (raw range)", title_fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=12)
    return _done(name, fig, out_dir)


# ---------------------------------------------------------------- Fig. 3c
def fig3c_moe_bubbles(tidy_df: pd.DataFrame, out_dir: str | Path,
                      records_root: str | Path | None = None) -> Drawn:
    """Fig. 3c: dense vs MoE; x = normalised value, y = metric rows, bubble area ∝ params."""
    name, title = "fig3c_moe_bubbles", "Fig. 3c - dense vs mixture-of-experts"
    sub = _arch_rows(tidy_df, figure_keys(name), "both dense and MoE FFNs")
    if isinstance(sub, str):
        return _done(name, _no_data_figure(title, sub), out_dir)
    by = [c for c in ("p.model.ffn", "p.model.d_ff_mult", "p.model.size") if c in sub]
    agg = repeat_summary(sub, [*RADAR_METRICS, "params_total"], by)
    agg = agg.sort_values(by).reset_index(drop=True)
    norm = E.normalise(agg, RADAR_METRICS)
    mult = agg["p.model.d_ff_mult"] if "p.model.d_ff_mult" in agg \
        else pd.Series(np.nan, index=agg.index)
    labels = [f"{f}{'' if pd.isna(k) else f' (FFN x{k:g})'} {s}"
              for f, k, s in zip(agg["p.model.ffn"], mult, agg["p.model.size"], strict=True)]
    pal = _palette(labels)
    params = pd.to_numeric(agg["params_total"], errors="coerce")
    known = params.dropna()
    # a run without a recorded param count gets a fixed small bubble, never an invented count
    area = (80 + 900 * params / known.max()).fillna(60.0) if len(known) else \
        pd.Series(60.0, index=agg.index)
    fig, axs = _new(8.5, 4.8)
    ax = axs[0, 0]
    nm = len(agg)
    for i, lab in enumerate(labels):
        off = (i - (nm - 1) / 2) * 0.6 / max(nm, 1)
        ys = np.arange(len(RADAR_METRICS)) + off
        ax.scatter(norm.iloc[i], ys, s=area.iloc[i], color=pal[lab], alpha=0.65,
                   edgecolor="black", linewidth=0.6,
                   label=f"{lab} ({_fmt(params.iloc[i] / 1e6)} M params)"
                   if pd.notna(params.iloc[i]) else f"{lab} (params n/a)")
    ylab = []
    for m in RADAR_METRICS:
        x = agg[m].dropna()
        ylab.append(f"{LABEL[m]}\n{_fmt(x.min())}-{_fmt(x.max())} {unit(tidy_df, m)}"
                    if len(x) else f"{LABEL[m]}\nnot measured")
    ax.set_yticks(range(len(RADAR_METRICS)), ylab, fontsize=8.5)
    ax.set_ylim(-0.7, len(RADAR_METRICS) - 0.3)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(NORM_LABEL + " - raw range under each metric", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False,
              title="model (bubble area ∝ total params)", title_fontsize=8, labelspacing=1.6,
              markerscale=0.5)
    fig.suptitle(title, fontsize=12)
    return _done(name, fig, out_dir)
