"""Leaderboard: CSV per axis with scores and units, one HTML row per run, sort/filter JS inline."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
import pytest
from fixtures_records import all_records

from effllm_helpers import results as R
from effllm_helpers.report import leaderboard as L


@pytest.fixture(scope="module")
def tidy() -> pd.DataFrame:
    return pd.DataFrame([row for rec in all_records() for row in R.tidy_rows(rec)])


@pytest.fixture(scope="module")
def written(tidy: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("board")
    return L.write_leaderboard(tidy, out / "leaderboard.html", out / "results")


def test_html_has_one_row_per_run(tidy: pd.DataFrame, written) -> None:
    page = written[0].read_text()
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    ids = re.findall(r"<code>([^<]+)</code>", body)
    assert sorted(ids) == sorted(tidy["run_id"].unique())
    assert body.count("<tr") == tidy["run_id"].nunique()
    assert body.count('class="failed"') == 3


def test_html_is_self_contained_with_sort_and_filter_js(written) -> None:
    page = written[0].read_text()
    assert "<style>" in page and "<script>" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no external assets
    assert "addEventListener('click'" in page and "sortBy" in page
    for key in ("axis", "size", "device"):
        assert f'data-filter="{key}"' in page
    assert '<option value="inference">' in page and '<option value="medium">' in page
    assert "amu_gb <span class=\"u\">(GB)</span>" in page  # units in headers


def test_csv_per_axis_with_score_rank_and_units(written) -> None:
    names = sorted(p.name for p in written[1])
    assert names == ["leaderboard_architecture.csv", "leaderboard_cross_modal.csv",
                     "leaderboard_finetuning.csv", "leaderboard_inference.csv"]
    ft = pd.read_csv(written[1][names.index("leaderboard_finetuning.csv")])
    for col in ("rank", "technique", "size", "device", "score", "excluded", "run_id",
                "amu_gb [GB]", "eval_loss [nats]", "st [samples/s/param]"):
        assert col in ft.columns
    assert "it [tokens/s]" not in ft.columns  # inference-only metric dropped here
    ok = ft[ft["status"] == "ok"]
    assert ok["score"].between(0.1, 1.0).all()
    assert sorted(ok.groupby("size")["rank"].min()) == [1, 1]
    best = ok.loc[ok["score"].idxmax()]
    assert best["rank"] == 1


def test_weights_reorder_the_board(tidy: pd.DataFrame) -> None:
    default = L.leaderboard_frame(tidy)
    mem = L.leaderboard_frame(tidy, weights={"amu_gb": 100.0})

    def top(board: pd.DataFrame) -> list[str]:
        pick = (board["axis"] == "finetuning") & (board["size"] == "embedded")
        return board[pick & (board["rank"] == 1)]["technique"].tolist()

    top, top_mem = top(default), top(mem)
    assert top_mem == ["freeze"] and top != top_mem


def test_empty_table_writes_an_empty_board(tmp_path: Path) -> None:
    html_path, csvs = L.write_leaderboard(R.collect(tmp_path / "none"), tmp_path / "lb.html",
                                          tmp_path)
    assert csvs == [] and "0 runs" in html_path.read_text()


def test_filter_options_skip_nulls_and_match_row_attributes() -> None:
    # records without p.model.size etc. give pd.NA: no traceback, no "<NA>"/"nan" option
    opts = L._options(pd.Series(["b", pd.NA, None, float("nan"), "a", 8.0], dtype=object))
    assert re.findall(r'value="([^"]*)"', opts) == sorted(["a", "b", L._fmt(8.0)[0]])
    board = pd.DataFrame({c: [pd.NA] for c in L.ID_COLUMNS}).assign(
        axis="architecture", status="ok", size=[8.0], score_metrics="", excluded="",
        run_id="r")
    page = L.render_html(board)
    attr = re.search(r'<tr[^>]*data-size="([^"]*)"', page).group(1)
    assert f'<option value="{attr}">' in page


def test_headers_carry_definition_unit_direction_and_method_tooltips(written) -> None:
    page = written[0].read_text()
    tip = re.search(r'<th[^>]*data-label="amu_gb \(GB\)"[^>]*title="([^"]*)"', page).group(1)
    assert "average memory" in tip and "unit: GB" in tip and "lower is better" in tip
    assert "method: " in tip
    it = re.search(r'<th[^>]*data-label="it \(tokens/s\)"[^>]*title="([^"]*)"', page).group(1)
    assert "higher is better" in it
    assert 'title="rank by efficiency score' in page


def test_metric_headers_name_the_axes_they_belong_to(written) -> None:
    page = written[0].read_text()
    axes = {name: ax for ax, name in re.findall(r'data-axes="([^"]*)" data-label="(\w+)', page)}
    assert axes["tt"] == "architecture cross_modal" and axes["it"] == "inference"
    assert axes["st"] == "cross_modal finetuning"
    assert axes["frechet_classifier_distance"] == "cross_modal"


def test_one_axis_is_selected_by_default() -> None:
    board = L.leaderboard_frame(pd.DataFrame(
        [row for rec in all_records() for row in R.tidy_rows(rec)]))
    page = L.render_html(board)
    assert '<option value="architecture" selected>' in page
    page = L.render_html(board, default_axis="inference")
    assert '<option value="inference" selected>' in page


def test_page_links_the_per_axis_csvs_relative_to_itself(written) -> None:
    page = written[0].read_text()
    hrefs = re.findall(r'<a href="([^"]+\.csv)" download>', page)
    assert hrefs == ["results/leaderboard_architecture.csv", "results/leaderboard_cross_modal.csv",
                     "results/leaderboard_finetuning.csv", "results/leaderboard_inference.csv"]
    assert all((written[0].parent / h).is_file() for h in hrefs)


def test_page_offers_latex_and_markdown_export(written) -> None:
    page = written[0].read_text()
    assert 'id="export-latex"' in page and 'id="export-md"' in page
    assert 'id="export-text"' in page and "\\begin{tabular}" in page
