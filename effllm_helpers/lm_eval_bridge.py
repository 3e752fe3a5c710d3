"""lm-evaluation-harness bridge: score an in-memory HF model on lm-eval tasks, offline.

Why this exists: the paper's inference "quality" is the mean of the six Open LLM Leaderboard v2
tasks run through lm-evaluation-harness (EfficientLLM, arXiv 2505.13840, inference section).
The models here are built in memory (never pushed to or pulled from the Hub), so they go to
lm-eval as objects through ``HFLM(pretrained=<model>, tokenizer=<tokenizer>)``, and every task
result comes back as one of our metric values (``results.metric`` / ``results.missing``).

Each task runs in its own ``simple_evaluate`` call so that one task whose dataset is not in the
local cache (offline machines, gated sets such as GPQA) or whose extra dependencies are missing
becomes a null metric with the reason, while the others are still scored.

Which number is a task's score (:func:`primary_metric`):

* Open LLM Leaderboard v2 tasks use the metric the Leaderboard reports: MMLU-Pro ``acc``
  (its YAML defines only ``acc``); BBH, GPQA and MuSR ``acc_norm``; MATH-hard ``exact_match``;
  IFEval the mean of ``prompt_level_strict_acc`` and ``inst_level_strict_acc`` (the Leaderboard's
  "strict accuracy"). Groups (BBH, GPQA, MuSR, MATH-hard) use lm-eval's group aggregate, a
  mean of the subtasks weighted by their sizes.
* Any other task: ``acc_norm`` if present, else ``acc``, else ``exact_match``, else the first
  higher-is-better metric (alphabetically) whose value is a 0-1 fraction. The filter ``none`` is
  preferred, then ``strict-match``, then the first alphabetically.

Scores are the raw 0-1 values lm-eval computes. The Leaderboard additionally rescales each task
between its random-guess baseline and 1 for display only; that is *not* applied here (a tiny model
would sit at 0 on every task and the comparison between techniques would be lost).

Offline: :func:`evaluate_tasks` switches Hugging Face Hub / datasets to offline mode for its
duration (env vars and the already-imported libraries' flags), so a task whose data is not
cached fails at once instead of waiting on network timeouts. ``lm_eval`` itself is imported only
inside the functions: importing this module costs nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from .results import metric, missing
from .runenv import TASK_FILES_ENV, task_files_allowed

log = logging.getLogger(__name__)

UNIT = "fraction"

#: The six Open LLM Leaderboard v2 tasks, by their lm-eval (0.4.x) names (groups for BBH, GPQA,
#: MATH-hard and MuSR; single tasks for MMLU-Pro and IFEval).
PAPER_TASKS: tuple[str, ...] = (
    "leaderboard_mmlu_pro",
    "leaderboard_bbh",
    "leaderboard_gpqa",
    "leaderboard_ifeval",
    "leaderboard_math_hard",
    "leaderboard_musr",
)

#: Task-name prefix -> metrics the Open LLM Leaderboard v2 reports (averaged when several).
#: A prefix matches the name itself and every ``<prefix>_...`` subtask.
LEADERBOARD_METRICS: dict[str, tuple[str, ...]] = {
    "leaderboard_mmlu_pro": ("acc",),
    "leaderboard_bbh": ("acc_norm",),
    "leaderboard_gpqa": ("acc_norm",),
    "leaderboard_musr": ("acc_norm",),
    "leaderboard_math": ("exact_match",),
    "leaderboard_ifeval": ("prompt_level_strict_acc", "inst_level_strict_acc"),
    "leaderboard_instruction_following": ("prompt_level_strict_acc", "inst_level_strict_acc"),
}

#: Generic preference order for tasks not in :data:`LEADERBOARD_METRICS`.
METRIC_PREFERENCE: tuple[str, ...] = ("acc_norm", "acc", "exact_match")
FILTER_PREFERENCE: tuple[str, ...] = ("none", "strict-match")


# ---------------------------------------------------------------- offline mode
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_OFFLINE_FLAGS = (  # (module, attribute) read at call time by the libraries
    ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_HUB_OFFLINE"),
    ("datasets.config", "HF_DATASETS_OFFLINE"),
)
_offline_lock = threading.Lock()


@contextlib.contextmanager
def offline_mode(enabled: bool = True) -> Iterator[None]:
    """Force Hub/datasets offline while inside, then restore the previous settings.

    The env vars alone are not enough: ``datasets`` and ``huggingface_hub`` read them once at
    import, so the flags of modules already imported are set as well.
    """
    if not enabled:
        yield
        return
    import datasets.config  # noqa: F401 - importing these does no network I/O
    import huggingface_hub.constants  # noqa: F401

    with _offline_lock:
        old_env = {k: os.environ.get(k) for k in _OFFLINE_ENV}
        old_flags = [(mod, attr, getattr(sys.modules[mod], attr)) for mod, attr in _OFFLINE_FLAGS]
        os.environ.update({k: "1" for k in _OFFLINE_ENV})
        for mod, attr, _ in old_flags:
            setattr(sys.modules[mod], attr, True)
    try:
        yield
    finally:
        with _offline_lock:
            for k, v in old_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            for mod, attr, value in old_flags:
                setattr(sys.modules[mod], attr, value)


# ---------------------------------------------------------------- task manager
_TASK_MANAGERS: dict[tuple[tuple[str, ...], bool], Any] = {}


def task_manager(include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None
                 = None, include_defaults: bool = True) -> Any:
    """A cached ``lm_eval.tasks.TaskManager``: indexing lm-eval's ~15k task YAMLs takes ~10 s."""
    if include_path is None:
        paths: tuple[str, ...] = ()
    elif isinstance(include_path, (str, os.PathLike)):
        paths = (str(Path(include_path).resolve()),)
    else:
        paths = tuple(str(Path(p).resolve()) for p in include_path)
    key = (paths, include_defaults)
    if key not in _TASK_MANAGERS:
        from lm_eval.tasks import TaskManager

        _TASK_MANAGERS[key] = TaskManager(include_path=list(paths) or None,
                                          include_defaults=include_defaults)
    return _TASK_MANAGERS[key]


# ---------------------------------------------------------------- metric choice
def _leaderboard_metrics(task: str) -> tuple[str, ...] | None:
    for prefix, names in LEADERBOARD_METRICS.items():
        if task == prefix or task.startswith(prefix + "_"):
            return names
    return None


def _metric_filters(entry: Mapping[str, Any]) -> dict[str, list[str]]:
    """``{"acc": ["none"], ...}`` from lm-eval's ``"<metric>,<filter>"`` keys (stderr left out)."""
    out: dict[str, list[str]] = {}
    for key, value in entry.items():
        if "," not in key or isinstance(value, str):
            continue
        name, filt = key.split(",", 1)
        if name.endswith("_stderr"):
            continue
        out.setdefault(name, []).append(filt)
    return out


def _pick_filter(filters: Sequence[str]) -> str:
    for pref in FILTER_PREFERENCE:
        if pref in filters:
            return pref
    return sorted(filters)[0]


def _is_fraction(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0


def primary_metric(task: str, entry: Mapping[str, Any],
                   higher_is_better: Mapping[str, Any] | None = None
                   ) -> tuple[tuple[str, ...], str] | None:
    """The metric name(s) and filter that make ``task``'s score, or None if it has none.

    ``entry`` is ``results["results"][task]`` from lm-eval. Several names (IFEval) are averaged.
    """
    available = _metric_filters(entry)
    wanted = _leaderboard_metrics(task)
    if wanted is not None:
        if not all(name in available for name in wanted):
            return None
        common = set.intersection(*(set(available[n]) for n in wanted))
        return (wanted, _pick_filter(sorted(common))) if common else None
    for name in METRIC_PREFERENCE:
        if name in available:
            return (name,), _pick_filter(available[name])
    for name in sorted(available):
        filt = _pick_filter(available[name])
        if (higher_is_better or {}).get(name) and _is_fraction(entry.get(f"{name},{filt}")):
            return (name,), filt
    return None


def _score_entry(task: str, entry: Mapping[str, Any], hib: Mapping[str, Any] | None
                 ) -> tuple[float, str, float | None] | str:
    """(score, metric label, stderr) for one lm-eval results entry, or the reason there is none."""
    choice = primary_metric(task, entry, hib)
    if choice is None:
        have = sorted(_metric_filters(entry))
        return f"no 0-1 score metric among {have or 'no metrics'}"
    names, filt = choice
    values = [entry[f"{n},{filt}"] for n in names]
    bad = [f"{n}={v!r}" for n, v in zip(names, values, strict=True) if not _is_fraction(v)]
    if bad:
        return f"metric not a 0-1 fraction: {', '.join(bad)}"
    score = sum(float(v) for v in values) / len(values)
    label = "+".join(names) + ("" if filt == "none" else f",{filt}")
    stderr = None
    if len(names) == 1:
        se = entry.get(f"{names[0]}_stderr,{filt}")
        stderr = float(se) if isinstance(se, (int, float)) and math.isfinite(se) else None
    return score, label, stderr


def task_score(task: str, res: Mapping[str, Any], limit: int | float | None = None
               ) -> dict[str, Any]:
    """Turn the ``simple_evaluate`` output of one requested ``task`` into a metric value.

    ``res`` must come from evaluating ``task`` alone: every leaf task in it belongs to ``task``.

    When lm-eval has no entry carrying a score for ``task`` itself (a tag, or a group without
    an aggregate), the leaf tasks' scores are combined weighted by their sample counts.
    """
    method = f"lm_eval:{task}"
    table = res.get("results", {})
    hib = res.get("higher_is_better", {})
    n_shot = res.get("n-shot", {})
    n_samples = res.get("n-samples", {})
    entry = table.get(task)
    scored = _score_entry(task, entry, hib.get(task)) if entry is not None else None
    if isinstance(scored, tuple):
        score, label, stderr = scored
        n = int(entry.get("sample_len", 0)) or None
        n_total = sum(int(c["original"]) for c in n_samples.values()) or None
        return metric(score, UNIT, f"{method}:{label}", n=n, n_total=n_total, stderr=stderr,
                      num_fewshot=n_shot.get(task), limit=limit)
    # combine leaf tasks (tags, groups that define no aggregate metric)
    leaves = [t for t in n_samples if t != task]
    parts: list[tuple[float, int, str]] = []
    reasons: list[str] = []
    for leaf in leaves:
        got = _score_entry(leaf, table.get(leaf, {}), hib.get(leaf))
        if isinstance(got, str):
            reasons.append(f"{leaf}: {got}")
        else:
            parts.append((got[0], int(table[leaf].get("sample_len", 0)), got[1]))
    if not parts or reasons:
        why = scored if isinstance(scored, str) else "; ".join(reasons) or "no results"
        return missing(UNIT, f"{task}: {why}", method=method)
    total = sum(n for _, n, _ in parts)
    if total <= 0:
        return missing(UNIT, f"{task}: no samples were evaluated", method=method)
    score = sum(s * n for s, n, _ in parts) / total
    labels = sorted({lab for _, _, lab in parts})
    return metric(score, UNIT, f"{method}:{'|'.join(labels)}", n=total,
                  n_total=sum(int(n_samples[t]["original"]) for t in leaves),
                  combined="sample-weighted mean of leaf tasks", limit=limit)


# ---------------------------------------------------------------- evaluation
def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def make_lm(model: Any, tokenizer: Any, batch_size: int = 8, **hflm_kwargs: Any) -> Any:
    """Wrap an in-memory causal LM and its tokenizer as an lm-eval ``HFLM`` (no Hub access)."""
    from lm_eval.models.huggingface import HFLM

    hflm_kwargs.setdefault("backend", "causal")  # our custom model types are not in HF's maps
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **hflm_kwargs)


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    include_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    include_defaults: bool = True,
    offline: bool = True,
    bootstrap_iters: int = 1000,
    **simple_evaluate_kwargs: Any,
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on each lm-eval task; ``{"lm_eval/<task>": metric, ..., "lm_eval/mean"}``.

    ``limit`` caps the documents per (sub)task (lm-eval's meaning: an int count, or a fraction
    if < 1), ``num_fewshot`` overrides the tasks' defaults (tasks whose YAML fixes 0 keep 0), and
    ``include_path`` adds folders of custom task YAMLs. ``include_defaults=False`` skips lm-eval's
    built-in task index (faster when only custom tasks are wanted). A task that cannot be
    loaded or evaluated becomes a null metric with the reason; ``lm_eval/mean`` is the plain
    mean of the task scores and is null unless every task was scored (a mean over a subset
    would be a different quantity from the paper's).
    """
    import lm_eval

    tasks = [tasks] if isinstance(tasks, str) else list(dict.fromkeys(tasks))
    out: dict[str, dict[str, Any]] = {}
    with offline_mode(offline):
        tm = task_manager(include_path, include_defaults)
        lm = make_lm(model, tokenizer, batch_size=batch_size)
        for task in tasks:
            key, method = f"lm_eval/{task}", f"lm_eval:{task}"
            if not task_files_allowed() and task not in tm.all_tasks:
                # lm-eval reads an unregistered name as a task file path, whose !function runs
                # code: refused here too, whatever the params validation saw
                out[key] = missing(UNIT, f"{task!r} is not a task of lm-eval's registry (a task "
                                   f"file needs {TASK_FILES_ENV}=1)", method=method)
                continue
            try:
                loaded = tm.load([task])
            except Exception as exc:  # unknown name, dataset not cached, missing extra deps
                log.warning("lm-eval task %s could not be loaded: %s", task, _one_line(exc))
                out[key] = missing(UNIT, f"task failed to load: {_one_line(exc)}", method=method)
                continue
            objs = ([loaded["groups"][task]] if task in loaded["groups"]
                    else list(loaded["tasks"].values()))
            try:
                res = lm_eval.simple_evaluate(
                    model=lm, tasks=objs, task_manager=tm, limit=limit, num_fewshot=num_fewshot,
                    log_samples=False, bootstrap_iters=bootstrap_iters, **simple_evaluate_kwargs)
            except Exception as exc:
                log.warning("lm-eval task %s failed: %s", task, _one_line(exc))
                out[key] = missing(UNIT, f"evaluation failed: {_one_line(exc)}", method=method)
                continue
            if res is None:  # non-zero rank in a distributed run
                out[key] = missing(UNIT, "no results on this process rank", method=method)
                continue
            out[key] = task_score(task, res, limit=limit)
    out["lm_eval/mean"] = mean_score(out, tasks)
    return out


def mean_score(scores: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> dict[str, Any]:
    """Mean of the ``lm_eval/<task>`` scores; null, naming the missing tasks, unless all exist."""
    method = "lm_eval:mean"
    if not tasks:
        return missing(UNIT, "no lm-eval tasks requested", method=method)
    values = [scores.get(f"lm_eval/{t}", {}).get("value") for t in tasks]
    absent = [t for t, v in zip(tasks, values, strict=True) if v is None]
    if absent:
        return missing(UNIT, f"{len(absent)} of {len(tasks)} tasks have no score: "
                       f"{', '.join(absent)}", method=method)
    return metric(sum(values) / len(values), UNIT, method, n=len(values), tasks=list(tasks))
