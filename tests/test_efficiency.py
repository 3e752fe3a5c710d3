"""Efficiency score: scaling, harmonic mean, weights, nulls and the rank table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from fixtures_records import all_records

from effllm_helpers import results as R
from effllm_helpers.report import scoring as E


@pytest.fixture()
def three_by_two() -> pd.DataFrame:
    # amu_gb lower is better, tt higher is better
    return pd.DataFrame({"amu_gb": [1.0, 2.0, 3.0], "tt": [10.0, 30.0, 20.0]},
                        index=["a", "b", "c"])


@pytest.fixture(scope="module")
def tidy() -> pd.DataFrame:
    return pd.DataFrame([row for rec in all_records() for row in R.tidy_rows(rec)])


def test_scaling_maps_best_to_one_and_worst_to_floor(three_by_two: pd.DataFrame) -> None:
    n = E.normalise(three_by_two, ["amu_gb", "tt"])
    assert n["amu_gb"].tolist() == pytest.approx([1.0, 0.55, 0.1])  # lower raw is better
    assert n["tt"].tolist() == pytest.approx([0.1, 1.0, 0.55])  # higher raw is better


def test_constant_column_scales_to_one() -> None:
    n = E.normalise(pd.DataFrame({"al_s": [0.2, 0.2, np.nan]}), ["al_s"])
    assert n["al_s"].iloc[:2].tolist() == [1.0, 1.0] and math.isnan(n["al_s"].iloc[2])


def test_harmonic_mean_by_hand(three_by_two: pd.DataFrame) -> None:
    s = E.efficiency_scores(three_by_two, ["amu_gb", "tt"])
    by_hand = [2 / (1 / 1.0 + 1 / 0.1), 2 / (1 / 0.55 + 1 / 1.0), 2 / (1 / 0.1 + 1 / 0.55)]
    assert s.tolist() == pytest.approx(by_hand)


def test_weighted_harmonic_mean_by_hand(three_by_two: pd.DataFrame) -> None:
    s = E.efficiency_scores(three_by_two, ["amu_gb", "tt"], weights={"amu_gb": 3.0})
    assert s["b"] == pytest.approx(4 / (3 / 0.55 + 1 / 1.0))


def test_weights_change_the_ranking(three_by_two: pd.DataFrame) -> None:
    mem_first = E.efficiency_scores(three_by_two, ["amu_gb", "tt"], weights={"amu_gb": 100})
    speed_first = E.efficiency_scores(three_by_two, ["amu_gb", "tt"], weights={"tt": 10})
    assert mem_first.idxmax() == "a"
    assert speed_first.idxmax() == "b"


def test_zero_weight_drops_a_metric(three_by_two: pd.DataFrame) -> None:
    s = E.efficiency_scores(three_by_two, ["amu_gb", "tt"], weights={"tt": 0})
    assert s.tolist() == pytest.approx([1.0, 0.55, 0.1])


def test_null_metric_is_excluded_for_that_row_and_noted(three_by_two: pd.DataFrame) -> None:
    df = three_by_two.copy()
    df.loc["b", "tt"] = np.nan  # tt now 10 (a) and 20 (c): a -> 0.1, c -> 1
    s = E.efficiency_scores(df, ["amu_gb", "tt"])
    assert s["b"] == pytest.approx(0.55)  # only amu_gb counts for b
    assert s["a"] == pytest.approx(2 / (1 / 1.0 + 1 / 0.1))
    assert s.attrs["excluded"] == {"b": "tt: null"}


def test_row_with_no_metric_gets_nan() -> None:
    df = pd.DataFrame({"amu_gb": [1.0, np.nan], "tt": [1.0, np.nan]})
    assert math.isnan(E.efficiency_scores(df, ["amu_gb", "tt"]).iloc[1])


def test_unknown_direction_raises() -> None:
    with pytest.raises(KeyError, match="no direction"):
        E.normalise(pd.DataFrame({"mystery": [1.0, 2.0]}), ["mystery"])


def test_quality_weight_applies_to_the_axis_quality_metric() -> None:
    df = pd.DataFrame({"axis": "architecture", "val_ppl": [10.0, 20.0], "al_s": [2.0, 1.0]})
    s = E.efficiency_scores(df, ["val_ppl", "al_s"], weights={"quality": 0.0},
                            axis="architecture")
    assert s.tolist() == pytest.approx([0.1, 1.0])  # only latency left


def test_wide_table_has_one_row_per_run_including_failed(tidy: pd.DataFrame) -> None:
    w = E.wide_table(tidy, "finetuning")
    assert len(w) == w["run_id"].nunique() == 15
    assert (w["status"] == "failed").sum() == 1
    assert {"amu_gb", "eval_loss", "p.method", "technique"} <= set(w.columns)


def test_scores_by_set_rank_within_each_base_model(tidy: pd.DataFrame) -> None:
    w = E.wide_table(tidy, "finetuning")
    sc = E.scores_by_set(w, "finetuning")
    assert sc["set"][w["status"] == "ok"].nunique() == 2  # two base models
    assert sc["score"][w["status"] == "failed"].isna().all()
    freeze = w.index[(w["p.method"] == "freeze") & (w["status"] == "ok")]
    assert all("pcu: null" in sc.loc[i, "excluded"] for i in freeze)


def test_rank_table_ranks_best_first(tidy: pd.DataFrame) -> None:
    rt = E.rank_table(tidy)
    ft = rt[rt["axis"] == "finetuning"].set_index("technique")
    assert ft.loc["freeze", "AMU"] == 1 and ft.loc["full", "AMU"] == 7
    assert ft["TT"].isna().all() and ft["ST"].notna().all()
    assert set(rt["axis"]) == {"architecture", "finetuning", "inference", "cross_modal"}


def test_technique_label_names_every_param_varied_within_a_study() -> None:
    # QLoRA nf4 vs fp4 and the moe study's two dense baselines must not merge into one row
    wide = pd.DataFrame({
        "axis": ["finetuning"] * 3 + ["architecture"] * 3,
        "study": ["qlora"] * 3 + ["moe"] * 3,
        "p.method": ["lora", "lora", "lora", None, None, None],
        "p.quant": ["nf4", "fp4", "none", None, None, None],
        "p.base_model": ["a", "a", "a", None, None, None],
        "p.model.ffn": [None, None, None, "dense", "dense", "moe"],
        "p.model.d_ff_mult": [None, None, None, 2.0, 8.0, None],
        "p.model.size": [None, None, None, "small", "small", "small"],
        "p.seed": [0, 1, 2, 0, 0, 0],
    })
    assert E.technique_labels(wide).tolist() == ["lora+nf4", "lora+fp4", "lora",
                                                 "dense+d_ff_mult=2", "dense+d_ff_mult=8",
                                                 "moe"]
