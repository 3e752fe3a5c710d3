"""A metric enters a comparison set's score only when it spreads beyond its noise (issue 29.1).

A CPU's PCU (process CPU time over wall time) reads ~0.98 for every fine-tuning method; min-max
scaling stretched that 1 % to the full [0.1, 1] and let it decide the ranking.
"""

from __future__ import annotations

import pandas as pd
import pytest

from effllm_helpers.report import scoring as E


def _set(pcu: list[float], techniques: list[str] | None = None) -> pd.DataFrame:
    """One fine-tuning comparison set: PCU as a CPU reads it, latency and memory that differ."""
    n = len(pcu)
    return pd.DataFrame({
        "run_id": [f"r{i}" for i in range(n)], "status": "ok", "study": "s", "device": "cpu",
        "p.base_model": "m", "p.task": "t",
        "technique": techniques or [f"m{i}" for i in range(n)],
        "eval_loss": [2.0] * n, "amu_gb": [1.0 + 0.3 * i for i in range(n)],
        "pcu": pcu, "al_s": [0.5 - 0.1 * i for i in range(n)], "st": [1.0] * n,
    })


def test_cpu_pcu_does_not_enter_the_score() -> None:
    # the slowest, largest run (r0) is the busiest CPU: with PCU in, PCU lifts it
    wide = _set([0.988, 0.980, 0.975])
    sc = E.scores_by_set(wide, "finetuning")
    assert "pcu" not in sc["metrics"].iloc[0].split(",")
    assert (sc["not_ranking"] == "pcu").all()
    assert sc["excluded"].str.contains("pcu: left out of this set's score").all()


def test_excluding_pcu_gives_the_score_without_it() -> None:
    wide = _set([0.988, 0.980, 0.975])
    with_rule = E.scores_by_set(wide, "finetuning")["score"]
    no_pcu = E.scores_by_set(wide.drop(columns="pcu"), "finetuning", beyond_noise=False)["score"]
    assert with_rule.tolist() == pytest.approx(no_pcu.tolist())


def test_a_metric_that_spreads_beyond_its_floor_stays() -> None:
    wide = _set([0.9, 0.6, 0.3])  # a GPU's utilisation can differ by method
    sc = E.scores_by_set(wide, "finetuning")
    assert "pcu" in sc["metrics"].iloc[0].split(",") and (sc["not_ranking"] == "").all()


def test_repeat_noise_keeps_out_a_spread_above_the_floor() -> None:
    # 5 % spread over the set, but two seeds of one method already differ by 5 %
    wide = _set([1.00, 0.95, 0.97], techniques=["a", "a", "b"])
    assert E.repeat_noise(wide, "pcu") == pytest.approx(0.05)
    assert E.spread_note(wide, "pcu") is not None
    assert E.spread_note(wide.assign(technique=["a", "b", "c"]), "pcu") is None


def test_quality_is_never_left_out() -> None:
    wide = _set([0.9, 0.6, 0.3]).assign(eval_loss=[2.000, 2.001, 2.002])
    assert "eval_loss" in E.scores_by_set(wide, "finetuning")["metrics"].iloc[0].split(",")
