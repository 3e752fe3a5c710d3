"""Two result sets side by side: per-technique ratios B/A with intervals, and ranking changes.

Why: "does what I measured on the H100 hold on the H200?" (or at another model size, or after a
code change) is a question about *ratios* of the same technique's metrics and about whether the
*order* of techniques changes — not about averaging the two sets, which the report refuses.

Matching: a technique of A meets the one of B with the same axis, study, model size (the axis's
size column, see :data:`effllm_helpers.report.recommend.SIZE_COLUMN`) and technique label.
To compare two sizes, pick one on each side (``size_a``/``size_b``); the size is then left out of
the match.
A label that has no partner is matched on the axis's core technique params alone (e.g.
``fp16+compute_dtype=bf16`` with ``fp16``) when that is unambiguous on both sides, because the
label names every setting that varies *within* one set, and that differs between sets.

Interval of a ratio r = b/a: first-order propagation of independent relative errors,
``dr / r = sqrt((ci_a / a)^2 + (ci_b / b)^2)``, giving ``[r (1 - dr/r), r (1 + dr/r)]`` (floored
at 0). Each ci95 is the run's recorded in-run ci95, or the CI over repeats (seeds) when a
technique has several runs. A side without a ci95 counts as exact; ``ci_from`` says which sides
contributed, and no interval is given when neither has one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..results import SCORING_QUALITY, SCORING_WEIGHTS, write_csv
from . import scoring as E
from .recommend import SIZE_COLUMN, RecommendError, load_tidy

__all__ = ["compare", "headline_metrics", "one_sided_axes", "ratio_interval", "ranking_changes",
           "write_compare", "load_tidy", "RecommendError"]

KEY = ["axis", "study", "size", "technique"]
# headline metrics per axis beyond quality (memory, latency, throughput, energy, compression),
# from the axis specs
HEADLINE: dict[str, tuple[str, ...]] = {a: E.spec_of(a).headline for a in E.STUDY_AXES}


def ratio_interval(a: float, b: float, ci_a: float | None,
                   ci_b: float | None) -> tuple[float, float | None, float | None, str]:
    """(b/a, low, high, ci_from) by propagating relative errors (see the module docstring)."""
    if a == 0 or any(map(_nan, (a, b))):
        return float("nan"), None, None, ""
    r = b / a
    parts = {"A": None if _nan(ci_a) else ci_a / a, "B": None if _nan(ci_b) else ci_b / b}
    have = {k: v for k, v in parts.items() if v is not None}
    if not have:
        return r, None, None, ""
    rel = math.sqrt(sum(v * v for v in have.values()))
    return r, max(0.0, r * (1 - rel)), r * (1 + rel), "+".join(have)


def _nan(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def headline_metrics(wide: pd.DataFrame, axis: str) -> list[str]:
    """The axis's quality metric and its headline efficiency metrics measured in ``wide``."""
    q = E.quality_metric(wide, axis)
    ms = [m for m in HEADLINE.get(axis, E.EFFICIENCY_METRICS.get(axis, ()))
          if m in wide and wide[m].notna().any()]
    return ([q] if q else []) + ms


def _side(tidy: pd.DataFrame, name: str, *, device: str | None,
          size: str | None) -> pd.DataFrame:
    """One side as a wide table with ``size`` and ``core`` columns, one device per study/size."""
    from .figures import repeat_summary

    parts = []
    for axis in sorted(set(tidy["axis"].dropna().astype(str))):
        if axis not in SIZE_COLUMN:
            continue
        w = E.ok_rows(E.wide_table(tidy, axis, with_ci=True))
        if w.empty:
            continue
        if device is not None:
            w = w[w["device"].astype(str) == device]
        col = SIZE_COLUMN[axis]
        w = w.assign(size=w[col].astype(str) if col in w else "")
        if size is not None:
            w = w[w["size"] == size]
        if w.empty:
            continue
        devs = w.groupby(["study", "size"])["device"].nunique()
        if (devs > 1).any():
            study, sz = devs[devs > 1].index[0]
            raise RecommendError(
                f"{name}: {study} / {sz} has runs from several devices "
                f"({', '.join(sorted(w['device'].dropna().astype(str).unique()))}); pick one "
                f"with --device-{name.lower()}")
        core_cols = [c for c in E.TECHNIQUE_PARAMS.get(axis, ()) if c in w]
        w["core"] = ["+".join(str(r[c]) for c in core_cols if not pd.isna(r[c]))
                     for _, r in w.iterrows()]
        ident = {"run_id", "study", "axis", "status", "device", "finished_at", "technique",
                 "size", "core", SCORING_QUALITY, SCORING_WEIGHTS}
        metrics = [c for c in w.columns if c not in ident and not c.startswith("p.")
                   and not c.endswith((".ci95", ".n"))]
        keys = ["axis", "study", "size", "technique", "core", "device"]
        agg = repeat_summary(w, metrics, keys)
        agg["axis"] = axis
        agg = agg.merge(_locks(tidy, w, keys), on=keys, how="left")
        parts.append(agg)
    if not parts:
        raise RecommendError(f"{name}: no ok runs to compare" +
                             (f" (device {device!r}, size {size!r})" if device or size else ""))
    return pd.concat(parts, ignore_index=True)


def _locks(tidy: pd.DataFrame, wide: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The lock label(s) of each technique's runs (``environment.lock_label``; 'unknown' for a
    record made before records named their lock), joined with ',' when its repeats differ."""
    per_run = (tidy.drop_duplicates("run_id").set_index("run_id")["lock"]
               if "lock" in tidy else pd.Series(dtype=object))
    lock = wide["run_id"].map(per_run).astype(object).fillna("unknown").astype(str)
    return (wide.assign(lock=lock).groupby(keys, dropna=False)["lock"]
            .agg(lambda s: ",".join(sorted(set(s)))).reset_index())


def _match(a: pd.DataFrame, b: pd.DataFrame, by_size: bool) -> list[tuple[int, int]]:
    """Index pairs (A row, B row): same label first, then the unambiguous core params."""
    key = ["axis", "study", *(["size"] if by_size else [])]
    pairs: list[tuple[int, int]] = []
    used_a, used_b = set(), set()
    bk = {(*r[key], r["technique"]): j for j, r in b.iterrows()}
    for i, r in a.iterrows():
        j = bk.get((*r[key], r["technique"]))
        if j is not None:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    for i, r in a.drop(index=list(used_a)).iterrows():
        same = (b[key] == pd.Series(r[key])).all(axis=1)
        cands = b[same & (b["core"] == r["core"]) & ~b.index.isin(used_b)]
        in_a = a[(a[key] == pd.Series(r[key])).all(axis=1) & (a["core"] == r["core"])]
        in_b = b[same & (b["core"] == r["core"])]
        if r["core"] and len(cands) == 1 and len(in_a) == 1 and len(in_b) == 1:
            pairs.append((i, cands.index[0]))
            used_b.add(cands.index[0])
    return pairs


def compare(tidy_a: pd.DataFrame, tidy_b: pd.DataFrame, metrics: Sequence[str] | None = None,
            *, device_a: str | None = None, device_b: str | None = None,
            size_a: str | None = None, size_b: str | None = None,
            axis: str | None = None) -> pd.DataFrame:
    """One row per (matched technique, metric): values, ratio B/A, interval, ranks, flag.

    Columns: axis, study, size (A's; ``size_a->size_b`` when sizes were picked), technique (A's
    label), technique_b, metric, a, b, ratio, ratio_low, ratio_high, ci_from, rank_a, rank_b,
    rank_changed (the technique's place among the matched ones moved), device_a/device_b and
    lock_a/lock_b/lock_differs (the package set each side ran under; see ``lock_warnings``).
    """
    by_size = size_a is None and size_b is None
    for m in metrics or ():
        try:
            E.higher_is_better(m)
        except KeyError as exc:
            raise RecommendError(exc.args[0]) from None
    if axis is not None:
        tidy_a, tidy_b = (t[t["axis"] == axis] for t in (tidy_a, tidy_b))
    a = _side(tidy_a, "A", device=device_a, size=size_a)
    b = _side(tidy_b, "B", device=device_b, size=size_b)
    pairs = _match(a, b, by_size)
    rows = []
    for i, j in pairs:
        ra, rb = a.loc[i], b.loc[j]
        ms = list(metrics) if metrics else headline_metrics(
            a[(a["axis"] == ra["axis"]) & (a["study"] == ra["study"])], str(ra["axis"]))
        for m in ms:
            va, vb = ra.get(m, np.nan), rb.get(m, np.nan)
            if _nan(va) and _nan(vb):
                continue
            r, lo, hi, src = ratio_interval(float(va), float(vb), ra.get(f"{m}_ci95"),
                                            rb.get(f"{m}_ci95"))
            rows.append({"axis": ra["axis"], "study": ra["study"],
                         "size": ra["size"] if by_size else f"{ra['size']}->{rb['size']}",
                         "technique": ra["technique"], "technique_b": rb["technique"],
                         "metric": m, "a": va, "b": vb, "ratio": r, "ratio_low": lo,
                         "ratio_high": hi, "ci_from": src, "device_a": ra["device"],
                         "device_b": rb["device"], "lock_a": ra["lock"], "lock_b": rb["lock"],
                         "lock_differs": ra["lock"] != rb["lock"]})
    cols = ["axis", "study", "size", "technique", "technique_b", "metric", "a", "b", "ratio",
            "ratio_low", "ratio_high", "ci_from", "rank_a", "rank_b", "rank_changed",
            "device_a", "device_b", "lock_a", "lock_b", "lock_differs"]
    if not rows:
        return pd.DataFrame(columns=cols)
    out = pd.DataFrame(rows).sort_values(["axis", "study", "size", "technique"], kind="stable")
    return ranking_changes(out.reset_index(drop=True))[cols]


def ranking_changes(table: pd.DataFrame) -> pd.DataFrame:
    """Add rank_a, rank_b (1 = best, ties share the best rank) and rank_changed per set+metric.

    Ranks are among the matched techniques only, so a technique present on one side does not
    shift the other side's order.
    """
    out = table.copy()
    out["rank_a"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out["rank_b"] = pd.array([pd.NA] * len(out), dtype="Int64")
    for (_, _, _, m), sub in out.groupby(["axis", "study", "size", "metric"], dropna=False):
        higher = E.higher_is_better(str(m))
        for side in ("a", "b"):
            v = pd.to_numeric(sub[side], errors="coerce")
            out.loc[sub.index, f"rank_{side}"] = v.rank(ascending=not higher,
                                                         method="min").astype("Int64")
    out["rank_changed"] = (out["rank_a"] != out["rank_b"]).fillna(False).astype(bool)
    return out


def lock_warnings(table: pd.DataFrame) -> list[str]:
    """One line per pair of locks that matched techniques were measured under, when A's and B's
    differ: a ratio then mixes the technique with a change of package versions."""
    if table.empty or "lock_differs" not in table:
        return []
    pairs = table.loc[table["lock_differs"].astype(bool), ["lock_a", "lock_b"]].drop_duplicates()
    return [f"A ran under lock {a}, B under {b}: package versions differ, so a ratio may "
            "measure the upgrade as well as the technique" for a, b in pairs.itertuples(
                index=False)]


def one_sided_axes(tidy_a: pd.DataFrame, tidy_b: pd.DataFrame) -> list[str]:
    """One line per study axis with runs on one side only: nothing of it can be compared, and
    the reader should be told so rather than meet a table without it."""
    have = [set(t["axis"].dropna().astype(str)) if "axis" in t else set()
            for t in (tidy_a, tidy_b)]
    return [f"{axis}: runs in {side} only, nothing to compare"
            for axis in E.STUDY_AXES for side, mine, other in (("A", *have), ("B", *have[::-1]))
            if axis in mine and axis not in other]


def changed_orders(table: pd.DataFrame) -> list[str]:
    """Readable lines, one per (set, metric) whose technique order differs between A and B."""
    lines = []
    for (axis, study, size, m), sub in table.groupby(["axis", "study", "size", "metric"],
                                                     sort=True):
        if not sub["rank_changed"].any():
            continue
        order_a = sub.sort_values("rank_a")["technique"].tolist()
        order_b = sub.sort_values("rank_b")["technique"].tolist()
        lines.append(f"{axis}/{study}/{size} {m}: A {' > '.join(order_a)}  |  "
                     f"B {' > '.join(order_b)}")
    return lines


def draw(table: pd.DataFrame, out_dir: str | Path, name: str = "compare_ratios",
         title: str = "B / A per technique") -> list[Path]:
    """Ratios per technique, one panel per metric, log scale, error bars; PNG + PDF."""
    from matplotlib.figure import Figure

    from .figures import save

    ms = list(dict.fromkeys(table["metric"])) if len(table) else []
    fig = Figure(figsize=(max(6.0, 3.6 * min(len(ms), 3)), 3.4 * max(1, math.ceil(len(ms) / 3))),
                 layout="constrained")
    if not ms:
        fig.text(0.5, 0.5, "no technique is present in both result sets", ha="center")
        return save(fig, out_dir, name)
    axs = fig.subplots(math.ceil(len(ms) / 3), min(len(ms), 3), squeeze=False)
    for ax in axs.flat[len(ms):]:
        ax.set_visible(False)
    for ax, m in zip(axs.flat, ms, strict=False):
        sub = table[table["metric"] == m].reset_index(drop=True)
        labels = [f"{t} ({s})" if table["size"].nunique() > 1 else str(t)
                  for t, s in zip(sub["technique"], sub["size"], strict=True)]
        r = sub["ratio"].astype(float).to_numpy()
        lo = pd.to_numeric(sub["ratio_low"], errors="coerce").to_numpy(float)
        hi = pd.to_numeric(sub["ratio_high"], errors="coerce").to_numpy(float)
        err = np.vstack([np.nan_to_num(r - lo), np.nan_to_num(hi - r)])
        colors = ["#c44e52" if c else "#4c72b0" for c in sub["rank_changed"]]
        y = np.arange(len(sub))
        ax.errorbar(r, y, xerr=err, fmt="none", ecolor="0.3", capsize=3)
        ax.scatter(r, y, c=colors, zorder=3)
        ax.axvline(1.0, color="0.5", lw=1, ls="--")
        ax.set_xscale("log")
        ax.set_yticks(y, labels, fontsize=8)
        ax.set_title(m, fontsize=10)
        ax.set_xlabel("ratio B / A (log)", fontsize=8)
    fig.suptitle(title + "\nred: rank among the matched techniques changed; bars: ci95",
                 fontsize=10)
    return save(fig, out_dir, name)


def write_compare(table: pd.DataFrame, out_dir: str | Path, title: str = "B / A per technique"
                  ) -> list[Path]:
    """compare.csv plus the ratio figure (PNG + PDF) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = write_csv(table, out / "compare.csv")
    return [csv, *draw(table, out, title=title)]


def format_table(table: pd.DataFrame) -> str:
    """The printed table: ratio with its interval, ranks and a flag."""
    if table.empty:
        return "no technique is present in both result sets"
    t = table.copy()

    def g(v: Any) -> str:
        return "" if _nan(v) else f"{float(v):.3g}"

    t["B/A"] = [g(r) + (f" [{g(lo)}, {g(hi)}]" if not _nan(lo) else "")
                for r, lo, hi in zip(t["ratio"], t["ratio_low"], t["ratio_high"], strict=True)]
    t["rank A->B"] = [f"{a}->{b}" + (" *" if c else "") for a, b, c in
                      zip(t["rank_a"], t["rank_b"], t["rank_changed"], strict=True)]
    t["a"], t["b"] = t["a"].map(g), t["b"].map(g)
    return t[["axis", "study", "size", "technique", "metric", "a", "b", "B/A",
              "rank A->B"]].to_string(index=False)
