"""Axis 4 figures, drawn from the tidy results table like ``figures.py`` (PNG + PDF).

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

from . import figures as F
from .measure import efficiency as E

AXIS = "cross_modal"
ATTENTION_ORDER = ("mha", "mqa", "gqa", "mla")
TARGET_ORDER = ("vit", "vlm", "dit")
METHOD_ORDER = ("lora", "dora", "loha", "lokr", "freeze", "full")
DIT_PANELS = (("frechet_classifier_distance", "Fréchet dist. (CNN features) ↓"),
              ("sample_class_accuracy", "classifier acc. on samples ↑"),
              ("al_s", "AL, s/step ↓"), ("sample_images_per_s", "sampling images/s ↑"),
              ("amu_gb", "AMU, GB ↓"), ("aec_w", "AEC, W ↓"))


def _runs(tidy: pd.DataFrame | None, experiment: str) -> pd.DataFrame:
    """OK runs of this axis and experiment, one row per run, metrics as columns."""
    if tidy is None or tidy.empty:
        return pd.DataFrame()
    wide = E.wide_table(tidy, AXIS)
    if wide.empty or "p.experiment" not in wide:
        return pd.DataFrame()
    return wide[(wide["status"] == "ok") & (wide["p.experiment"] == experiment)]


def _ordered(values, pref) -> list:
    seen = list(dict.fromkeys(values))
    return [v for v in pref if v in seen] + [v for v in seen if v not in pref]


def fig6a_dit_attention(tidy: pd.DataFrame | None, out_dir: str | Path) -> F.Drawn:
    name, title = "fig6a_dit_attention", "DiT attention and MoE: sample quality and cost"
    runs = _runs(tidy, "dit")
    if runs.empty:
        return F._done(name, F._no_data_figure(title, "no ok cross_modal dit runs"), out_dir)
    cols = [m for m, _ in DIT_PANELS if m in runs]
    agg = runs.groupby(["p.attention", "p.ffn"])[cols].mean().reset_index()
    atts = _ordered(agg["p.attention"], ATTENTION_ORDER)
    ffns = _ordered(agg["p.ffn"], ("dense", "moe"))
    fig, axs = F._new(3 * 4.2, 2 * 3.0, nrows=2, ncols=3)
    pal = F._palette(ffns, "tab10")
    w = 0.8 / len(ffns)
    for ax, (m, label) in zip(axs.flat, DIT_PANELS, strict=True):
        if m not in agg or agg[m].isna().all():
            F._ax_no_data(ax, f"{m} not recorded")
            ax.set_title(label, fontsize=9)
            continue
        for k, f in enumerate(ffns):
            a = agg[agg["p.ffn"] == f].set_index("p.attention").reindex(atts)
            x = np.arange(len(atts)) + (k - (len(ffns) - 1) / 2) * w
            ax.bar(x, a[m].to_numpy(dtype=float), w, color=pal[f], label=f)
        ax.set_xticks(range(len(atts)), atts, fontsize=9)
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axs.flat[0].legend(title="FFN", fontsize=8, title_fontsize=8, frameon=False)
    fig.suptitle(title + "\n(Fréchet distance in a small CNN classifier's feature space, "
                 "not FID)", fontsize=11)
    return F._done(name, fig, out_dir)


def fig6b_peft_transfer(tidy: pd.DataFrame | None, out_dir: str | Path) -> F.Drawn:
    name, title = "fig6b_peft_transfer", "PEFT transfer: score and loss per method and model"
    runs = _runs(tidy, "peft")
    if runs.empty:
        return F._done(name, F._no_data_figure(title, "no ok cross_modal peft runs"), out_dir)
    cols = [c for c in ("accuracy", "accuracy_before", "eval_loss", "eval_loss_before")
            if c in runs]
    agg = runs.groupby(["p.target", "p.method"])[cols].mean().reset_index()
    targets = _ordered(agg["p.target"], TARGET_ORDER)
    methods = _ordered(agg["p.method"], METHOD_ORDER)
    pal = F._palette(methods, "tab10")
    fig, axs = F._new(3.6 * len(targets), 5.6, nrows=2, ncols=len(targets))
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
                    F._ax_no_data(ax, f"no {m} for {t}")
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
    return F._done(name, fig, out_dir)


def draw_all(tidy: pd.DataFrame | None, out_dir: str | Path) -> list[F.Drawn]:
    return [fig6a_dit_attention(tidy, out_dir), fig6b_peft_transfer(tidy, out_dir)]
