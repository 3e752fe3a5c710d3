"""effllm compare: ratios B/A, their intervals, ranking-change flags, the CSV and the figure."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from effllm_helpers import results as R
from effllm_helpers.cli import app
from effllm_helpers.report import compare as C

REPO = Path(__file__).resolve().parents[1]


def _rec(precision: str, device: str, *, ppl: float, tpot: float,
         tpot_ci: float | None = None, model: str = "tiny", extra: dict | None = None) -> dict:
    return R.new_record(
        run_id=f"{precision}-{device}-{model}", study="inference", axis="inference",
        params={"model": model, "precision": precision, **(extra or {})},
        metrics={"tpot_s": R.metric(tpot, "s", "hand-made", ci95=tpot_ci),
                 "amu_gb": R.metric(1.0, "GB", "hand-made")},
        quality={"ppl": R.metric(ppl, "ppl", "hand-made")},
        provenance={"device_name": device})


def _tidy(recs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for rec in recs for row in R.tidy_rows(rec)])


@pytest.fixture()
def a_b() -> tuple[pd.DataFrame, pd.DataFrame]:
    a = _tidy([_rec("fp16", "H100", ppl=10.0, tpot=0.010, tpot_ci=0.001),
               _rec("int8", "H100", ppl=10.5, tpot=0.020, tpot_ci=0.002)])
    # on B fp16 halves its TPOT, int8 quarters it: int8 becomes the faster one
    b = _tidy([_rec("fp16", "H200", ppl=10.0, tpot=0.005, tpot_ci=0.0005),
               _rec("int8", "H200", ppl=10.5, tpot=0.004),
               _rec("fp32", "H200", ppl=9.9, tpot=0.004)])
    return a, b


def _row(t: pd.DataFrame, tech: str, metric: str) -> pd.Series:
    return t[(t["technique"] == tech) & (t["metric"] == metric)].iloc[0]


def test_ratio_interval_propagates_relative_errors() -> None:
    r, lo, hi, src = C.ratio_interval(2.0, 3.0, 0.2, 0.3)  # 10 % each -> sqrt(2) * 10 %
    rel = math.sqrt(0.1 ** 2 + 0.1 ** 2)
    assert r == pytest.approx(1.5) and src == "A+B"
    assert (lo, hi) == pytest.approx((1.5 * (1 - rel), 1.5 * (1 + rel)))


def test_no_ci_on_either_side_gives_no_interval() -> None:
    assert C.ratio_interval(2.0, 3.0, None, float("nan"))[1:] == (None, None, "")


def test_only_techniques_present_in_both_are_compared(a_b) -> None:
    t = C.compare(*a_b, ["tpot_s"])
    assert sorted(t["technique"]) == ["fp16", "int8"]  # fp32 exists only in B


def test_ratios_and_intervals_per_technique(a_b) -> None:
    t = C.compare(*a_b, ["tpot_s"])
    fp16, int8 = _row(t, "fp16", "tpot_s"), _row(t, "int8", "tpot_s")
    assert fp16["ratio"] == pytest.approx(0.5) and fp16["ci_from"] == "A+B"
    assert fp16["ratio_high"] == pytest.approx(0.5 * (1 + math.sqrt(2) * 0.1))
    assert int8["ratio"] == pytest.approx(0.2) and int8["ci_from"] == "A"
    assert int8["ratio_low"] == pytest.approx(0.2 * 0.9)


def test_ranking_change_is_flagged(a_b) -> None:
    t = C.compare(*a_b, ["tpot_s", "ppl"])
    tp = t[t["metric"] == "tpot_s"].set_index("technique")
    assert tp.loc["fp16", ["rank_a", "rank_b"]].tolist() == [1, 2]
    assert tp["rank_changed"].all()
    assert not t[t["metric"] == "ppl"]["rank_changed"].any()
    assert C.changed_orders(t) == [
        "inference/inference/tiny tpot_s: A fp16 > int8  |  B int8 > fp16"]


def test_labels_that_differ_only_by_a_setting_varied_on_one_side_still_match() -> None:
    a = _tidy([_rec("fp16", "H100", ppl=10.0, tpot=0.01, extra={"compute_dtype": "bf16"}),
               _rec("int8", "H100", ppl=10.5, tpot=0.02, extra={"compute_dtype": None})])
    b = _tidy([_rec("fp16", "H200", ppl=10.0, tpot=0.005),
               _rec("int8", "H200", ppl=10.5, tpot=0.004)])
    t = C.compare(a, b, ["tpot_s"])
    assert dict(zip(t["technique"], t["technique_b"], strict=True)) == {
        "fp16+compute_dtype=bf16": "fp16", "int8": "int8"}


def test_two_sizes_are_compared_when_picked_on_each_side() -> None:
    tidy = _tidy([_rec("fp16", "H100", ppl=10.0, tpot=0.01, model="small"),
                  _rec("fp16", "H100", ppl=8.0, tpot=0.03, model="large")])
    assert C.compare(tidy, tidy, ["tpot_s"])["ratio"].tolist() == [1.0, 1.0]
    t = C.compare(tidy, tidy, ["tpot_s"], size_a="small", size_b="large")
    assert t["size"].tolist() == ["small->large"] and t["ratio"].iloc[0] == pytest.approx(3.0)


def test_a_side_mixing_devices_must_pick_one() -> None:
    a = _tidy([_rec("fp16", "H100", ppl=10.0, tpot=0.01),
               _rec("fp16", "A100", ppl=10.0, tpot=0.02)])
    with pytest.raises(C.RecommendError, match="several devices"):
        C.compare(a, a)
    assert len(C.compare(a, a, ["tpot_s"], device_a="H100", device_b="A100")) == 1


def test_cpu_tiny_reference_against_itself_is_all_ones_without_flags() -> None:
    tidy = C.load_tidy(REPO / "outputs/reference/cpu-tiny/results/results.csv")
    t = C.compare(tidy, tidy)
    # cross-modal included: the compare used to drop its runs
    assert len(t) > 0 and set(t["axis"]) == {"architecture", "finetuning", "inference",
                                             "cross_modal"}
    assert (t["ratio"].dropna() == 1.0).all() and not t["rank_changed"].any()


def test_h100_reference_against_a_perturbed_copy(tmp_path: Path) -> None:
    tidy = C.load_tidy(REPO / "outputs/reference/nvidia-h100-80gb-hbm3/runs")
    tidy = tidy[tidy["axis"] == "inference"]
    b = tidy.copy()
    slow = (b["metric"] == "tpot_s") & b["p.precision"].eq("bf16")
    b.loc[slow, "value"] = b.loc[slow, "value"].astype(float) * 3  # bf16 now the slowest
    t = C.compare(tidy, b, ["tpot_s", "amu_gb"])
    bf16 = t[t["technique"].str.startswith("bf16")].set_index("metric")
    assert bf16.loc["tpot_s", "ratio"] == pytest.approx(3.0)
    assert bf16.loc["amu_gb", "ratio"] == pytest.approx(1.0)
    assert bf16.loc["tpot_s", "rank_changed"] and bf16.loc["tpot_s", "rank_b"] == 6
    assert not t[t["metric"] == "amu_gb"]["rank_changed"].any()


def test_cli_writes_csv_and_the_figure(a_b, tmp_path: Path) -> None:
    pa, pb = tmp_path / "a.csv", tmp_path / "b.csv"
    a_b[0].to_csv(pa, index=False)
    a_b[1].to_csv(pb, index=False)
    out = tmp_path / "cmp"
    res = CliRunner().invoke(app, ["compare", str(pa), str(pb), "--out", str(out),
                                   "--metric", "tpot_s", "--metric", "ppl"])
    assert res.exit_code == 0, res.output
    assert "ranking changed: inference/inference/tiny tpot_s" in res.output
    for name in ("compare.csv", "compare_ratios.png", "compare_ratios.pdf"):
        assert (out / name).stat().st_size > 0
    csv = pd.read_csv(out / "compare.csv")
    assert set(csv["metric"]) == {"tpot_s", "ppl"} and len(csv) == 4


def test_help_lists_out_and_metric() -> None:
    res = CliRunner().invoke(app, ["compare", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--out", "--metric", "--size-a", "--size-b", "--device-a", "--device-b"):
        assert opt in res.output


def test_cross_modal_runs_are_compared() -> None:
    # `effllm compare` used to drop every cross-modal run: its axis had no size column here
    tidy = C.load_tidy(REPO / "outputs/reference/nvidia-h200/runs/cross_modal_dit_attention")
    t = C.compare(tidy, tidy)
    assert set(t["axis"]) == {"cross_modal"} and set(t["size"]) == {"vit"}
    assert "frechet_classifier_distance" in set(t["metric"])


def test_an_axis_on_one_side_only_is_named() -> None:
    a = pd.DataFrame({"axis": ["inference", "cross_modal"]})
    b = pd.DataFrame({"axis": ["inference", "architecture"]})
    assert C.one_sided_axes(a, b) == ["architecture: runs in B only, nothing to compare",
                                      "cross_modal: runs in A only, nothing to compare"]


def test_an_unknown_metric_is_refused_not_ranked_as_higher_is_better(a_b) -> None:
    with pytest.raises(C.RecommendError, match="'made_up'; known: "):
        C.compare(*a_b, ["made_up"])
