"""Axis 4 figures, drawn from the tidy results table like the other axes' figures (PNG + PDF).

* ``fig6a_dit_attention``: the DiT attention x FFN comparison - bars of sample quality (the
  classifier-feature Fréchet distance, lower is better; the classifier's accuracy on samples)
  beside AL, sampling images/s, AMU and AEC, so quality and cost are read together.
* ``fig6b_peft_transfer``: per target model (ViT, VLM, DiT), each method's score (accuracy after
  adaptation; the DiT has no accuracy) above its eval loss, with the pre-adaptation loss marked.

Runs are selected by axis (``cross_modal``) and ``p.experiment``, not by study file name; several
seeds of one configuration are averaged.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.patches import Patch

from effllm_helpers.axes.spec import axis_of_figure
from effllm_helpers.report import scoring as E

from .common import Drawn, _ax_no_data, _done, _new, _no_data_figure, _palette

XM_AXIS = axis_of_figure("fig6a_dit_attention")[0].name
XM_ATTENTION_ORDER = ("mha", "mqa", "gqa", "mla")  # the DiT variants
TARGET_ORDER = ("vit", "vlm", "dit")
XM_METHOD_ORDER = ("lora", "dora", "loha", "lokr", "freeze", "full")
DIT_PANELS = (("frechet_classifier_distance", "Fréchet dist. (CNN features) ↓"),
              ("sample_class_accuracy", "classifier acc. on samples ↑"),
              ("al_s", "AL, s/step ↓"), ("sample_images_per_s", "sampling images/s ↑"),
              ("amu_gb", "AMU, GB ↓"), ("aec_w", "AEC, W ↓"))


def _xm_runs(tidy: pd.DataFrame | None, experiment: str) -> pd.DataFrame:
    """OK runs of this axis and experiment, one row per run, metrics as columns."""
    if tidy is None or tidy.empty:
        return pd.DataFrame()
    wide = E.wide_table(tidy, XM_AXIS)
    if wide.empty or "p.experiment" not in wide:
        return pd.DataFrame()
    return wide[(wide["status"] == "ok") & (wide["p.experiment"] == experiment)]


def _xm_ordered(values, pref) -> list:
    seen = list(dict.fromkeys(values))
    return [v for v in pref if v in seen] + [v for v in seen if v not in pref]


def fig6a_dit_attention(tidy: pd.DataFrame | None, out_dir: str | Path,
                        records_root: str | Path | None = None) -> Drawn:
    name, title = "fig6a_dit_attention", "DiT attention and MoE: sample quality and cost"
    runs = _xm_runs(tidy, "dit")
    if runs.empty:
        return _done(name, _no_data_figure(title, "no ok cross_modal dit runs"), out_dir)
    cols = [m for m, _ in DIT_PANELS if m in runs]
    agg = runs.groupby(["p.attention", "p.ffn"])[cols].mean().reset_index()
    atts = _xm_ordered(agg["p.attention"], XM_ATTENTION_ORDER)
    ffns = _xm_ordered(agg["p.ffn"], ("dense", "moe"))
    fig, axs = _new(3 * 4.2, 2 * 3.0, nrows=2, ncols=3)
    pal = _palette(ffns, "tab10")
    w = 0.8 / len(ffns)
    for ax, (m, label) in zip(axs.flat, DIT_PANELS, strict=True):
        if m not in agg or agg[m].isna().all():
            _ax_no_data(ax, f"{m} not recorded")
            ax.set_title(label, fontsize=9)
            continue
        for k, f in enumerate(ffns):
            ran = agg[agg["p.ffn"] == f].set_index("p.attention")
            a = ran.reindex(atts)
            x = np.arange(len(atts)) + (k - (len(ffns) - 1) / 2) * w
            vals = a[m].to_numpy(dtype=float)
            ax.bar(x, vals, w, color=pal[f], label=f)
            for xi, att in zip(x[np.isnan(vals)], np.asarray(atts)[np.isnan(vals)], strict=True):
                # a missing bar is not a zero: say whether the point ran
                ax.text(xi, 0, "not measured" if att in ran.index else "not run", rotation=90,
                        ha="center", va="bottom", fontsize=6, color="0.45")
        ax.set_xticks(range(len(atts)), atts, fontsize=9)
        ax.set_xlim(-0.5, len(atts) - 0.5)  # room for the last group, run or not
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=[Patch(color=pal[f], label=f) for f in ffns], title="FFN",
               loc="outside lower center", ncol=len(ffns), fontsize=8, title_fontsize=8,
               frameon=False)
    fig.suptitle(title + "\n(Fréchet distance in a small CNN classifier's feature space, "
                 "not FID)", fontsize=11)
    return _done(name, fig, out_dir)


def fig6b_peft_transfer(tidy: pd.DataFrame | None, out_dir: str | Path,
                        records_root: str | Path | None = None) -> Drawn:
    name, title = "fig6b_peft_transfer", "PEFT transfer: score and loss per method and model"
    runs = _xm_runs(tidy, "peft")
    if runs.empty:
        return _done(name, _no_data_figure(title, "no ok cross_modal peft runs"), out_dir)
    cols = [c for c in ("accuracy", "accuracy_before", "eval_loss", "eval_loss_before")
            if c in runs]
    agg = runs.groupby(["p.target", "p.method"])[cols].mean().reset_index()
    targets = _xm_ordered(agg["p.target"], TARGET_ORDER)
    methods = _xm_ordered(agg["p.method"], XM_METHOD_ORDER)
    pal = _palette(methods, "tab10")
    # wide enough for the title when only one model ran
    fig, axs = _new(max(6.0, 3.6 * len(targets)), 5.6, nrows=2, ncols=len(targets))
    for j, t in enumerate(targets):
        a = agg[agg["p.target"] == t].set_index("p.method").reindex(methods)
        for i, (m, label) in enumerate((("accuracy", "accuracy after ↑"),
                                        ("eval_loss", "eval loss after ↓"))):
            ax = axs[i, j]
            if m not in a or a[m].isna().all():
                # a DiT has no class to score: its quality is the loss row alone
                if t == "dit":
                    ax.text(0.5, 0.5, "not scored:\na generator has no class accuracy",
                            transform=ax.transAxes, ha="center", va="center", fontsize=9,
                            color="0.35")
                    ax.set_xticks([])
                    ax.set_yticks([])
                else:
                    _ax_no_data(ax, f"no {m} for {t}")
            else:
                ax.bar(range(len(methods)), a[m].to_numpy(dtype=float),
                       color=[pal[x] for x in methods])
                before = a.get(f"{m}_before")
                if before is not None and before.notna().any():
                    ax.axhline(float(before.mean()), color="0.3", ls="--", lw=1,
                               label="before adaptation")
                    ax.legend(fontsize=7, frameon=False)
                ax.set_xticks(range(len(methods)), methods, fontsize=8, rotation=30)
                ax.grid(axis="y", alpha=0.3)
            ax.set_title(f"{t}: {label}", fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _done(name, fig, out_dir)
