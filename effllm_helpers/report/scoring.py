"""Efficiency score: min-max scaling to [0.1, 1] and a weighted harmonic mean, plus rank tables.

Why this form: the EfficientLLM paper (arXiv 2505.13840,
Appendix Eqs. 10-12) says metrics are min-max normalised within each comparison so that higher is
better, and its figures bottom out at 0.1, which fits scaling to [0.1, 1] before a weighted harmonic
mean. The exact formula and weights are not public, so we define our own and say where it may
differ from the paper:

* **Orientation** comes from :data:`HIGHER_IS_BETTER` (a table per metric name), not from the
  paper, which never lists it. Lower-is-better metrics are flipped before scaling.
* **Scaling** is ``0.1 + 0.9 * (x - min) / (max - min)`` inside one *comparison set* (the rows
  handed in, or the groups of :func:`scores_by_set`). The floor of 0.1 keeps the harmonic mean
  finite and stops one worst metric from zeroing a row. A constant column (max == min, including a
  set of one run) scales to 1.0: nothing in the set is worse on it. The paper does not say what it
  does with ties or singletons.
* **Weights** are the study's ``weights:`` as its runs' records carry them
  (:func:`study_scoring`), equal where the records carry none (a note says so). A weights
  mapping need not name every metric: metrics it omits keep weight 1.0; weight 0 drops a
  metric. The key ``"quality"`` stands for whichever quality metric the axis uses (val_ppl,
  eval_loss, task_acc, ...).
* **Nulls**: a metric that is null for one run is left out of *that run's* mean (the other weights
  renormalise), and the exclusion is recorded (``Series.attrs["excluded"]`` and the ``excluded``
  column of :func:`score_frame`). The paper had no missing values; we prefer a score over fewer
  metrics, noted, to an invented number. A run with no usable metric gets NaN.
* Min and max are taken over the comparison set's non-null values only.
* **Spread beyond noise**: an efficiency metric enters a comparison set's score only when its
  spread over the set's runs (max - min) exceeds its noise: the larger of a stated floor
  (:data:`NOISE_FLOOR_REL`, a fraction of the set's median) and the largest spread among
  repeats (seeds) of one technique in the set. Min-max scaling stretches any spread to the full
  [0.1, 1], so a metric that does not tell techniques apart on a device would otherwise rank the
  machine's noise: a CPU's PCU (process CPU time over wall time) reads 0.97-0.99 for every
  method. A left-out metric is named, with why, in every row's ``excluded`` note of that set
  (:func:`scores_by_set`). The quality metric is never left out (it is what the study ranks).
  Repeats on the same device in other sets count too (:func:`device_repeat_noise`): a set
  without repeats cannot measure its machine's run-to-run noise.
* **Intervals and tied ranks**: each score has an interval (:func:`score_interval`: the row's
  metrics moved by their noise to either side), and ranks count only the rows whose whole
  interval lies above (:func:`rank_with_ties`), so equal-cost methods share a rank however a
  busy machine orders their point scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from effllm_helpers import catalog
from effllm_helpers.axes import spec as _spec
from effllm_helpers.results import SCORING_QUALITY, SCORING_WEIGHTS

FLOOR = 0.1  # the bottom of the scaled range, as in the paper's figures

# direction per metric name: True = higher is better
HIGHER_IS_BETTER: dict[str, bool] = {k: m.higher_is_better for k, m in catalog.METRICS.items()}

# the per-axis tables below are views of the axis specs (axes/spec.py), kept by these names for
# the scores, figures and leaderboard that read them
STUDY_AXES = _spec.STUDY_AXES
spec_of = _spec.spec
_STUDY_SPECS = [_spec.SPECS[a] for a in STUDY_AXES]

# the one quality metric of each axis, unless its study file names another (``quality:``); a
# fixed choice, so a ranking never rests on whichever column happens to vary (1 vs 2 items of 32)
QUALITY_METRIC: dict[str, str] = {s.name: s.quality for s in _STUDY_SPECS if s.quality}
# quality metrics a study file may name per axis (the metrics that axis records)
QUALITY_CHOICES: dict[str, tuple[str, ...]] = {s.name: s.quality_choices for s in _STUDY_SPECS}
# kept for callers that list candidates: the fixed metric only
QUALITY_CANDIDATES: dict[str, tuple[str, ...]] = {k: (v,) for k, v in QUALITY_METRIC.items()}
# perplexities that are compared with a uniform guess over the vocabulary (``uniform_ppl``)
PPL_METRICS = ("val_ppl", "ppl")
WORSE_THAN_UNIFORM = "worse than uniform (ppl > vocabulary size): not ranked on quality"

# efficiency metrics of the default score per axis (the paper's figure axes for that axis)
EFFICIENCY_METRICS: dict[str, tuple[str, ...]] = {
    s.name: s.efficiency_metrics for s in _STUDY_SPECS}
# the memory each axis ranks on: the total, or the increment above the post-import baseline
MEMORY_METRIC: dict[str, str] = {s.name: s.memory_metric for s in _STUDY_SPECS}
TOTAL_MEMORY = "amu_gb"

# what a run is compared against: runs that share these columns form one comparison set
COMPARISON_KEYS: dict[str, tuple[str, ...]] = {s.name: s.comparison_keys for s in _STUDY_SPECS}

# technique params per axis: the label of a run is made of those that vary within its study
# (named by value), then any other non-seed param that varies there (named ``name=value``)
TECHNIQUE_PARAMS: dict[str, tuple[str, ...]] = {
    s.name: s.technique_params for s in _STUDY_SPECS}
# a param at this value says "not used" and is left out of a label (QLoRA's quant on plain LoRA)
UNSET_VALUE: dict[str, str] = {"p.quant": "none"}

# Fig. 2 columns -> metric name (None for Perf: the axis's quality metric)
RANK_COLUMNS: dict[str, str | None] = {
    "Perf": None, "AMU": "amu_gb", "PCU": "pcu", "AL": "al_s", "TT": "tt", "ST": "st",
    "IT": "it", "AEC": "aec_w", "MCR": "mcr",
}

SEED_PARAMS = ("p.seed", "p.train.seed")

# the stated noise floor of an efficiency metric: a spread over a comparison set at most this
# fraction of the set's median does not rank techniques. 2 %: on the 2-core reference machine
# repeats (seeds) of one method spread up to 1.0 % in CPU PCU, while PCU over all methods of a
# set spread 0.5-1.1 % (0.975-0.988); memory, latency and throughput spread 12 % or more
DEFAULT_NOISE_FLOOR_REL = 0.02
NOISE_FLOOR_REL: dict[str, float] = {}  # per-metric floors where one differs from the default


# ---------------------------------------------------------------- wide table
def wide_table(tidy_df: pd.DataFrame, axis: str | None = None, *,
               with_ci: bool = False) -> pd.DataFrame:
    """One row per run: identity + ``p.*`` technique columns + one column per metric.

    Why: the tidy table is long (run x metric) for storage; scoring and plotting need a metric
    per column. Failed runs stay in (status says so) with NaN metrics, so a leaderboard can show
    them. ``technique`` is a readable label of the params that vary within the run's study.
    With ``with_ci`` also ``<metric>.ci95`` / ``<metric>.n`` columns from repeated measurement.
    """
    if tidy_df is None or tidy_df.empty or "run_id" not in tidy_df:
        return pd.DataFrame(columns=["run_id", "study", "axis", "status", "device", "technique"])
    df = tidy_df if axis is None else tidy_df[tidy_df["axis"] == axis]
    if df.empty:
        return pd.DataFrame(columns=["run_id", "study", "axis", "status", "device", "technique"])
    id_cols = [c for c in ("run_id", "study", "axis", "status", "device", "finished_at",
                           SCORING_QUALITY, SCORING_WEIGHTS) if c in df]
    p_cols = [c for c in df.columns if c.startswith("p.")]
    ident = df.drop_duplicates("run_id")[id_cols + p_cols].set_index("run_id")
    p_cols = [c for c in p_cols if ident[c].notna().any()]  # params of other axes
    ident = ident[[c for c in ident.columns if not c.startswith("p.") or c in p_cols]]
    m = df[df["section"].isin(["metrics", "quality", "model"]) & df["metric"].notna()]
    parts = [ident]
    if not m.empty:
        vals = pd.to_numeric(m["value"], errors="coerce")
        piv = (m.assign(value=vals)
               .pivot_table(index="run_id", columns="metric", values="value", aggfunc="first",
                            dropna=False))
        piv.columns.name = None
        parts.append(piv)
        if with_ci:
            for stat in ("ci95", "n"):
                if stat in m:
                    s = m.assign(**{stat: pd.to_numeric(m[stat], errors="coerce")})
                    sp = s.pivot_table(index="run_id", columns="metric", values=stat,
                                       aggfunc="first")
                    sp.columns = [f"{c}.{stat}" for c in sp.columns]
                    parts.append(sp)
    out = pd.concat(parts, axis=1).reset_index().rename(columns={"index": "run_id"})
    out["technique"] = technique_labels(out)
    return out


def _label_part(col: str, v: Any, named: bool) -> str:
    if v is None or (not isinstance(v, str) and pd.isna(v)) or UNSET_VALUE.get(col) == str(v):
        return ""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return f"{col.rsplit('.', 1)[-1]}={v}" if named else str(v)


def technique_labels(wide: pd.DataFrame) -> pd.Series:
    """A short label per run from the technique params that vary within its study (and axis).

    Why: an architecture study may vary attention, another positional encoding; the label should
    name what was compared, not every param. Every other non-seed param that varies within the
    study is part of the label too (``d_ff_mult=8``; QLoRA's ``nf4`` vs ``fp4``), so two different
    configurations never share a label; the comparison keys (model size, base model, task, model)
    and seeds are not techniques. Falls back to the first technique param present.
    """
    labels = pd.Series("run", index=wide.index, dtype=object)
    if wide.empty:
        return labels
    keys = [c for c in ("axis", "study") if c in wide]
    groups = wide.groupby(keys, dropna=False).groups if keys else {None: wide.index}
    for gkey, idx in groups.items():
        axis = gkey[0] if isinstance(gkey, tuple) else (gkey if keys == ["axis"] else None)
        cands = [c for c in TECHNIQUE_PARAMS.get(str(axis), ()) if c in wide]
        if not cands:
            cands = [c for cs in TECHNIQUE_PARAMS.values() for c in cs if c in wide]
        sub = wide.loc[idx]
        skip = {*cands, *SEED_PARAMS, *COMPARISON_KEYS.get(str(axis), ())}
        extra = [c for c in sub.columns if c.startswith("p.") and c not in skip
                 and not c.endswith(".seed")
                 and sub[c].astype(str).where(sub[c].notna()).nunique(dropna=False) > 1]
        varying = [c for c in cands
                   if sub[c].astype(str).where(sub[c].notna()).nunique(dropna=False) > 1]
        first = [c for c in cands if sub[c].notna().any()][:1]
        use = varying or first
        if all(c in UNSET_VALUE for c in use):  # "nf4" alone does not say it is LoRA
            use = [*first, *[c for c in use if c not in first]]
        if not use and not extra:
            continue
        named = set(extra)
        lab = pd.Series([
            "+".join(p for p in (_label_part(c, row[c], c in named) for c in [*use, *extra]) if p)
            for _, row in sub.iterrows()], index=idx, dtype=object)
        labels.loc[idx] = lab.where(lab != "", "run")
    return labels


@dataclass(frozen=True)
class StudyScoring:
    """What a set of runs is ranked on, as their records say: the quality metric, the weights,
    and a note where the records do not say it (or disagree) and the defaults stand in."""

    quality: str | None
    weights: dict[str, float]
    note: str = ""


def _recorded(wide: pd.DataFrame, col: str) -> tuple[list[str], int]:
    """The distinct recorded values of ``col`` and how many runs carry none."""
    if col not in wide:
        return [], len(wide)
    v = wide[col]
    return sorted(set(v.dropna().astype(str))), int(v.isna().sum())


def study_scoring(wide: pd.DataFrame, axis: str) -> StudyScoring:
    """The quality metric and weights the runs' study chose, read from their records
    (``scoring.quality`` / ``scoring.weights`` columns, :func:`effllm_helpers.results.tidy_rows`).

    Why from the records: a report over another machine's records must not depend on the study
    files of this checkout. Records made before they carried it, or runs of studies that chose
    differently, fall back to the axis's default quality metric (:data:`QUALITY_METRIC`) and
    equal weights, and the note says so.
    """
    default = QUALITY_METRIC.get(axis)
    qs, q_missing = _recorded(wide, SCORING_QUALITY)
    ws, w_missing = _recorded(wide, SCORING_WEIGHTS)
    notes = []
    quality, weights = default, {}
    if len(qs) == 1:
        quality = qs[0]
    elif len(qs) > 1:
        notes.append(f"the runs' studies rank on different quality metrics ({', '.join(qs)}): "
                     f"the axis's default {default}")
    if len(ws) == 1:
        weights = {str(k): float(v) for k, v in json.loads(ws[0]).items()}
    elif len(ws) > 1:
        notes.append("the runs' studies weight the metrics differently: equal weights")
    if not qs and not ws and len(wide):
        notes.append(f"the records carry no study scoring (made before records held it): "
                     f"equal weights, the axis's default quality {default}")
    elif (q_missing or w_missing) and len(wide) and (len(qs) == 1 or len(ws) == 1):
        notes.append(f"{max(q_missing, w_missing)} of {len(wide)} records carry no study "
                     "scoring: ranked as the others' study says")
    return StudyScoring(quality, weights, "; ".join(notes))


def quality_metric(wide: pd.DataFrame, axis: str) -> str | None:
    """The axis's one quality metric: the study's choice as recorded (:func:`study_scoring`),
    else :data:`QUALITY_METRIC`.

    Why fixed: picking "the first column that varies" let a ranking rest on 1 vs 2 correct
    items out of 32 while perplexity was ignored. None when the rows do not record it.
    """
    name = study_scoring(wide, axis).quality
    if name and name in wide and wide[name].notna().any():
        return name
    return None


def quality_flags(wide: pd.DataFrame, quality: str | None) -> pd.Series:
    """True for rows whose perplexity is worse than uniform over the vocabulary.

    The vocabulary size is the recorded ``uniform_ppl`` (or the model's ``vocab_size``).
    """
    flags = pd.Series(False, index=wide.index)
    if quality not in PPL_METRICS or quality not in wide:
        return flags
    ref_col = next((c for c in ("uniform_ppl", "vocab_size") if c in wide), None)
    if ref_col is None:
        return flags
    q = pd.to_numeric(wide[quality], errors="coerce")
    ref = pd.to_numeric(wide[ref_col], errors="coerce")
    return (q > ref).fillna(False).astype(bool)


def _unflagged(wide: pd.DataFrame, quality: str | None) -> tuple[pd.DataFrame, pd.Series]:
    """``wide`` with flagged rows' quality set to NaN (so they are not ranked on it), the flags."""
    flags = quality_flags(wide, quality)
    if not flags.any():
        return wide, flags
    out = wide.copy()
    out.loc[flags, quality] = np.nan
    return out, flags


def memory_metric(wide: pd.DataFrame, axis: str) -> str:
    """The memory ``axis`` ranks on (:data:`MEMORY_METRIC`), or the total ``amu_gb`` for
    records that do not hold it (made before the increment was recorded)."""
    m = MEMORY_METRIC.get(axis, TOTAL_MEMORY)
    return m if m in wide and wide[m].notna().any() else TOTAL_MEMORY


def default_metrics(wide: pd.DataFrame, axis: str, include_quality: bool = True) -> list[str]:
    """Metrics of the default score for ``axis``: its efficiency metrics (+ quality) present
    (its memory metric falls back to the total where the rows lack it)."""
    mem = MEMORY_METRIC.get(axis, TOTAL_MEMORY)
    ms = [memory_metric(wide, axis) if m == mem else m for m in EFFICIENCY_METRICS.get(axis, ())]
    ms = [m for m in dict.fromkeys(ms) if m in wide and wide[m].notna().any()]
    q = quality_metric(wide, axis) if include_quality else None
    return ([q] if q else []) + ms


# ---------------------------------------------------------------- scaling and score
def higher_is_better(metric: str, overrides: Mapping[str, bool] | None = None) -> bool:
    """Whether a higher ``metric`` is better (the catalog's direction, or ``overrides``').

    An unknown metric raises, naming it and the known ones: a guessed direction would rank it
    backwards without a word."""
    table = {**HIGHER_IS_BETTER, **(overrides or {})}
    if metric not in table:
        raise KeyError(f"no direction known for metric {metric!r}; known: "
                       f"{', '.join(sorted(table))} (a new metric is a catalog.py entry; or "
                       f"pass higher_is_better={{{metric!r}: True|False}})")
    return table[metric]


_direction = higher_is_better


def _ci_of(df: pd.DataFrame, metric: str,
           ci: Mapping[str, pd.Series] | None) -> pd.Series | None:
    """The 95 % CI half-width of ``metric`` per row: given, or the ``<metric>.ci95`` column."""
    if ci is not None and metric in ci:
        return pd.to_numeric(ci[metric], errors="coerce").reindex(df.index)
    if f"{metric}.ci95" in df:
        return pd.to_numeric(df[f"{metric}.ci95"], errors="coerce")
    return None


def tie_with_best(x: pd.Series, ci: pd.Series | None) -> pd.Series:
    """Oriented values (higher is better) with every value inside the interval of the best raised
    to the best.

    Why: a difference smaller than the measurement's uncertainty is not a difference. Two runs
    tie when their gap is at most the sum of their 95 % half-widths (a missing CI counts as 0,
    so identical values still tie and others stay exact). Only ties with the best are merged:
    the rule is transitive-safe and never reorders the rest.
    """
    if ci is None or x.notna().sum() < 2:
        return x
    c = ci.fillna(0.0).clip(lower=0.0)
    best = x.idxmax()
    tied = (x[best] - x) <= (c + c[best])
    return x.where(~tied | x.isna(), x[best])


def normalise(df: pd.DataFrame, metrics: Sequence[str],
              higher_is_better: Mapping[str, bool] | None = None,
              ci: Mapping[str, pd.Series] | None = None) -> pd.DataFrame:
    """Scale each metric column to [0.1, 1], oriented so that 1 is the best run of the set.

    NaN stays NaN; a constant column (or a single non-null value) becomes 1.0. Values whose
    95 % interval overlaps the best's (``ci`` or ``<metric>.ci95`` columns) get the best's 1.0
    (:func:`tie_with_best`); when every value does, the column is constant: no difference.
    """
    out = pd.DataFrame(index=df.index)
    for m in metrics:
        x = pd.to_numeric(df[m], errors="coerce").astype(float) if m in df else \
            pd.Series(np.nan, index=df.index)
        if not _direction(m, higher_is_better):
            x = -x
        x = tie_with_best(x, _ci_of(df, m, ci))
        lo, hi = x.min(skipna=True), x.max(skipna=True)
        if pd.isna(lo) or hi == lo:
            out[m] = x.where(x.isna(), 1.0)
        else:
            out[m] = FLOOR + (1.0 - FLOOR) * (x - lo) / (hi - lo)
    return out


def no_difference(df: pd.DataFrame, metric: str,
                  ci: Mapping[str, pd.Series] | None = None) -> bool:
    """Whether the whole spread of ``metric`` over ``df``'s rows is inside the interval.

    Figures say "no difference" for such a metric instead of stretching it to full scale.
    """
    if metric not in df:
        return False
    x = pd.to_numeric(df[metric], errors="coerce").astype(float)
    if x.notna().sum() < 2:
        return False
    if x.max() == x.min():
        return True
    c = _ci_of(df, metric, ci)
    if c is None:
        return False
    return bool(tie_with_best(x, c).nunique(dropna=True) == 1 and
                tie_with_best(-x, c).nunique(dropna=True) == 1)


def resolve_weights(metrics: Sequence[str], weights: Mapping[str, float] | None,
                    quality: str | None = None) -> dict[str, float]:
    """Weight per metric: given ones, ``"quality"`` mapped onto the quality metric, others 1."""
    weights = dict(weights or {})
    out: dict[str, float] = {}
    for m in metrics:
        if m in weights:
            out[m] = float(weights[m])
        elif m == quality and "quality" in weights:
            out[m] = float(weights["quality"])
        else:
            out[m] = 1.0
        if out[m] < 0:
            raise ValueError(f"weight of {m!r} is negative ({out[m]})")
    return out


def _largest_repeat_spread(runs: pd.DataFrame, metric: str, keys: Sequence[str],
                           relative: bool) -> float:
    """The largest spread (max - min; over |median| when ``relative``) of ``metric`` among runs
    sharing ``keys`` and a ``technique`` label; 0 when no group has two values."""
    if "technique" not in runs or metric not in runs:
        return 0.0
    x = pd.to_numeric(runs[metric], errors="coerce")
    by = [runs[k].astype(str) for k in keys if k in runs] + [runs["technique"].astype(str)]

    def spread(v: pd.Series) -> float:
        v = v.dropna()
        if len(v) < 2:
            return 0.0
        span = float(v.max() - v.min())
        if not relative:
            return span
        med = abs(float(v.median()))
        return span / med if med > 0 else 0.0

    spreads = x.groupby(by, dropna=False).agg(spread)
    return float(spreads.max()) if len(spreads) and spreads.notna().any() else 0.0


def repeat_noise(df: pd.DataFrame, metric: str) -> float:
    """The largest spread (max - min) of ``metric`` among repeats of one technique in ``df``
    (rows sharing a ``technique`` label); 0 when no technique is repeated."""
    return _largest_repeat_spread(df, metric, (), relative=False)


def device_repeat_noise(runs: pd.DataFrame, metric: str,
                        keys: Sequence[str] = ()) -> float:
    """The largest relative spread ((max - min) / |median|) of ``metric`` among repeats of one
    technique within one comparison set (``keys``), over every set of ``runs``; 0 when nothing
    is repeated.

    Why: a set without repeats cannot say how far its machine moves a metric from run to run,
    but repeats elsewhere on the same device can; on a shared 2-core CPU they spread far more
    in step time than the 2 % floor (the cpu-tiny reference page)."""
    return _largest_repeat_spread(runs, metric, keys, relative=True)


def spread_note(df: pd.DataFrame, metric: str, device_rel: float = 0.0) -> str | None:
    """Why ``metric`` does not rank the runs of ``df`` (one comparison set), or None when it
    does: its spread is within its noise (see the module docstring, "Spread beyond noise");
    ``device_rel`` is the relative repeat spread on the set's device
    (:func:`device_repeat_noise`).

    A constant column or a set of fewer than two values is left to :func:`normalise` (every
    row scales to 1.0, which moves no rank)."""
    if metric not in df:
        return None
    x = pd.to_numeric(df[metric], errors="coerce").dropna()
    if len(x) < 2 or x.max() == x.min():
        return None
    spread = float(x.max() - x.min())
    centre = abs(float(x.median()))
    floor_rel = NOISE_FLOOR_REL.get(metric, DEFAULT_NOISE_FLOOR_REL)
    floor, repeats, device = floor_rel * centre, repeat_noise(df, metric), device_rel * centre
    noise = max(floor, repeats, device)
    if spread > noise:
        return None
    why = (f"repeats of one technique spread {repeats:.3g}" if repeats >= max(floor, device)
           else f"repeats on this device spread {device_rel:.0%} of its median, {device:.3g}"
           if device >= floor else
           f"the {floor_rel:.0%} noise floor of its median is {floor:.3g}")
    return (f"{metric}: left out of this set's score, it does not rank the techniques (spread "
            f"{spread:.3g} over the set; {why})")


def metric_noise(df: pd.DataFrame, metric: str, *, floor: bool = True,
                 device_rel: float = 0.0) -> pd.Series:
    """The noise (a half-width) of ``metric`` per row of one comparison set: the largest of the
    run's recorded 95 % interval (``<metric>.ci95``), the spread among repeats of one technique
    in the set (:func:`repeat_noise`) and, with ``floor``, the stated noise floor and the
    device's relative repeat spread (``device_rel``, :func:`device_repeat_noise`) of the set's
    median.

    Why the largest: a run's own interval says how steady it was inside its window, not how much
    the machine moved between runs; the repeats and the floor say that."""
    x = pd.to_numeric(df[metric], errors="coerce").astype(float) if metric in df else \
        pd.Series(np.nan, index=df.index)
    ci = _ci_of(df, metric, None)
    half = (ci.fillna(0.0).clip(lower=0.0) if ci is not None
            else pd.Series(0.0, index=df.index))
    half = half.clip(lower=repeat_noise(df, metric))
    if floor and x.notna().any():
        rel = max(NOISE_FLOOR_REL.get(metric, DEFAULT_NOISE_FLOOR_REL), device_rel)
        half = half.clip(lower=rel * abs(float(x.median())))
    return half.where(x.notna())


def score_interval(df: pd.DataFrame, metrics: Sequence[str],
                   weights: Mapping[str, float] | None = None, *,
                   higher_is_better: Mapping[str, bool] | None = None,
                   quality: str | None = None,
                   device_rel: Mapping[str, float] | None = None) -> pd.DataFrame:
    """The interval (``score_lo``, ``score_hi``) of each row's score in one comparison set.

    Why: the score min-max scales every metric, so a 1 % difference between two methods of
    equal cost becomes a full-scale difference and a rank. A row's bounds are its score with
    all its metrics moved by their noise (:func:`metric_noise`; the quality metric without the
    floor, as it is what the study ranks) to the worse side, then to the better side, the other
    rows staying where they are, and with differences inside that noise tied with the best (as
    :func:`normalise` ties them inside the recorded intervals). The score only rises as a row's
    oriented metric rises, so these two are its extremes. The bounds always hold the point
    score. Rows with no score get NaN.
    """
    metrics = list(metrics)
    df, _ = _unflagged(df, quality)
    w = resolve_weights(metrics, weights, quality)
    used = [m for m in metrics if w[m] > 0]
    point = score_frame(df, used, w, higher_is_better=higher_is_better,
                        quality=quality)["score"]
    out = pd.DataFrame({"score_lo": np.nan, "score_hi": np.nan}, index=df.index)
    if not used or df.empty:
        return out
    rel = device_rel or {}
    noise = {m: metric_noise(df, m, floor=m != quality, device_rel=rel.get(m, 0.0))
             for m in used}
    wv = pd.Series({m: w[m] for m in used}, dtype=float)

    def score_of(frame: pd.DataFrame, row: Any) -> float:
        scaled = normalise(frame, used, higher_is_better, ci=noise).loc[row]
        mask = scaled.notna()
        if not mask.any():
            return float("nan")
        return float(wv[mask].sum() / (wv[mask] / scaled[mask]).sum())

    for row in df.index:
        if pd.isna(point[row]):
            continue
        bounds = []
        for side in (-1.0, 1.0):
            moved = df.copy()
            for m in used:
                v = pd.to_numeric(df.at[row, m], errors="coerce") if m in df else np.nan
                if pd.notna(v):
                    up = 1.0 if _direction(m, higher_is_better) else -1.0
                    moved[m] = pd.to_numeric(moved[m], errors="coerce").astype(float)
                    moved.at[row, m] = float(v) + side * up * float(noise[m][row])
            bounds.append(score_of(moved, row))
        out.at[row, "score_lo"] = min(bounds[0], float(point[row]))
        out.at[row, "score_hi"] = max(bounds[1], float(point[row]))
    return out


def rank_with_ties(score: pd.Series, lo: pd.Series, hi: pd.Series) -> pd.Series:
    """Rank 1 = best, where a row is behind only the rows whose whole score interval lies above
    its own: ``1 + #{j : lo_j > hi_i}``. Rows whose intervals overlap share ranks, so the noise
    of a machine cannot order two methods of equal cost. NaN scores get no rank."""
    ok = score.notna() & lo.notna() & hi.notna()
    los = lo[ok].to_numpy()
    ranks = pd.Series(pd.NA, index=score.index, dtype="Int64")
    for i in score[ok].index:
        ranks[i] = 1 + int((los > hi[i]).sum())
    return ranks


def score_frame(wide_df: pd.DataFrame, metrics: Sequence[str],
                weights: Mapping[str, float] | None = None, *,
                higher_is_better: Mapping[str, bool] | None = None,
                quality: str | None = None) -> pd.DataFrame:
    """Score of every row as one comparison set, with how many metrics it used and which not.

    Columns: ``score`` (weighted harmonic mean of the scaled metrics), ``n_metrics``,
    ``excluded`` ("" or "aec_w: null; ..." listing metrics left out of that row) and ``flag``
    (why a row's quality was not scored, e.g. perplexity worse than uniform). Differences inside
    the recorded 95 % intervals (``<metric>.ci95`` columns) are ties: see :func:`normalise`.
    """
    metrics = list(metrics)
    wide_df, flags = _unflagged(wide_df, quality)
    w = resolve_weights(metrics, weights, quality)
    used = [m for m in metrics if w[m] > 0]
    scaled = normalise(wide_df, used, higher_is_better)
    wv = pd.Series({m: w[m] for m in used}, dtype=float)
    if used:
        mask = scaled.notna()
        num = mask.mul(wv, axis=1).sum(axis=1)
        den = (mask.mul(wv, axis=1) / scaled.where(mask, 1.0)).sum(axis=1)
        score = (num / den.where(den > 0)).where(mask.any(axis=1))
        n_used = mask.sum(axis=1)
        excluded = mask.apply(lambda r: "; ".join(f"{m}: null" for m in used if not r[m]),
                              axis=1) if len(mask) else pd.Series(dtype=object)
    else:
        score = pd.Series(np.nan, index=wide_df.index)
        n_used = pd.Series(0, index=wide_df.index)
        excluded = pd.Series("no metric with weight > 0", index=wide_df.index)
    if flags.any() and quality in used:
        note = f"{quality}: {WORSE_THAN_UNIFORM}"
        excluded = excluded.astype(object).copy()
        for i in flags[flags].index:
            rest = [e for e in str(excluded[i]).split("; ") if e and e != f"{quality}: null"]
            excluded[i] = "; ".join([note, *rest])
    flag = pd.Series(np.where(flags, WORSE_THAN_UNIFORM, ""), index=wide_df.index, dtype=object)
    return pd.DataFrame({"score": score.astype(float), "n_metrics": n_used.astype(int),
                         "excluded": excluded.astype(object), "flag": flag},
                        index=wide_df.index)


def efficiency_scores(wide_df: pd.DataFrame | Iterable[Mapping[str, Any]],
                      metrics: Sequence[str] | None = None,
                      weights: Mapping[str, float] | None = None, *,
                      higher_is_better: Mapping[str, bool] | None = None,
                      axis: str | None = None) -> pd.Series:
    """Efficiency score per row (one comparison set): higher is better, in [0.1, 1].

    ``metrics`` default to :func:`default_metrics` of ``axis`` (or of the rows' ``axis`` column).
    Rows whose metrics were partly null carry a note in ``result.attrs["excluded"]``
    ({index: "metric: null; ..."}). ``wide_df`` may also be a list of row dicts.
    """
    if not isinstance(wide_df, pd.DataFrame):
        wide_df = pd.DataFrame(list(wide_df))
    if metrics is None:
        axis = axis or (str(wide_df["axis"].dropna().iloc[0]) if "axis" in wide_df
                        and wide_df["axis"].notna().any() else "")
        metrics = default_metrics(wide_df, axis)
    quality = quality_metric(wide_df, axis) if axis else None
    if weights is None and axis:
        weights = study_scoring(wide_df, axis).weights
    sf = score_frame(wide_df, metrics, weights, higher_is_better=higher_is_better,
                     quality=quality)
    s = sf["score"].rename("score")
    s.attrs["excluded"] = {k: v for k, v in sf["excluded"].items() if v}
    s.attrs["metrics"] = list(metrics)
    return s


def ok_rows(wide: pd.DataFrame) -> pd.DataFrame:
    """Only runs whose status is ok (failed runs carry no comparable numbers)."""
    return wide[wide["status"] == "ok"] if "status" in wide else wide


def scores_by_set(wide: pd.DataFrame, axis: str, weights: Mapping[str, float] | None = None,
                  metrics: Sequence[str] | None = None,
                  by: Iterable[str] | None = None, *,
                  beyond_noise: bool = True) -> pd.DataFrame:
    """Score every ok run within its comparison set (:data:`COMPARISON_KEYS`) of ``axis``.

    ``weights`` default to the study's as its runs' records carry them (:func:`study_scoring`,
    per set); given, they replace them. Returns a frame indexed like ``wide`` with ``score``,
    ``score_lo``/``score_hi`` (its interval, :func:`score_interval`), ``n_metrics``,
    ``excluded``, ``scoring_note`` (where the records' scoring fell back to the defaults, and
    why), ``flag``, ``metrics`` (those scored, comma-separated), ``set`` (a label of the
    comparison set) and ``not_ranking`` (efficiency metrics left out of that set's score because
    their spread is within their noise, :func:`spread_note`, comma-separated; also named in
    ``excluded``; off with ``beyond_noise=False``). The noise of an efficiency metric includes
    the relative spread of repeats on the set's device over all of ``wide``
    (:func:`device_repeat_noise`). Failed runs get NaN and ``excluded = "run failed"``.
    """
    out = pd.DataFrame({"score": np.nan, "score_lo": np.nan, "score_hi": np.nan,
                        "n_metrics": 0, "excluded": "run failed",
                        "metrics": "", "set": "", "flag": "", "not_ranking": "",
                        "scoring_note": ""}, index=wide.index)
    out = out.astype({"score": float, "score_lo": float, "score_hi": float, "n_metrics": int,
                      "excluded": object, "metrics": object, "set": object, "flag": object,
                      "not_ranking": object, "scoring_note": object})
    ok = ok_rows(wide)
    if ok.empty:
        return out
    keys = [k for k in (by if by is not None else COMPARISON_KEYS.get(axis, ("study",)))
            if k in ok]
    groups = ok.groupby(keys, dropna=False).groups if keys else {"all": ok.index}
    for gkey, idx in groups.items():
        sub = ok.loc[idx]
        ms = list(metrics) if metrics is not None else default_metrics(sub, axis)
        ms = [m for m in ms if m in sub]
        quality = quality_metric(sub, axis)
        # how far this device moves each efficiency metric between repeats, from every set
        # of ``wide`` on it (machine noise, not a technique's)
        same = ok[ok["device"].astype(str) == str(sub["device"].iloc[0])] if "device" in ok \
            else ok
        rel = {m: device_repeat_noise(same, m, keys) for m in ms if m != quality}
        notes = ({m: spread_note(sub, m, rel[m]) for m in ms if m != quality}
                 if beyond_noise else {})
        notes = {m: n for m, n in notes.items() if n}
        ms = [m for m in ms if m not in notes]
        recorded = study_scoring(sub, axis)
        w = recorded.weights if weights is None else weights
        sf = score_frame(sub, ms, w, quality=quality)
        band = score_interval(sub, ms, w, quality=quality, device_rel=rel)
        out.loc[idx, "score_lo"] = band["score_lo"]
        out.loc[idx, "score_hi"] = band["score_hi"]
        out.loc[idx, "scoring_note"] = recorded.note
        label = " / ".join(str(g) for g in (gkey if isinstance(gkey, tuple) else (gkey,)))
        out.loc[idx, "score"] = sf["score"]
        out.loc[idx, "n_metrics"] = sf["n_metrics"]
        left = list(notes.values())
        out.loc[idx, "excluded"] = [
            "; ".join([*left, e] if e else left) for e in sf["excluded"]]
        out.loc[idx, "not_ranking"] = ",".join(notes)
        out.loc[idx, "flag"] = sf["flag"]
        out.loc[idx, "metrics"] = ",".join(ms)
        out.loc[idx, "set"] = label
    return out


# ---------------------------------------------------------------- Fig. 2 rank table
def _rank_block(wide: pd.DataFrame, axis: str) -> pd.DataFrame:
    """Ranks of the techniques of one study: normalise per comparison set, average, rank."""
    ok = ok_rows(wide)
    q = quality_metric(ok, axis)
    ok, flags = _unflagged(ok, q)
    mem = memory_metric(ok, axis)  # the AMU column: what the axis ranks memory on
    cols = {k: (q if v is None else mem if v == TOTAL_MEMORY else v)
            for k, v in RANK_COLUMNS.items()}
    metrics = [m for m in dict.fromkeys(v for v in cols.values() if v)
               if m in ok and ok[m].notna().any()]
    if ok.empty or not metrics:
        return pd.DataFrame()
    keys = [k for k in COMPARISON_KEYS.get(axis, ()) if k in ok]
    scaled_parts = []
    for _, sub in (ok.groupby(keys, dropna=False) if keys else [(None, ok)]):
        scaled_parts.append(normalise(sub, metrics))
    scaled = pd.concat(scaled_parts).loc[ok.index]
    scaled["technique"] = ok["technique"]
    mean = scaled.groupby("technique").mean(numeric_only=True)
    sets = scores_by_set(ok, axis)
    by_tech = sets[["score", "score_lo", "score_hi"]].groupby(ok["technique"]).mean()
    score = by_tech["score"]
    block = pd.DataFrame(index=mean.index)
    for col, m in cols.items():
        if m and m in mean and mean[m].notna().any():
            block[col] = mean[m].rank(ascending=False, method="min").astype("Int64")
        else:
            block[col] = pd.array([pd.NA] * len(mean), dtype="Int64")
    block["score"] = score.reindex(mean.index)
    block["score_lo"] = by_tech["score_lo"].reindex(mean.index)
    block["score_hi"] = by_tech["score_hi"].reindex(mean.index)
    block["score_rank"] = rank_with_ties(block["score"], block["score_lo"], block["score_hi"])
    block["n_techniques"] = len(mean)
    block["perf_metric"] = q or ""
    flagged = flags.groupby(ok["technique"]).any().reindex(mean.index).fillna(False)
    block["flag"] = np.where(flagged, WORSE_THAN_UNIFORM, "")
    # columns where this technique shares its rank (a tie within the 95 % intervals)
    block["ties"] = [",".join(c for c in RANK_COLUMNS if pd.notna(block.at[t, c])
                              and int((block[c] == block.at[t, c]).sum()) > 1)
                     for t in block.index]
    return block.reset_index()


def rank_table(tidy_df: pd.DataFrame, axes: Sequence[str] | None = None) -> pd.DataFrame:
    """Fig. 2's rank table: one row per (axis, study, technique); rank 1 = best per column.

    Why these steps: techniques are compared within comparison sets (same size / base model /
    model and device), so each metric is first scaled per set (units and scales differ between
    sets), averaged over sets per technique, then ranked within the study. Columns Perf, AMU,
    PCU, AL, TT, ST, IT, AEC, MCR hold ``<NA>`` where the axis does not measure the metric. Also
    ``score`` (mean efficiency score), ``score_lo``/``score_hi`` (the mean of its per-set
    interval bounds, :func:`score_interval`), ``score_rank`` (by score, tied where the
    intervals overlap: :func:`rank_with_ties`), ``n_techniques``, ``perf_metric``, ``flag``
    (quality not ranked, e.g. perplexity worse than uniform) and ``ties`` (columns whose rank
    the technique shares). Differences inside the recorded 95 % intervals are ties
    (:func:`tie_with_best`). AMU ranks each axis's :func:`memory_metric` (inference: the
    increment above the baseline).
    """
    cols = ["axis", "study", "technique", *RANK_COLUMNS, "score", "score_lo", "score_hi",
            "score_rank", "n_techniques", "perf_metric", "flag", "ties"]
    if tidy_df is None or tidy_df.empty:
        return pd.DataFrame(columns=cols)
    axes = list(axes) if axes is not None else [a for a in STUDY_AXES
                                                if a in set(tidy_df["axis"].dropna())]
    blocks = []
    for axis in axes:
        wide = wide_table(tidy_df, axis, with_ci=True)
        if wide.empty:
            continue
        for study, sub in wide.groupby("study", dropna=False):
            b = _rank_block(sub, axis)
            if b.empty:
                continue
            b.insert(0, "study", study)
            b.insert(0, "axis", axis)
            blocks.append(b)
    if not blocks:
        return pd.DataFrame(columns=cols)
    return pd.concat(blocks, ignore_index=True)[cols]


def units_of(tidy_df: pd.DataFrame) -> dict[str, str]:
    """Metric name -> unit, as recorded (first non-null unit seen)."""
    if tidy_df is None or tidy_df.empty or "unit" not in tidy_df:
        return {}
    u = tidy_df.dropna(subset=["unit"]).drop_duplicates("metric")
    return dict(zip(u["metric"], u["unit"], strict=True))


__all__: list[Any] = [
    "FLOOR", "HIGHER_IS_BETTER", "RANK_COLUMNS", "COMPARISON_KEYS", "wide_table", "normalise",
    "efficiency_scores", "score_frame", "scores_by_set", "rank_table", "quality_metric",
    "default_metrics", "technique_labels", "resolve_weights", "units_of", "QUALITY_METRIC",
    "quality_flags", "tie_with_best", "no_difference", "spread_note", "repeat_noise",
    "NOISE_FLOOR_REL", "DEFAULT_NOISE_FLOOR_REL", "MEMORY_METRIC", "memory_metric",
    "StudyScoring", "study_scoring", "higher_is_better", "metric_noise", "score_interval",
    "rank_with_ties", "device_repeat_noise",
]
