"""Which technique should I use? Constraints -> feasible runs -> Pareto front -> one choice, why.

Why this module: the report ranks techniques, but a researcher's question is narrower — "under
2 GB and 10 ms a token, what is the best quality I can get on this GPU for this model?". The
answer must come from the measured records only, per device and model size (never averaged over
devices), and must say *why*: which constraint binds and how far the runner-up is.

The steps, per comparison set (device x model size, i.e. the axis's comparison keys without the
study, so that e.g. LoRA and QLoRA on one base model compete):

1. Repeats of a technique (seeds) are averaged, with a 95 % CI over them (a single run keeps its
   recorded in-run ``ci95``): :func:`effllm_helpers.report.figures.repeat_summary`.
2. A run violating a constraint is excluded with the reason. A null metric neither satisfies nor
   violates anything, unless a constraint is *on* it: then it is excluded as "unknown".
3. The Pareto front of the rest over quality (up), memory, latency and energy (down) — only
   objectives measured for some run of the set; two runs are compared on the objectives both
   measured.
4. The choice is the front's best quality. Runs whose quality is within the combined ci95 of the
   best, sqrt(ci_a^2 + ci_b^2) (or exactly equal where no CI is recorded), are a *tie*, broken by
   memory, then latency, then energy (the first that differs), and the output says so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..axes import spec as _spec
from . import scoring as E

# the model-size column of each axis (what "same size" means for it), from the axis specs
SIZE_COLUMN: dict[str, str] = {a: s.size_column for a in E.STUDY_AXES
                               if (s := E.spec_of(a)).size_column}
# columns that define a comparison set: device, the size, and (fine-tuning) the task
SET_KEYS: dict[str, tuple[str, ...]] = {
    axis: tuple(k for k in keys if k != "study") for axis, keys in E.COMPARISON_KEYS.items()
}
# MEMORY is the total, what a budget (--max-memory-gb) must hold; the Pareto objective and the
# tie-break use the axis's memory metric (inference: the increment above the post-import
# baseline, what a precision adds; see scoring.memory_metric)
MEMORY, ENERGY = "amu_gb", "j_per_token"
LATENCY_DEFAULT, TPOT = "al_s", "tpot_s"
UNITS = {MEMORY: "GB", LATENCY_DEFAULT: "s", TPOT: "s", ENERGY: "J/token"}  # as recorded


class RecommendError(ValueError):
    """The question cannot be asked of these results (no such axis/device/size, bad file)."""


# ---------------------------------------------------------------- loading
def load_tidy(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The tidy table from a records folder, a folder holding results/results.csv, or a table.

    Why all three: a researcher may have the raw runs, a report folder, or only the CSV someone
    sent; all are the same long table (:func:`effllm_helpers.results.collect`).
    """
    from .. import results

    p = Path(path)
    if p.is_dir():
        if any(p.rglob(results.RECORD_NAME)):
            return results.collect(p)
        for cand in ("results/results.parquet", "results.parquet", "results/results.csv",
                     "results.csv"):
            if (p / cand).is_file():
                return load_tidy(p / cand)
        raise RecommendError(f"{str(p)!r} holds no record.json and no results.parquet/csv")
    if not p.is_file():
        raise RecommendError(f"no such folder or table {str(p)!r}")
    try:
        if p.suffix == ".parquet":
            return pd.read_parquet(p)
        if p.suffix == ".csv":
            return pd.read_csv(p, low_memory=False)
    except (OSError, ValueError) as exc:
        raise RecommendError(f"cannot read {str(p)!r}: {exc}") from exc
    raise RecommendError(f"{str(p)!r}: give a records folder or a results .csv/.parquet table")


# ---------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Constraint:
    """One limit on one metric; ``scale`` converts the recorded unit into the option's unit."""

    option: str            # the command-line option, named in messages
    metric: str
    limit: float           # in the option's unit
    upper: bool = True     # True: value <= limit; False: value >= limit
    unit: str = ""
    scale: float = 1.0

    def shown(self, value: float) -> float:
        return value * self.scale

    def miss(self, value: float | None) -> float | None:
        """How far (option's unit) ``value`` is on the wrong side of the limit; 0 if satisfied,
        None if unknown."""
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        v = self.shown(value)
        return max(0.0, v - self.limit) if self.upper else max(0.0, self.limit - v)

    def text(self) -> str:
        return f"{self.option} {_num(self.limit)}"

    def describe(self, value: float, miss: float) -> str:
        """'11.85 ms > 10 ms (by 1.85 ms)': the value, the limit and the miss, in its unit."""
        u = f" {self.unit}" if self.unit else ""
        op = ">" if self.upper else "<"
        return (f"{_num(self.shown(value))}{u} {op} {_num(self.limit)}{u} "
                f"(by {_num(miss, 3)}{u})")


def constraints_from(*, max_memory_gb: float | None = None, max_latency_ms: float | None = None,
                     max_tpot_ms: float | None = None,
                     max_energy_j_per_token: float | None = None,
                     min_quality: float | None = None, quality: str | None = None,
                     quality_higher_is_better: bool = True) -> list[Constraint]:
    """The constraints a researcher gave, each on a recorded metric in the option's unit.

    ``--min-quality`` reads "at least this good": ``>=`` for accuracy-like metrics, ``<=`` for
    perplexity and loss (lower is better).
    """
    if max_latency_ms is not None and max_tpot_ms is not None:
        raise RecommendError("give --max-latency-ms or --max-tpot-ms, not both")
    out: list[Constraint] = []
    if max_memory_gb is not None:
        out.append(Constraint("--max-memory-gb", MEMORY, max_memory_gb, unit="GB"))
    if max_latency_ms is not None:
        out.append(Constraint("--max-latency-ms", LATENCY_DEFAULT, max_latency_ms, unit="ms",
                              scale=1e3))
    if max_tpot_ms is not None:
        out.append(Constraint("--max-tpot-ms", TPOT, max_tpot_ms, unit="ms", scale=1e3))
    if max_energy_j_per_token is not None:
        out.append(Constraint("--max-energy-j-per-token", ENERGY, max_energy_j_per_token,
                              unit="J/token"))
    if min_quality is not None:
        if quality is None:
            raise RecommendError("--min-quality given but these runs record no quality metric")
        out.append(Constraint("--min-quality", quality, min_quality,
                              upper=not quality_higher_is_better))
    for c in out:
        if not math.isfinite(c.limit):
            raise RecommendError(f"{c.option} must be a finite number (got {c.limit})")
    return out


# ---------------------------------------------------------------- one comparison set
@dataclass
class Choice:
    """The answer for one comparison set, with everything needed to explain it."""

    axis: str
    set_label: str
    quality: str | None
    objectives: list[str]
    table: pd.DataFrame             # one row per technique: metrics, ci95, status
    chosen: str | None = None
    runner_up: str | None = None
    tie: bool = False
    tie_break: str | None = None
    why: list[str] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return self.chosen is not None


def _num(v: float | None, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    return f"{v:.{digits}g}"


def _val(row: pd.Series, m: str) -> float | None:
    v = row.get(m)
    return None if v is None or pd.isna(v) else float(v)


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def dominates(a: pd.Series, b: pd.Series, objectives: Sequence[str],
              higher: dict[str, bool]) -> bool:
    """True if ``a`` is at least as good as ``b`` on every objective both measured and strictly
    better on one (objectives one of them lacks are not compared)."""
    shared = [m for m in objectives if _val(a, m) is not None and _val(b, m) is not None]
    if not shared:
        return False
    strictly = False
    for m in shared:
        va, vb = _val(a, m), _val(b, m)
        if _better(vb, va, higher[m]):
            return False
        strictly = strictly or _better(va, vb, higher[m])
    return strictly


def pareto_front(table: pd.DataFrame, objectives: Sequence[str],
                 higher: dict[str, bool]) -> dict[Any, Any]:
    """{index: index of a row dominating it, or None if on the front} over ``objectives``."""
    out: dict[Any, Any] = {}
    for i, a in table.iterrows():
        out[i] = next((j for j, b in table.iterrows()
                       if j != i and dominates(b, a, objectives, higher)), None)
    return out


def _ci(row: pd.Series, m: str) -> float | None:
    c = row.get(f"{m}_ci95")
    return None if c is None or pd.isna(c) else float(c)


def _tied(best: pd.Series, other: pd.Series, q: str) -> tuple[bool, float | None]:
    """Whether ``other``'s quality is inside the combined ci95 of ``best``'s (or equal)."""
    vb, vo = _val(best, q), _val(other, q)
    if vb is None or vo is None:
        return False, None
    cb, co = _ci(best, q), _ci(other, q)
    if cb is None and co is None:
        return vb == vo, None
    band = math.hypot(cb or 0.0, co or 0.0)
    return abs(vb - vo) <= band, band


def choose_in_set(agg: pd.DataFrame, constraints: Sequence[str | Constraint] | Sequence[Any],
                  *, axis: str, quality: str | None, set_label: str = "",
                  latency: str = LATENCY_DEFAULT) -> Choice:
    """Apply constraints, Pareto-filter and pick one technique in one comparison set.

    ``agg``: one row per technique (column ``technique``) with metric columns and optional
    ``<metric>_ci95`` columns (as :func:`effllm_helpers.report.figures.repeat_summary` gives).
    """
    cons: list[Constraint] = list(constraints)
    table = agg.reset_index(drop=True).copy()
    mem = E.memory_metric(table, axis)
    higher = {m: E.higher_is_better(m) for m in (MEMORY, mem, latency, ENERGY)}
    objectives = [m for m in (quality, mem, latency, ENERGY)
                  if m and m in table and table[m].notna().any()]
    if quality:
        higher[quality] = E.higher_is_better(quality)
    ch = Choice(axis, set_label, quality, objectives, table)
    status: dict[int, str] = {}
    misses: dict[int, dict[str, float | None]] = {}
    for i, row in table.iterrows():
        misses[i] = {c.option: c.miss(_val(row, c.metric)) for c in cons}
        bad = [f"{c.option}: unknown ({c.metric} null)" if misses[i][c.option] is None else
               f"{c.option}: {c.describe(_val(row, c.metric), misses[i][c.option])}"
               for c in cons if misses[i][c.option] != 0.0]
        if bad:
            status[i] = "excluded: " + "; ".join(bad)
    feasible = table.drop(index=list(status))
    if feasible.empty:
        ch.table = table.assign(status=pd.Series(status))
        ch.why.append(_infeasible(table, cons, misses, set_label))
        return ch
    dom = pareto_front(feasible, objectives, higher)
    for i, j in dom.items():
        status[i] = "pareto" if j is None else f"dominated by {table.loc[j, 'technique']}"
    front = feasible.loc[[i for i, j in dom.items() if j is None]]
    order = _quality_order(front, quality, higher)
    best = front.loc[order[0]]
    tied = [i for i in order[1:] if quality and _tied(best, front.loc[i], quality)[0]]
    pick, break_metric = order[0], None
    if tied:
        pool = [order[0], *tied]
        pick, break_metric = _break_tie(front.loc[pool], [mem, latency, ENERGY], higher)
        ch.tie, ch.tie_break = True, break_metric
    # runner-up: the next best quality among all feasible runs (dominated ones included: the
    # question "why not X?" is about any run that fits)
    rest = [i for i in _quality_order(feasible, quality, higher) if i != pick]
    status[pick] = "CHOSEN"
    ch.chosen = str(table.loc[pick, "technique"])
    ch.runner_up = str(table.loc[rest[0], "technique"]) if rest else None
    ch.table = table.assign(status=pd.Series(status))
    ch.why += _explain(ch, table, pick, rest[0] if rest else None, cons, misses, status,
                       higher, latency, [order[0], *tied] if tied else [])
    return ch


def _quality_order(front: pd.DataFrame, q: str | None, higher: dict[str, bool]) -> list[Any]:
    if not q or q not in front or front[q].isna().all():
        return list(front.index)
    key = pd.to_numeric(front[q], errors="coerce")
    return list(key.sort_values(ascending=not higher[q], na_position="last").index)


def _break_tie(pool: pd.DataFrame, metrics: Sequence[str],
               higher: dict[str, bool]) -> tuple[Any, str | None]:
    """The tied run best on the first metric (memory, latency, energy) on which they differ."""
    for m in metrics:
        if m not in pool:
            continue
        v = pd.to_numeric(pool[m], errors="coerce").dropna()
        if v.nunique() > 1 and len(v) == len(pool):
            return (v.idxmax() if higher[m] else v.idxmin()), m
    return pool.index[0], None


def _infeasible(table: pd.DataFrame, cons: Sequence[Constraint],
                misses: dict[int, dict[str, float | None]], set_label: str) -> str:
    """'nothing satisfies ...', naming the closest run and what it misses by how much.

    Closest = smallest sum of relative misses (miss / limit); an unknown metric counts as
    infinitely far, so a measured near-miss is preferred to a run we know nothing about.
    """
    def distance(i: int) -> float:
        return sum(math.inf if m is None else m / max(abs(c.limit), 1e-12)
                   for c, m in zip(cons, misses[i].values(), strict=True))

    i = min(misses, key=distance)
    row = table.loc[i]
    parts = []
    for c in cons:
        m = misses[i][c.option]
        if m is None:
            parts.append(f"{c.option}: {c.metric} is unknown (null) for it")
        elif m > 0:
            parts.append(f"{c.option}: {c.describe(_val(row, c.metric), m)}")
    asked = ", ".join(c.text() for c in cons)
    return (f"nothing satisfies {asked} on {set_label}; closest: {row['technique']} — "
            + "; ".join(parts))


def _explain(ch: Choice, table: pd.DataFrame, pick: Any, runner: Any,
             cons: Sequence[Constraint], misses: dict[int, dict[str, float | None]],
             status: dict[int, str], higher: dict[str, bool], latency: str,
             tied: list[Any]) -> list[str]:
    q = ch.quality
    best = table.loc[pick]
    out: list[str] = []
    qtxt = f"best {q} ({'higher' if q and higher[q] else 'lower'} is better)" if q else \
        "no quality metric recorded: first Pareto run"
    out.append(f"{ch.chosen}: {qtxt} among {sum(1 for s in status.values() if s == 'pareto') + 1}"
               f" Pareto-optimal runs that satisfy the constraints")
    if tied:
        names = ", ".join(str(table.loc[i, "technique"]) for i in tied)
        band = max((_tied(table.loc[tied[0]], table.loc[i], q)[1] or 0.0) for i in tied[1:])
        inside = f"within the combined ci95 ±{_num(band, 3)}" if band else "exactly equal"
        by = f"broken by lower {ch.tie_break}" if ch.tie_break else "not broken: all equal"
        out.append(f"tie on {q} between {names} ({inside}); {by}")
    # binding constraint: the one that excluded the best-quality run better than the choice
    if cons:
        counts = {c.option: sum(1 for i in misses if misses[i][c.option] != 0.0) for c in cons}
        better = [i for i in misses if any(v != 0.0 for v in misses[i].values())
                  and q and _val(table.loc[i], q) is not None and _val(best, q) is not None
                  and _better(_val(table.loc[i], q), _val(best, q), higher[q])]
        if better:
            top = _quality_order(table.loc[better], q, higher)[0]
            row = table.loc[top]
            which = [c for c in cons if misses[top][c.option] != 0.0]
            miss = "; ".join(
                f"{c.option}: {c.metric} unknown" if misses[top][c.option] is None
                else f"{c.option}: {c.describe(_val(row, c.metric), misses[top][c.option])}"
                for c in which)
            it = "it" if len(which) == 1 else "them"
            out.append(f"binding constraint: {', '.join(c.option for c in which)} — without {it} "
                       f"{row['technique']} ({q} {_num(_val(row, q))}) would win; {miss}")
        else:
            out.append("binding constraint: none — the choice is also the best quality "
                       "without constraints")
        out.append("excluded per constraint: " + ", ".join(f"{k} {v}" for k, v in
                                                           counts.items()))
    if runner is not None:
        r = table.loc[runner]
        parts = []
        for m in [q, E.memory_metric(table, ch.axis), latency, ENERGY]:
            if not m or _val(best, m) is None or _val(r, m) is None:
                continue
            d = _val(best, m) - _val(r, m)
            ci = _tied(best, r, m)[1] if m == q else None
            parts.append(f"{m} {d:+.3g}" + (f" (ci95 ±{_num(ci, 2)})" if ci else ""))
        out.append(f"margin to runner-up {r['technique']} ({status.get(runner, '')}), "
                   "chosen minus runner-up: " + ", ".join(parts))
    else:
        out.append("no runner-up: only one run satisfies the constraints")
    return out


# ---------------------------------------------------------------- over a tidy table
def aggregate(wide: pd.DataFrame, axis: str, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per (comparison set, technique): mean over repeats and its ci95."""
    from .figures import repeat_summary

    keys = [k for k in SET_KEYS.get(axis, ("device",)) if k in wide]
    return repeat_summary(wide, [m for m in metrics if m in wide], [*keys, "technique"])


def recommend(tidy: pd.DataFrame, axis: str = _spec.DEFAULT_AXIS, *,
              max_memory_gb: float | None = None, max_latency_ms: float | None = None,
              max_tpot_ms: float | None = None, max_energy_j_per_token: float | None = None,
              min_quality: float | None = None, device: str | None = None,
              size: str | None = None, quality: str | None = None) -> list[Choice]:
    """One :class:`Choice` per (device, model size) of ``axis`` in the tidy table.

    ``quality`` forces the quality metric; by default it is the study's, as the runs' records
    carry it, else the axis's default (:func:`effllm_helpers.report.scoring.study_scoring`).
    """
    wide = E.ok_rows(E.wide_table(tidy, axis, with_ci=True))
    if wide.empty:
        raise RecommendError(f"no ok runs of axis {axis!r} in these results")
    size_col = SIZE_COLUMN.get(axis)
    if device is not None:
        wide = wide[wide["device"].astype(str) == device]
        if wide.empty:
            raise RecommendError(f"no ok {axis} runs on device {device!r}")
    if size is not None:
        if size_col not in wide or (wide[size_col].astype(str) != size).all():
            have = sorted(wide[size_col].dropna().astype(str).unique()) if size_col in wide \
                else []
            raise RecommendError(f"no ok {axis} runs of size {size!r} (have: {have})")
        wide = wide[wide[size_col].astype(str) == size]
    q = quality or E.quality_metric(wide, axis)
    if q is not None and q not in wide:
        raise RecommendError(f"quality metric {q!r} is not recorded in these runs")
    if q is not None and q not in E.HIGHER_IS_BETTER:
        raise RecommendError(f"quality metric {q!r} has no known direction; known: "
                             f"{', '.join(sorted(E.HIGHER_IS_BETTER))}")
    latency = TPOT if max_tpot_ms is not None else LATENCY_DEFAULT
    cons = constraints_from(max_memory_gb=max_memory_gb, max_latency_ms=max_latency_ms,
                            max_tpot_ms=max_tpot_ms,
                            max_energy_j_per_token=max_energy_j_per_token,
                            min_quality=min_quality, quality=q,
                            quality_higher_is_better=E.higher_is_better(q) if q else True)
    mems = dict.fromkeys((MEMORY, E.memory_metric(wide, axis)))  # the budget's, the ranked
    agg = aggregate(wide, axis, [m for m in (q, *mems, latency, ENERGY) if m])
    keys = [k for k in SET_KEYS.get(axis, ("device",)) if k in agg]
    out = []
    for gkey, sub in agg.groupby(keys, dropna=False, sort=True) if keys else [((), agg)]:
        label = " / ".join(str(g) for g in (gkey if isinstance(gkey, tuple) else (gkey,)))
        out.append(choose_in_set(sub, cons, axis=axis, quality=q, set_label=label,
                                 latency=latency))
    return out


def format_choice(ch: Choice) -> str:
    """The short table and the why, as printed by ``effllm recommend``."""
    cols = ["technique", *ch.objectives, "status"]
    t = ch.table[[c for c in cols if c in ch.table]].copy()
    for m in ch.objectives:
        if m in t:
            t[m] = [_num(v) for v in t[m]]
    t = t.rename(columns={m: f"{m} [{UNITS[m]}]" for m in ch.objectives if m in UNITS})
    t["status"] = t["status"].fillna("")
    head = f"== {ch.axis}: {ch.set_label} (quality: {ch.quality or 'none recorded'}) =="
    lines = [head, t.to_string(index=False), *(f"  {w}" for w in ch.why)]
    return "\n".join(lines)


__all__ = ["Choice", "Constraint", "RecommendError", "SIZE_COLUMN", "aggregate",
           "choose_in_set", "constraints_from", "dominates", "format_choice", "load_tidy",
           "pareto_front", "recommend"]
