"""A score carries its 95 % interval, and ranks tie where the intervals overlap (issue 29).

Two methods of equal cost (LoRA and rsLoRA) differ by a per cent in step time; which one a
machine under load makes faster is noise. Min-max scaling turns that per cent into a full-scale
difference, so the ranks swapped between a quiet and a busy run of the same study.
"""

from __future__ import annotations

import pandas as pd
import pytest

from effllm_helpers.report import scoring as E


def _set(al: list[float], al_ci: float = 0.003, loss: list[float] | None = None) -> pd.DataFrame:
    n = len(al)
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(n)], "status": "ok", "study": "s", "device": "cpu",
        "p.base_model": "m", "p.task": "t", "technique": [f"m{i}" for i in range(n)],
        "eval_loss": loss or [2.0] * n, "eval_loss.ci95": [0.01] * n,
        "al_s": al, "al_s.ci95": [al_ci] * n, "amu_gb": [1.0] * n,
    })


def test_the_interval_holds_the_point_score() -> None:
    sc = E.scores_by_set(_set([0.050, 0.100, 0.103, 0.200]), "finetuning")
    assert (sc["score_lo"] <= sc["score"]).all() and (sc["score"] <= sc["score_hi"]).all()
    assert (sc["score_lo"] < sc["score_hi"]).any()  # the noise moves some score


def test_equal_cost_methods_share_a_rank_and_a_slow_one_does_not() -> None:
    # a clearly fastest method, two of equal cost 3 % apart, a clearly slow one
    sc = E.scores_by_set(_set([0.050, 0.100, 0.103, 0.200]), "finetuning")
    ranks = E.rank_with_ties(sc["score"], sc["score_lo"], sc["score_hi"])
    assert ranks.tolist() == [1, 2, 2, 4]


def test_noise_that_swaps_two_equal_methods_does_not_swap_their_ranks() -> None:
    quiet = E.scores_by_set(_set([0.050, 0.100, 0.103, 0.200]), "finetuning")
    busy = E.scores_by_set(_set([0.100, 0.206, 0.200, 0.400], al_ci=0.006),
                           "finetuning")  # all slower, the equal pair's order swapped
    assert quiet["score"].iloc[1] > quiet["score"].iloc[2]
    assert busy["score"].iloc[2] > busy["score"].iloc[1]  # the point scores do swap
    r_quiet = E.rank_with_ties(quiet["score"], quiet["score_lo"], quiet["score_hi"])
    r_busy = E.rank_with_ties(busy["score"], busy["score_lo"], busy["score_hi"])
    assert r_quiet.tolist() == r_busy.tolist()


def test_a_difference_well_beyond_the_noise_orders_the_runs() -> None:
    sc = E.scores_by_set(_set([0.100, 0.150], al_ci=0.0005), "finetuning")
    assert E.rank_with_ties(sc["score"], sc["score_lo"], sc["score_hi"]).tolist() == [1, 2]


def test_metric_noise_is_the_largest_of_interval_repeats_and_floor() -> None:
    wide = _set([0.100, 0.110, 0.300], al_ci=0.001).assign(technique=["a", "a", "b"])
    assert E.metric_noise(wide, "al_s").tolist() == pytest.approx([0.01] * 3)  # repeats
    wide = wide.assign(technique=["a", "b", "c"])
    floor = E.DEFAULT_NOISE_FLOOR_REL * 0.110
    assert E.metric_noise(wide, "al_s").tolist() == pytest.approx([floor] * 3)
    assert E.metric_noise(wide, "al_s", floor=False).tolist() == pytest.approx([0.001] * 3)


def test_rank_with_ties_counts_only_the_intervals_wholly_above() -> None:
    score = pd.Series([0.9, 0.8, 0.5, None])
    lo = pd.Series([0.85, 0.70, 0.40, None])
    hi = pd.Series([0.95, 0.88, 0.60, None])
    ranks = E.rank_with_ties(score, lo, hi)
    assert ranks.iloc[:3].tolist() == [1, 1, 3] and ranks.isna().iloc[3]


def test_the_leaderboard_ranks_by_the_intervals() -> None:
    from fixtures_records import all_records

    from effllm_helpers import results as R
    from effllm_helpers.report import leaderboard

    tidy = pd.DataFrame([row for rec in all_records() for row in R.tidy_rows(rec)])
    board = leaderboard.leaderboard_frame(tidy)
    ok = board[board["status"] == "ok"]
    for _, g in ok.groupby("comparison_set"):
        for _, row in g.iterrows():
            above = int((g["score_lo"] > row["score_hi"]).sum())
            assert row["rank"] == 1 + above
        assert g.loc[g["score"].idxmax(), "rank"] == 1
        order = list(zip(g["rank"], -g["score"], strict=True))
        assert order == sorted(order)  # by rank, then the higher point score inside a tie


def test_repeats_on_the_same_device_widen_a_set_without_repeats() -> None:
    # set t: no repeats, 3 % apart; set u on the same device: two seeds of one method 10 % apart
    lone = _set([0.100, 0.103], al_ci=0.0005)
    seeds = _set([0.100, 0.110], al_ci=0.0005).assign(**{"p.task": "u", "technique": "m0"})
    both = pd.concat([lone, seeds], ignore_index=True)
    assert E.device_repeat_noise(both, "al_s", ["p.task"]) == pytest.approx(0.010 / 0.105)
    sc = E.scores_by_set(both, "finetuning")
    assert (sc.loc[:1, "not_ranking"] == "al_s").all()  # 3 % is inside the device's 10 %
    alone = E.scores_by_set(lone, "finetuning")
    assert (alone["not_ranking"] == "").all()  # without the other set it would rank
