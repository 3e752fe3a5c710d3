"""The figures' shared helpers: the ``Drawn`` result, saving (PNG + PDF), "no data" panels,
labels and units from the catalog, orders, palettes, repeats averaged with 95 % intervals, and the
wide table of one axis."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.text
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from effllm_helpers import catalog
from effllm_helpers import results as R
from effllm_helpers.axes.spec import axis_of_figure
from effllm_helpers.measure.stats import summarize
from effllm_helpers.report import scoring as E

DPI = 150


NO_DATA = "no data"

# labels, units and orders are the catalog's (the orders are live: a registered entry shows)
LABEL = {k: m.label for k, m in catalog.METRICS.items() if m.label}
DEFAULT_UNIT = {k: m.unit for k, m in catalog.METRICS.items() if m.unit}
NORM_LABEL = "normalised (0.1-1, higher = better)"


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
