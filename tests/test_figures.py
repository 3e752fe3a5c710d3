"""Figures: every figure writes a PNG and a PDF, and says "no data" on itself when it has none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_records import all_records, inference_records

from effllm_helpers import figures as G
from effllm_helpers import results as R


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """Synthetic records of all three axes on disk (curves live in the JSON) + the tidy table."""
    root = tmp_path_factory.mktemp("runs")
    for rec in all_records():
        R.write_record(root / rec["study"] / rec["run_id"], rec)
    return R.collect(root), root


def _no_data_texts(drawn: G.Drawn) -> list[str]:
    return [t for t in G.figure_texts(drawn.figure) if t.startswith(G.NO_DATA)]


def _assert_files(drawn: G.Drawn, out: Path) -> None:
    assert [p.suffix for p in drawn.paths] == [".png", ".pdf"]
    for p in drawn.paths:
        assert p.parent == out and p.stem == drawn.name and p.stat().st_size > 1000
    assert drawn.paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert drawn.paths[1].read_bytes()[:5] == b"%PDF-"


@pytest.mark.parametrize("name", list(G.FIGURES))
def test_figure_draws_synthetic_runs(name: str, runs: tuple[pd.DataFrame, Path],
                                     tmp_path: Path) -> None:
    tidy, root = runs
    drawn = G.FIGURES[name](tidy, tmp_path, root)
    _assert_files(drawn, tmp_path)
    assert _no_data_texts(drawn) == []  # every axis is present, so nothing says "no data"
    assert drawn.figure.axes, "a drawn figure has axes"


@pytest.mark.parametrize("name", list(G.FIGURES))
def test_figure_on_empty_table_says_no_data(name: str, tmp_path: Path) -> None:
    empty = R.collect(tmp_path / "nothing")
    drawn = G.FIGURES[name](empty, tmp_path, tmp_path / "nothing")
    _assert_files(drawn, tmp_path)
    texts = _no_data_texts(drawn)
    assert len(texts) == 1 and len(texts[0]) > len(G.NO_DATA) + 5  # says why


def test_missing_axis_says_which_is_missing(tmp_path: Path) -> None:
    tidy = pd.DataFrame([r for rec in inference_records(np.random.default_rng(0))
                         for r in R.tidy_rows(rec)])
    drawn = G.fig3a_attention_radar(tidy, tmp_path)
    assert _no_data_texts(drawn) == ["no data: no architecture runs in the results"]
    assert _no_data_texts(G.fig5_precision_polar(tidy, tmp_path)) == []


def test_all_failed_runs_say_so(tmp_path: Path) -> None:
    rec = R.new_record(run_id="x", study="peft", axis="finetuning", params={"method": "lora"},
                       status="failed", error={"reason": "boom"})
    tidy = pd.DataFrame(R.tidy_rows(rec))
    assert _no_data_texts(G.fig4a_peft_score_loss(tidy, tmp_path)) == [
        "no data: all 1 finetuning runs failed"]


@pytest.mark.slow
def test_draw_all_writes_png_and_pdf_of_every_figure(runs: tuple[pd.DataFrame, Path],
                                                     tmp_path: Path) -> None:
    tidy, root = runs
    tidy = tidy[tidy["p.model"] == "gpt2"]  # keep it quick; other figures say "no data"
    paths = G.draw_all(tidy, root, tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"{n}.{e}" for n in G.FIGURES
                                                   for e in ("png", "pdf"))


def test_repeat_summary_averages_seeds_with_ci() -> None:
    wide = pd.DataFrame({"status": "ok", "p.x": ["a", "a", "a", "b"], "p.seed": [0, 1, 2, 0],
                         "al_s": [1.0, 2.0, 3.0, 5.0]})
    s = G.repeat_summary(wide, ["al_s"], ["p.x"]).set_index("p.x")
    assert s.loc["a", "al_s"] == pytest.approx(2.0) and s.loc["a", "al_s_n"] == 3
    assert s.loc["a", "al_s_ci95"] == pytest.approx(4.302653 * 1.0 / 3 ** 0.5, rel=1e-4)
    assert np.isnan(s.loc["b", "al_s_ci95"]) and s.loc["b", "al_s_n"] == 1


def test_pareto_mask_keeps_only_non_dominated_points() -> None:
    energy = [1.0, 2.0, 3.0, 2.5]
    ppl = [30.0, 20.0, 10.0, 25.0]  # (2.5, 25) is beaten by (2, 20)
    assert G.pareto_mask(energy, ppl, y_higher_better=False).tolist() == [True, True, True,
                                                                          False]
    assert G.pareto_mask(energy, ppl, y_higher_better=True).tolist() == [True, False, False,
                                                                         False]


def test_run_curves_draws_tokens_and_says_why_joules_are_missing():
    from effllm_helpers import figures as F

    curves = {"loss_vs_tokens": {"x": [64, 128], "y": [5.0, 4.0]},
              "val_loss_vs_tokens": {"x": [128], "y": [4.5]},
              "loss_vs_joules": {"x": [], "y": [], "reason": "no RAPL here"}}
    fig = F.run_curves(curves, "gqa small")
    ax_t, ax_j = fig.axes
    assert [len(line.get_xdata()) for line in ax_t.get_lines()] == [2, 1]
    assert any("no RAPL here" in t for t in F.figure_texts(fig))
    assert not ax_j.get_lines()
