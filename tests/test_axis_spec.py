"""The axis specs (axes/spec.py): one entry per axis, and every table that reads them agrees."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from typer.testing import CliRunner

from effllm_helpers import config, notebook_view, studies
from effllm_helpers.axes import spec as S
from effllm_helpers.cli import app
from effllm_helpers.report import compare, figures, leaderboard, recommend, scoring

REPO = Path(__file__).resolve().parents[1]


def test_each_axis_has_a_notebook_a_module_and_its_schema() -> None:
    assert {n: s.params for n, s in S.SPECS.items()} == config.AXES
    for s in S.SPECS.values():
        assert (REPO / s.notebook).is_file(), s.notebook
        assert importlib.util.find_spec(s.module) is not None, s.module
        assert s.quality is None or s.quality in s.quality_choices


def test_the_study_tables_are_views_of_the_specs() -> None:
    assert scoring.STUDY_AXES == ("architecture", "finetuning", "inference", "cross_modal")
    assert studies.NOTEBOOK_AXES["notebooks/04_cross_modal.ipynb"] == "cross_modal"
    assert scoring.QUALITY_METRIC["cross_modal"] == S.spec("cross_modal").quality
    assert leaderboard.SIZE_COLUMN["cross_modal"] == "p.target"


def test_compare_recommend_and_the_repeats_figure_cover_every_study_axis() -> None:
    for table in (recommend.SIZE_COLUMN, compare.HEADLINE, figures.REPEAT_METRICS):
        assert tuple(table) == S.STUDY_AXES
    assert all(len(m) == 4 for m in figures.REPEAT_METRICS.values())  # four panels a row
    assert notebook_view.FOREIGN_METRICS["inference"] == S.spec("inference").foreign_metrics


@pytest.mark.parametrize("command", ["recommend", "compare"])
def test_the_cli_help_lists_every_study_axis(command: str) -> None:
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "300"})
    assert res.exit_code == 0
    for axis in S.STUDY_AXES:
        assert axis in res.output


def test_every_axis_figure_is_drawn_and_in_report_order() -> None:
    per_axis = [f for s in S.SPECS.values() for f in s.figures]
    assert list(figures.FIGURES)[1:1 + len(per_axis)] == per_axis
    spec, keys = S.axis_of_figure("fig3a_attention_radar")
    assert spec.name == "architecture" and keys == ("p.model.attention",)


def test_an_unknown_axis_names_the_known_ones() -> None:
    with pytest.raises(KeyError, match="known: architecture, finetuning"):
        S.spec("audio")


def test_a_figure_keeps_to_the_studies_that_vary_its_setting() -> None:
    import pandas as pd

    wide = pd.DataFrame({"study": ["a", "a", "b", "b", "c"], "status": "ok",
                         "p.model.attention": ["mha", "gqa", "gqa", "gqa", "mla"]})
    assert figures.studies_varying(wide, "p.model.attention") == ["a"]
    assert figures.studies_varying(wide, "p.model.positional") == []
