"""Figures: every figure writes a PNG and a PDF, and says "no data" on itself when it has none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures_records import all_records, inference_records

from effllm_helpers import results as R
from effllm_helpers.report import figures as G


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
    from effllm_helpers.report import figures as F

    curves = {"loss_vs_tokens": {"x": [64, 128], "y": [5.0, 4.0]},
              "val_loss_vs_tokens": {"x": [128], "y": [4.5]},
              "loss_vs_joules": {"x": [], "y": [], "reason": "no RAPL here"}}
    fig = F.run_curves(curves, "gqa small")
    ax_t, ax_j = fig.axes
    assert [len(line.get_xdata()) for line in ax_t.get_lines()] == [2, 1]
    assert any("no RAPL here" in t for t in F.figure_texts(fig))
    assert not ax_j.get_lines()


def _tidy(recs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([r for rec in recs for r in R.tidy_rows(rec)])


def _arch(**kw) -> list[dict]:
    from fixtures_records import architecture_records

    return architecture_records(np.random.default_rng(0), **kw)


def test_fig3_keeps_to_its_own_study(tmp_path: Path) -> None:
    # the positional and moe studies also have gqa/rope/dense small runs: not attention repeats
    drawn = G.fig3a_attention_radar(_tidy(_arch()), tmp_path)
    titles = [ax.get_title() for ax in drawn.figure.axes if ax.get_title()]
    assert "size: small  (10 runs)" in titles  # 5 attention variants x 2 seeds
    sub = G._arch_rows(_tidy(_arch()), ["p.model.positional"], "x")
    assert set(sub["study"]) == {"positional"} and len(sub) == 5


def test_hold_fixed_keeps_default_ffn_width() -> None:
    wide = pd.DataFrame({"status": "ok", "p.model.attention": ["mha", "gqa", "gqa"],
                         "p.model.d_ff_mult": [np.nan, np.nan, 8.0]})
    assert G._hold_fixed(wide, ["p.model.attention"]).index.tolist() == [0, 1]


def test_config_cols_include_study_when_it_varies() -> None:
    wide = pd.DataFrame({"study": ["a", "b"], "device": ["d", "d"], "p.x": [1, 1],
                         "p.seed": [0, 1]})
    assert G._config_cols(wide) == ["p.x", "study"]


PAPER = ["fig3a_attention_radar", "fig3b_positional_bars", "fig3c_moe_bubbles",
         "fig4a_peft_score_loss", "fig4b_peft_area_loss", "fig5_precision_polar"]


@pytest.mark.parametrize("name", PAPER)
def test_paper_figures_refuse_to_average_devices(name: str, tmp_path: Path) -> None:
    from fixtures_records import all_records

    recs = all_records()
    for rec in all_records(seed=1):
        rec["run_id"] += "-b"
        rec["provenance"]["device_name"] = "Other GPU"
        recs.append(rec)
    texts = _no_data_texts(G.FIGURES[name](_tidy(recs), tmp_path))
    assert len(texts) == 1 and "runs from 2 devices" in texts[0]
    assert "report one device's records" in texts[0]


@pytest.mark.parametrize(("name", "study", "key", "keep"), [
    ("fig3a_attention_radar", "attention", "attention", "gqa"),
    ("fig3b_positional_bars", "positional", "positional", "rope"),
])
def test_fig3_needs_two_values_of_the_varied_setting(name: str, study: str, key: str,
                                                     keep: str, tmp_path: Path) -> None:
    recs = [r for r in _arch() if r["study"] == study
            and r["params"]["model"][key] == keep and r["status"] == "ok"]
    texts = _no_data_texts(G.FIGURES[name](_tidy(recs), tmp_path))
    assert texts == [f"no data: only {keep} in the runs (need two {key} settings)"]


def test_fig3c_says_params_na_instead_of_inventing_them(tmp_path: Path) -> None:
    tidy = _tidy(_arch())
    moe = tidy["run_id"].str.contains("-rope-moe-")
    tidy = tidy[~(moe & (tidy["metric"] == "params_total"))]
    drawn = G.fig3c_moe_bubbles(tidy, tmp_path)
    legend = [t.get_text() for t in drawn.figure.axes[0].get_legend().get_texts()]
    assert sum("params n/a" in t for t in legend) == 2  # moe small and medium
    assert all("M params" in t for t in legend if t.startswith("dense"))


def test_fig3c_separates_dense_baselines_by_ffn_width(tmp_path: Path) -> None:
    recs = _arch()
    for rec in [r for r in recs if r["study"] == "moe" and r["params"]["model"]["ffn"]
                == "dense"]:
        wide = {**rec, "run_id": rec["run_id"] + "-x8",
                "params": {**rec["params"], "model": {**rec["params"]["model"],
                                                       "d_ff_mult": 8}}}
        recs.append(wide)
    drawn = G.fig3c_moe_bubbles(_tidy(recs), tmp_path)
    legend = [t.get_text() for t in drawn.figure.axes[0].get_legend().get_texts()]
    assert sum(t.startswith("dense (FFN x8)") for t in legend) == 2
    assert sum(t.startswith("dense small") for t in legend) == 1


def test_loss_curve_labels_skip_missing_size(tmp_path: Path) -> None:
    from fixtures_records import _curves

    rec = R.new_record(run_id="ft", study="peft", axis="finetuning",
                       params={"method": "lora", "base_model": "b", "seed": 0},
                       metrics={"amu_gb": R.metric(1.0, "GB", "synthetic")},
                       curves=_curves(np.random.default_rng(0), 1.0, 50.0, 1000.0))
    rec2 = {**rec, "run_id": "arch", "study": "attention", "axis": "architecture",
            "params": {"model": {"attention": "gqa", "size": "small"}, "seed": 0}}
    root = tmp_path / "runs"
    for r in (rec, rec2):
        R.write_record(root / r["study"] / r["run_id"], r)
    drawn = G.fig_loss_curves(R.collect(root), tmp_path, root)
    legends = [t.get_text() for ax in drawn.figure.axes if ax.get_legend()
               for t in ax.get_legend().get_texts()]
    assert "lora" in legends and not any("nan" in t for t in legends)


def test_text_axis_figures_order_variants_and_methods_as_the_catalog_registers_them() -> None:
    # the cross-modal figures keep their own (DiT) orders under their own names; they once
    # shadowed these, and Fig. 3a / 4 then sorted NSA, LoRA+, RSLoRA and PiSSA alphabetically last
    from effllm_helpers import catalog

    assert tuple(G.ATTENTION_ORDER) == tuple(catalog.ATTENTION)
    assert tuple(G.METHOD_ORDER) == tuple(catalog.FINETUNE_METHODS)
