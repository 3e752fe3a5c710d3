"""Axis 2 (fine-tuning): Figs. 4a-b, PEFT methods' efficiency score beside their eval loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from effllm_helpers import catalog
from effllm_helpers.axes.spec import axis_of_figure
from effllm_helpers.report import scoring as E

from .common import (
    LABEL,
    Drawn,
    _ax_no_data,
    _done,
    _new,
    _no_data_figure,
    _one_device,
    _order,
    _palette,
    _short,
    _why_empty,
    _wide,
    axis_label,
    repeat_summary,
)

# the axis this figure family draws, found through the spec by one of its figures' names
FINETUNING = axis_of_figure("fig4a_peft_score_loss")[0].name
METHOD_ORDER = catalog.FINETUNE_METHODS


# ---------------------------------------------------------------- Fig. 4
def _peft_scores(wide: pd.DataFrame) -> pd.DataFrame:
    """Per (base model, method): efficiency score over AMU, PCU, AL, ST, AEC and eval loss."""
    ok = E.ok_rows(wide).copy()
    # a panel per (base model, task): runs on different tasks are not repeats of each other
    if "p.task" in ok:
        ok["p.base_model"] = ok["p.base_model"].astype(str) + " · " + ok["p.task"].astype(str)
    if "technique" in ok:  # names every setting varied in the study (QLoRA: "lora+nf4")
        ok["p.method"] = ok["technique"]
    ms = [m for m in E.EFFICIENCY_METRICS[FINETUNING] if m in ok]
    sets = E.scores_by_set(ok, FINETUNING, metrics=ms)
    ok["score"] = sets["score"]
    loss = "eval_loss" if "eval_loss" in ok and ok["eval_loss"].notna().any() else None
    agg = repeat_summary(ok, ["score"] + ([loss] if loss else []), ["p.base_model", "p.method"])
    agg["loss_metric"] = loss or ""
    left_out = sorted({m for v in sets["not_ranking"] for m in str(v).split(",") if m})
    agg.attrs["score_metrics"] = [m for m in ms if ok[m].notna().any() and m not in left_out]
    agg.attrs["not_ranking"] = left_out
    return agg


def _score_over(agg: pd.DataFrame) -> str:
    """What the PEFT score is over, and which metric was left out of it and why (a metric that
    does not spread beyond its noise, e.g. a CPU's PCU: :func:`scoring.spread_note`)."""
    used = ", ".join(LABEL.get(m, m) for m in agg.attrs.get("score_metrics", []))
    out = agg.attrs.get("not_ranking", [])
    why = (f"; {', '.join(LABEL.get(m, m) for m in out)} left out: spread within its noise, "
           "it does not rank the methods here" if out else "")
    return f"score over {used}{why}"


def _peft_panels(tidy_df: pd.DataFrame) -> tuple[pd.DataFrame, list, list] | str:
    """(scores per base x method, base panels, methods in paper order), or why there is none."""
    wide = _wide(tidy_df, FINETUNING)
    if wide.empty or E.ok_rows(wide).empty or "p.method" not in wide:
        return _why_empty(tidy_df, FINETUNING, "a method")
    why = _one_device(wide)
    if why:
        return why
    agg = _peft_scores(wide)
    return agg, _order(agg["p.base_model"], []), _order(agg["p.method"], METHOD_ORDER)


def fig4a_peft_score_loss(tidy_df: pd.DataFrame, out_dir: str | Path,
                          records_root: str | Path | None = None) -> Drawn:
    """Fig. 4a: per base model, efficiency-score bars up and mirrored eval-loss bars down."""
    name, title = "fig4a_peft_score_loss", "Fig. 4a - PEFT methods: efficiency score and loss"
    peft = _peft_panels(tidy_df)
    if isinstance(peft, str):
        return _done(name, _no_data_figure(title, peft), out_dir)
    agg, bases, methods = peft
    pal = _palette(methods, "tab10")
    fig = Figure(figsize=(max(7, 1.2 * len(bases) * len(methods) / 3 + 3), 6.2),
                 layout="constrained")
    up, down = fig.subplots(2, 1, sharex=True, gridspec_kw={"hspace": 0})
    w = 0.8 / len(methods)
    for k, m in enumerate(methods):
        a = agg[agg["p.method"] == m].set_index("p.base_model").reindex(bases)
        x = np.arange(len(bases)) + (k - (len(methods) - 1) / 2) * w
        e = a["score_ci95"].fillna(0).to_numpy()
        up.bar(x, a["score"].fillna(0), w, color=pal[m], label=m,
               yerr=e if e.any() else None, capsize=2)
        if agg["loss_metric"].iloc[0]:
            lm = agg["loss_metric"].iloc[0]
            e = a[f"{lm}_ci95"].fillna(0).to_numpy()
            down.bar(x, a[lm].fillna(0), w, color=pal[m], alpha=0.55, hatch="//",
                     edgecolor=pal[m], yerr=e if e.any() else None, capsize=2)
    up.set_ylim(0, 1.05)
    up.set_ylabel("efficiency score\n(0.1-1, higher = better)", fontsize=9)
    up.grid(axis="y", alpha=0.3)
    lm = agg["loss_metric"].iloc[0]
    if lm:
        down.invert_yaxis()
        down.set_ylabel(f"{axis_label(tidy_df, lm)}", fontsize=9)
    else:
        _ax_no_data(down, "no eval loss recorded")
    down.grid(axis="y", alpha=0.3)
    down.set_xticks(range(len(bases)), [_short(b, 26) for b in bases], fontsize=9)
    down.set_xlabel("base model", fontsize=9)
    up.legend(loc="upper left", bbox_to_anchor=(1.01, 1),
              fontsize=8, frameon=False, title="method", title_fontsize=8)
    fig.suptitle(title + f"\n({_score_over(agg)}; within each base model)", fontsize=11)
    return _done(name, fig, out_dir)


def fig4b_peft_area_loss(tidy_df: pd.DataFrame, out_dir: str | Path,
                         records_root: str | Path | None = None) -> Drawn:
    """Fig. 4b: per base model, efficiency score as a filled area and loss as a line."""
    name, title = "fig4b_peft_area_loss", "Fig. 4b - efficiency score (area) and loss (line)"
    peft = _peft_panels(tidy_df)
    if isinstance(peft, str):
        return _done(name, _no_data_figure(title, peft), out_dir)
    agg, bases, methods = peft
    fig, axs = _new(max(6.5, 0.9 * len(methods) + 2), 3.3 * len(bases), len(bases), 1)
    lm = agg["loss_metric"].iloc[0]
    for ax, b in zip(axs[:, 0], bases, strict=True):
        a = agg[agg["p.base_model"] == b].set_index("p.method").reindex(methods)
        x = np.arange(len(methods))
        ax.fill_between(x, a["score"].to_numpy(float), color="#4c72b0", alpha=0.35,
                        step=None, label="efficiency score")
        ax.plot(x, a["score"], color="#4c72b0", marker="o")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("efficiency score\n(0.1-1, higher = better)", fontsize=8.5,
                      color="#4c72b0")
        ax.set_xticks(x, methods, fontsize=9)
        ax.set_title(f"base model: {b}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if lm:
            tw = ax.twinx()
            e = a[f"{lm}_ci95"].fillna(0).to_numpy()
            tw.errorbar(x, a[lm], yerr=e if e.any() else None, color="#c44e52", marker="s",
                        linewidth=2, capsize=3, label=LABEL[lm])
            tw.set_ylabel(axis_label(tidy_df, lm), fontsize=8.5, color="#c44e52")
        else:
            ax.text(0.99, 0.95, "no eval loss recorded", transform=ax.transAxes, ha="right",
                    va="top", fontsize=8)
    handles = [Patch(color="#4c72b0", alpha=0.35, label="efficiency score"),
               Line2D([], [], color="#c44e52", marker="s", label="eval loss")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2, fontsize=8)
    fig.suptitle(f"{title}\n({_score_over(agg)})", fontsize=11)
    return _done(name, fig, out_dir)
