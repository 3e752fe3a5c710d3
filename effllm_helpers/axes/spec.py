"""What each study axis is, in one place: its notebook, params class, quality metric, result
type and figure hooks.

Why one table: the sweep (a study's notebook must be its axis's), the study-file schema (which
quality metrics an axis may rank on), the scores (what a run is compared against and labelled
by) and the figures (which runs a figure draws) all need to know the axes, and used to keep their
own copies. They read :data:`SPECS` now, so adding an axis is its module under ``axes/``, its
notebook, its params class in ``config.py`` and one :class:`AxisSpec` here (see CONTRIBUTING.md).

This module imports neither torch nor the axis modules: ``AxisSpec.load()`` imports an axis's
module when a run needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from ..config import (
    ArchitectureParams,
    CrossModalParams,
    FinetuneParams,
    InferenceParams,
    SmokeParams,
    Strict,
)


@dataclass
class AxisResult:
    """What an axis's ``run`` returns, the same for every axis.

    ``metrics``, ``quality`` and ``model`` become the record's sections; ``curves`` the loss
    curves (empty where the axis trains nothing); ``notes`` what the reader must know. The rest
    is axis-specific and empty elsewhere: ``model_dir``/``eval_history`` (architecture: the saved
    model and the intermediate evaluations), ``examples`` (fine-tuning: generated answers),
    ``per_batch`` (inference: one row per batch size), ``samples`` (cross-modal: a few generated
    images, a tensor, for the notebook).
    """

    metrics: dict[str, Any]
    quality: dict[str, Any]
    model: dict[str, Any]
    curves: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    model_dir: str | None = None
    eval_history: list[dict[str, float]] = field(default_factory=list)
    examples: list[dict[str, str]] = field(default_factory=list)
    per_batch: list[dict[str, Any]] = field(default_factory=list)
    samples: Any = None

    def per_batch_rows(self) -> list[dict[str, Any]]:
        """One flat row per batch size (metric values only), for tables and the record."""
        return [{k: (v.get("value") if isinstance(v, dict) else v) for k, v in r.items()}
                for r in self.per_batch]


@dataclass(frozen=True)
class AxisSpec:
    """One study axis.

    ``quality`` is the one metric its runs are ranked on unless a study file names another of
    ``quality_choices``. ``efficiency_metrics`` make its default score, ``comparison_keys`` the
    columns a run shares with those it is compared against, ``technique_params`` the params that
    label a run, ``size_column`` the column the leaderboard calls its size, ``memory_metric``
    the memory its runs are ranked on (the rank table's AMU column, ``effllm recommend``'s
    memory objective): the total ``amu_gb``, or ``amu_increment_gb`` (above a baseline taken
    after every library is imported) where a fixed baseline would rank the machine, not the
    technique. ``headline`` are the efficiency metrics ``effllm compare`` shows beside quality,
    ``repeat_metrics`` the four panels of the repeats figure (quality first),
    ``foreign_metrics`` those measured on another axis's workload that never describe this one
    (the notebook's tables hide them), ``model_key`` the param naming the model a run loads
    (checked before a sweep starts), ``local_data`` the dotted params that may name local
    data (checked to exist before a sweep starts; a ``task`` here is a training task whose
    finite built-in pools are sized then too), ``warm_data`` the param whose corpus spec has
    its tokenizer and token cache built before any run (so no run pays for it in its measured
    process). ``figures`` maps each of its figures (a name in
    ``report.figures.FIGURES``) to the params whose variation selects the runs it draws: a
    figure draws the axis's runs of the studies that vary the first of them, whatever those
    study files are called.
    """

    name: str
    notebook: str  # repo-relative; a study file of this axis must name it
    params: type[Strict]
    module: str  # the axis module (``run(params) -> AxisResult``), imported by ``load``
    quality: str | None = None
    quality_choices: tuple[str, ...] = ()
    efficiency_metrics: tuple[str, ...] = ()
    comparison_keys: tuple[str, ...] = ()
    technique_params: tuple[str, ...] = ()
    size_column: str | None = None
    memory_metric: str = "amu_gb"
    headline: tuple[str, ...] = ()
    repeat_metrics: tuple[str, ...] = ()
    foreign_metrics: frozenset[str] = frozenset()
    model_key: str | None = None
    local_data: tuple[str, ...] = ()
    warm_data: str | None = None
    figures: dict[str, tuple[str, ...]] = field(default_factory=dict)
    study: bool = True  # False: a pipe test (smoke), not ranked, scored or drawn
    result: type = AxisResult

    def load(self) -> ModuleType:
        """The axis module (imports torch and the models)."""
        return importlib.import_module(self.module)


SPECS: dict[str, AxisSpec] = {s.name: s for s in (
    AxisSpec(
        name="architecture", notebook="notebooks/01_architecture.ipynb",
        params=ArchitectureParams, module="effllm_helpers.axes.architecture",
        quality="val_ppl", quality_choices=("val_ppl", "val_loss", "probe_acc"),
        efficiency_metrics=("amu_gb", "al_s", "tt", "aec_w"),
        comparison_keys=("study", "device", "p.model.size"),
        technique_params=("p.model.attention", "p.model.positional", "p.model.ffn",
                          "p.model.family"),
        size_column="p.model.size", local_data=("data.corpus",), warm_data="data",
        headline=("amu_gb", "al_s", "tt", "j_per_token"),
        repeat_metrics=("val_ppl", "al_s", "amu_gb", "energy_j"),
        foreign_metrics=frozenset({"st", "samples_per_s", "it", "ttft_s", "tpot_s", "mcr",
                                   "mcr_nominal", "size_bytes"}),
        figures={"fig3a_attention_radar": ("p.model.attention",),
                 "fig3b_positional_bars": ("p.model.positional",),
                 "fig3c_moe_bubbles": ("p.model.ffn", "p.model.d_ff_mult")},
    ),
    AxisSpec(
        name="finetuning", notebook="notebooks/02_finetuning.ipynb",
        params=FinetuneParams, module="effllm_helpers.axes.finetuning",
        quality="eval_loss", quality_choices=("eval_loss", "accuracy"),
        efficiency_metrics=("amu_gb", "pcu", "al_s", "st", "aec_w"),
        comparison_keys=("study", "device", "p.base_model", "p.task"),
        technique_params=("p.method", "p.quant"),
        size_column="p.base_model", model_key="base_model", local_data=("task",),
        headline=("amu_gb", "al_s", "st", "j_per_token"),
        repeat_metrics=("eval_loss", "al_s", "amu_gb", "aec_w"),
        foreign_metrics=frozenset({"tt", "it", "ttft_s", "tpot_s", "mcr", "mcr_nominal"}),
        figures={"fig4a_peft_score_loss": ("p.method",),
                 "fig4b_peft_area_loss": ("p.method",)},
    ),
    AxisSpec(
        name="inference", notebook="notebooks/03_inference.ipynb",
        params=InferenceParams, module="effllm_helpers.axes.inference",
        quality="ppl", quality_choices=("ppl", "val_loss", "task_acc"),
        # precisions rank on the memory they add: on a CPU the fixed baseline (interpreter,
        # torch, libraries) is 49-85 % of the total, on an H200 78-86 % is the CUDA context
        efficiency_metrics=("amu_increment_gb", "al_s", "it", "aec_w", "mcr"),
        comparison_keys=("study", "device", "p.model"),
        technique_params=("p.precision",),
        size_column="p.model", memory_metric="amu_increment_gb", model_key="model",
        headline=("amu_gb", "al_s", "tpot_s", "it", "j_per_token", "mcr"),
        repeat_metrics=("task_acc", "it", "amu_gb", "j_per_token"),
        foreign_metrics=frozenset({"tt", "st", "samples_per_s"}),
        figures={"fig5_precision_polar": ("p.precision",)},
    ),
    AxisSpec(
        name="cross_modal", notebook="notebooks/04_cross_modal.ipynb",
        params=CrossModalParams, module="effllm_helpers.axes.cross_modal",
        quality="frechet_classifier_distance",
        quality_choices=("frechet_classifier_distance", "sample_class_accuracy", "fid",
                         "val_loss", "eval_loss", "accuracy"),
        efficiency_metrics=("amu_gb", "al_s", "st", "aec_w"),
        comparison_keys=("study", "device", "p.experiment", "p.target", "p.data"),
        technique_params=("p.attention", "p.ffn", "p.method"),
        size_column="p.target", local_data=("data",),
        headline=("amu_gb", "al_s", "st", "j_per_token"),
        repeat_metrics=("frechet_classifier_distance", "al_s", "amu_gb", "aec_w"),
        figures={"fig6a_dit_attention": ("p.attention",),
                 "fig6b_peft_transfer": ("p.method",)},
    ),
    AxisSpec(
        name="smoke", notebook="notebooks/smoke.ipynb", params=SmokeParams,
        module="effllm_helpers.smoke", study=False,
    ),
)}

# the study axes, in figure order (the smoke axis only tests the pipe)
STUDY_AXES: tuple[str, ...] = tuple(n for n, s in SPECS.items() if s.study)
# the names, for modules about one axis (the paper's claims, the scaling pairs): spelled here only
ARCHITECTURE, FINETUNING, INFERENCE, CROSS_MODAL = STUDY_AXES
# the axis ``effllm recommend`` asks about when none is named: the serving question
DEFAULT_AXIS = "inference"


def spec(axis: str) -> AxisSpec:
    """The spec of ``axis``; an unknown axis raises with the known ones."""
    try:
        return SPECS[axis]
    except KeyError:
        raise KeyError(f"unknown axis {axis!r}; known: {', '.join(SPECS)}") from None


def of_module(module: str) -> AxisSpec:
    """The spec whose axis module is ``module`` (an axis module's own ``__name__``)."""
    for s in SPECS.values():
        if s.module == module:
            return s
    raise KeyError(f"no axis runs module {module!r}")


def of_params(params: type) -> AxisSpec:
    """The spec whose params class is ``params`` (code that holds a params object)."""
    for s in SPECS.values():
        if s.params is params:
            return s
    raise KeyError(f"no axis takes params {params.__name__}")


def axis_of_figure(figure: str) -> tuple[AxisSpec, tuple[str, ...]]:
    """The axis that draws ``figure`` and the params whose variation selects its runs."""
    for s in SPECS.values():
        if figure in s.figures:
            return s, s.figures[figure]
    raise KeyError(f"no axis draws figure {figure!r}")
