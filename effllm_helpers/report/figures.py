"""The paper's figures (EfficientLLM Figs. 2-5) and ours, drawn from the tidy results table.

Why one module: the summary notebook and ``effllm report`` must produce the same figures from the
same table. Every figure function has the same shape, ``fig_x(tidy_df, out_dir, records_root=None)
-> Drawn``, saves ``<name>.png`` (150 dpi) and ``<name>.pdf`` into ``out_dir`` and returns the
matplotlib Figure with the paths. A figure whose data is missing still gets drawn and saved, with a
centred "no data: <why>" text on it, so a report never silently lacks a panel and never crashes.

Normalised axes point "higher is better" (scaled to [0.1, 1] within the plotted comparison set by
:func:`effllm_helpers.report.scoring.normalise`); raw ranges with units are printed beside them.
Repeats (runs whose params differ only in the seed) are averaged and drawn with 95 % confidence
intervals. Figures use matplotlib's object API (no pyplot state), so they are safe in loops.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg", force=False)
import matplotlib.text  # noqa: E402,I001
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from effllm_helpers import catalog  # noqa: E402
from effllm_helpers import results as R  # noqa: E402
from effllm_helpers.axes.spec import SPECS, axis_of_figure  # noqa: E402
from effllm_helpers.report import scoring as E  # noqa: E402
from effllm_helpers.measure.stats import summarize  # noqa: E402

DPI = 150


NO_DATA = "no data"

# labels, units and orders are the catalog's (the orders are live: a registered entry shows)
LABEL = {k: m.label for k, m in catalog.METRICS.items() if m.label}
# the axis each figure family draws, found through the spec by one of its figures' names, so
# that no figure names an axis of its own
ARCHITECTURE = axis_of_figure("fig3a_attention_radar")[0].name
FINETUNING = axis_of_figure("fig4a_peft_score_loss")[0].name
INFERENCE = axis_of_figure("fig5_precision_polar")[0].name
DEFAULT_UNIT = {k: m.unit for k, m in catalog.METRICS.items() if m.unit}
ATTENTION_ORDER = catalog.ATTENTION  # orders are registration orders
POSITIONAL_ORDER = catalog.POSITIONAL
METHOD_ORDER = catalog.FINETUNE_METHODS
PRECISION_ORDER = catalog.PRECISION_ORDER
NORM_LABEL = "normalised (0.1-1, higher = better)"
# reference of each architecture setting held fixed while another varies (None: the default,
# i.e. runs that leave it unset, else the most common value)
HOLD = {"p.model.attention": "gqa", "p.model.positional": "rope", "p.model.ffn": "dense",
        "p.model.family": "transformer", "p.model.d_ff_mult": None}
TIER_COLOURS = {"best": "#1a9850", "top": "#a6d96a", "middle": "#fee08b", "bottom": "#f46d43",
                "n/a": "#eeeeee"}


@dataclass
class Drawn:
    """One drawn figure: its name, the matplotlib Figure and the files written."""

    name: str
    figure: Figure
    paths: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- small helpers
def figure_texts(fig: Figure) -> list[str]:
    """Every text on a figure (figure-level, titles, axes texts): what a reader sees written."""
    out = [t.get_text() for t in fig.texts]
    if getattr(fig, "_suptitle", None) is not None:
        out.append(fig._suptitle.get_text())
    for ax in fig.axes:
        out += [t.get_text() for t in ax.texts] + [ax.get_title()]
    return out


def _new(w: float, h: float, nrows: int = 1, ncols: int = 1, polar: bool = False,
         **kw: Any) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(w, h), layout="constrained")
    sub = {"projection": "polar"} if polar else None
    axs = fig.subplots(nrows, ncols, squeeze=False, subplot_kw=sub, **kw)
    return fig, axs


def _no_data_figure(title: str, why: str, size: tuple[float, float] = (7, 4)) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    fig.suptitle(title, fontsize=12)
    fig.text(0.5, 0.5, f"{NO_DATA}: {why}", ha="center", va="center", fontsize=13,
             color="0.35", wrap=True)
    return fig


def _ax_no_data(ax: Axes, why: str) -> None:
    ax.text(0.5, 0.5, f"{NO_DATA}: {why}", transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="0.35", wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


def plain_text(fig: Figure) -> Figure:
    """Turn mathtext off on every text of ``fig``: labels are data (model names, techniques).

    Why: a ``$`` in a model name (``my$x$model``) would otherwise be parsed as TeX and either
    render wrongly or raise while drawing. Our figures draw no math, so none is lost.
    """
    for t in fig.findobj(matplotlib.text.Text):
        t.set_parse_math(False)
    return fig


def save(fig: Figure, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``name``.png (150 dpi) and ``name``.pdf into ``out_dir``; return both paths."""
    plain_text(fig)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        p = out / f"{name}.{ext}"
        with R.atomic_path(p) as tmp:  # two reports into one folder each rename their own
            fig.savefig(tmp, format=ext, dpi=DPI, facecolor="white")  # constrained layout
        paths.append(p)
    return paths


def _done(name: str, fig: Figure, out_dir: str | Path) -> Drawn:
    return Drawn(name, fig, save(fig, out_dir, name))


def unit(tidy: pd.DataFrame | None, metric: str) -> str:
    """The recorded unit of ``metric`` (else our default)."""
    units = E.units_of(tidy) if tidy is not None else {}
    return str(units.get(metric) or DEFAULT_UNIT.get(metric, ""))


def axis_label(tidy: pd.DataFrame | None, metric: str, arrow: bool = True) -> str:
    """"AMU (GB, lower is better)": a readable axis label with unit and direction."""
    u = unit(tidy, metric)
    d = ""
    if arrow and metric in E.HIGHER_IS_BETTER:
        d = ", higher is better" if E.HIGHER_IS_BETTER[metric] else ", lower is better"
    return f"{LABEL.get(metric, metric)} ({u}{d})" if u or d else LABEL.get(metric, metric)


def _fmt(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    a = abs(v)
    if a != 0 and (a < 1e-2 or a >= 1e4):
        return f"{v:.2e}"
    return f"{v:.3g}"


def _order(values: Sequence[Any], pref: Iterable[str]) -> list[Any]:
    pref = list(pref)
    vals = list(dict.fromkeys(v for v in values if v is not None and v == v))
    return sorted(vals, key=lambda v: (pref.index(v) if v in pref else len(pref), str(v)))


def _short(name: Any, n: int = 18) -> str:
    s = str(name).rsplit("/", 1)[-1]
    return s if len(s) <= n else s[: n - 1] + "…"


def _ci95(values: np.ndarray) -> float:
    """95 % CI half-width of the mean (Student t, measure.stats.summarize); NaN for n < 2."""
    c = summarize(list(values))["ci95"]
    return float("nan") if c is None else float(c)


def repeat_summary(wide: pd.DataFrame, metrics: Sequence[str],
                   by: Sequence[str]) -> pd.DataFrame:
    """Mean, 95 % CI and n of each metric over repeats (rows sharing ``by``; seeds differ).

    A single run keeps its own recorded ``<metric>.ci95`` (repeated measurement inside the run)
    when ``wide`` has it. Columns: ``by``, ``<m>``, ``<m>_ci95``, ``<m>_n``.
    """
    ok = E.ok_rows(wide)
    by = [b for b in by if b in ok]
    rows = []
    if ok.empty:
        return pd.DataFrame(columns=[*by, *metrics])
    for key, sub in ok.groupby(by, dropna=False, sort=False) if by else [((), ok)]:
        row: dict[str, Any] = dict(zip(by, key if isinstance(key, tuple) else (key,),
                                       strict=True))
        for m in metrics:
            v = pd.to_numeric(sub[m], errors="coerce").dropna().to_numpy(float) if m in sub \
                else np.array([])
            row[m] = float(v.mean()) if len(v) else np.nan
            row[f"{m}_n"] = len(v)
            ci = _ci95(v)
            if len(v) == 1 and f"{m}.ci95" in sub:
                ci = float(pd.to_numeric(sub[f"{m}.ci95"], errors="coerce").dropna().iloc[0]) \
                    if sub[f"{m}.ci95"].notna().any() else np.nan
            row[f"{m}_ci95"] = ci
        rows.append(row)
    return pd.DataFrame(rows)


def _agg_ci(agg: pd.DataFrame, metrics: Sequence[str]) -> dict[str, pd.Series]:
    """The ``<m>_ci95`` columns of a :func:`repeat_summary` as ``normalise``'s ``ci``."""
    return {m: agg[f"{m}_ci95"] for m in metrics if f"{m}_ci95" in agg}


def spread_note(agg: pd.DataFrame, metric: str) -> str:
    """"no difference" when the whole spread of ``metric`` is inside its 95 % intervals.

    Why: min-max scaling stretches a 0.9 % spread to full scale; a reader must see that it is
    noise, not a ranking. Empty otherwise.
    """
    return "no difference" if E.no_difference(agg, metric, _agg_ci(agg, [metric])) else ""


def _scaled(agg: pd.DataFrame, metrics: Sequence[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Normalised means and their CIs scaled by the same factor (so error bars stay honest)."""
    norm = E.normalise(agg, metrics, ci=_agg_ci(agg, metrics))
    ci = pd.DataFrame(index=agg.index)
    for m in metrics:
        x = pd.to_numeric(agg[m], errors="coerce")
        span = x.max() - x.min()
        c = pd.to_numeric(agg.get(f"{m}_ci95", pd.Series(np.nan, index=agg.index)),
                          errors="coerce")
        ci[m] = c * (1 - E.FLOOR) / span if span and np.isfinite(span) else c * 0
    return norm, ci


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


def _palette(keys: Sequence[Any], name: str = "colorblind") -> dict[Any, Any]:
    cols = sns.color_palette(name, max(len(keys), 1))
    if len(keys) > len(set(cols)):
        cols = sns.color_palette("husl", len(keys))
    return dict(zip(keys, cols, strict=False))


def _wide(tidy: pd.DataFrame | None, axis: str) -> pd.DataFrame:
    if tidy is None or tidy.empty:
        return pd.DataFrame()
    return E.wide_table(tidy, axis, with_ci=True)


def _why_empty(tidy: pd.DataFrame | None, axis: str, what: str) -> str:
    if tidy is None or tidy.empty:
        return "the results table is empty (no runs collected)"
    w = E.wide_table(tidy, axis)
    if w.empty:
        return f"no {axis} runs in the results"
    if E.ok_rows(w).empty:
        return f"all {len(w)} {axis} runs failed"
    return f"no {axis} runs with {what}"


def _config_cols(wide: pd.DataFrame) -> list[str]:
    """The params that define a configuration: every p.* except seeds, plus study and device."""
    cols = [c for c in wide.columns if c.startswith("p.") and c not in E.SEED_PARAMS
            and not c.endswith(".seed")]
    return cols + [c for c in ("study", "device") if c in wide and wide[c].nunique() > 1]


def _one_device(wide: pd.DataFrame) -> str | None:
    """Why a paper figure must not average these runs: they come from several devices."""
    if "device" not in wide:
        return None
    devs = _order(E.ok_rows(wide)["device"].dropna().astype(str).tolist(), [])
    if len(devs) < 2:
        return None
    return f"runs from {len(devs)} devices ({', '.join(devs)}): report one device's records"


def figure_keys(figure: str) -> list[str]:
    """The params whose variation selects ``figure``'s runs, from its axis spec (axes/spec.py)."""
    return list(axis_of_figure(figure)[1])


def studies_varying(wide: pd.DataFrame, key: str) -> list[str]:
    """The studies with an ok run in which ``key`` takes more than one value (unset counts as a
    value): those whose design varies it, whatever their study files are called."""
    if "study" not in wide or key not in wide:
        return []
    ok = set(E.ok_rows(wide)["study"].dropna())
    n_values = wide.groupby("study")[key].agg(lambda c: c.astype(str).nunique())
    return sorted(s for s, n in n_values.items() if n > 1 and s in ok)


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


# ---------------------------------------------------------------- all
# ---------------------------------------------------------------- Fig. 6 (axis 4, cross-modal)
# Axis 4 figures, drawn from the tidy results table like ``figures.py`` (PNG + PDF).
#
# * ``fig6a_dit_attention``: the DiT attention x FFN comparison - bars of sample quality (the
#   classifier-feature Fréchet distance, lower is better; the classifier's accuracy on samples)
#   beside AL, sampling images/s, AMU and AEC, so quality and cost are read together.
# * ``fig6b_peft_transfer``: per target model (ViT, VLM, DiT), each method's score (accuracy after
#   adaptation; the DiT has no accuracy) above its eval loss, with the pre-adaptation loss marked.
#
# Runs are selected by axis (``cross_modal``) and ``p.experiment``, not by study file name; several
# seeds of one configuration are averaged.
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
