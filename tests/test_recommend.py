"""effllm recommend: constraints, the Pareto front, ties, the binding constraint, infeasibility."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from effllm_helpers import results as R
from effllm_helpers.cli import app
from effllm_helpers.report import recommend as REC


def _rec(precision: str, *, ppl: float, amu: float, al: float, tpot: float,
         jpt: float | None, ppl_ci: float | None = None, device: str = "Test GPU") -> dict:
    def m(v: float | None, unit: str, **kw) -> dict:
        return R.missing(unit, "no energy counter here") if v is None else \
            R.metric(v, unit, "hand-made", **kw)
    return R.new_record(
        run_id=f"inf-{precision}-{device}", study="inference", axis="inference",
        params={"model": "tiny", "precision": precision},
        metrics={"amu_gb": m(amu, "GB"), "al_s": m(al, "s"), "tpot_s": m(tpot, "s"),
                 "j_per_token": m(jpt, "J/token")},
        quality={"ppl": m(ppl, "ppl", ci95=ppl_ci)},
        provenance={"device_name": device})


def _tidy(recs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for rec in recs for row in R.tidy_rows(rec)])


@pytest.fixture()
def tidy() -> pd.DataFrame:
    # fp32 best quality but large; int8 slow; nf4 small and fast, worse quality
    return _tidy([
        _rec("fp32", ppl=10.0, amu=4.0, al=0.10, tpot=0.010, jpt=1.0),
        _rec("bf16", ppl=10.2, amu=2.0, al=0.10, tpot=0.010, jpt=0.9),
        _rec("int8", ppl=10.4, amu=1.5, al=0.30, tpot=0.030, jpt=2.0),
        _rec("int4-nf4", ppl=11.0, amu=1.0, al=0.12, tpot=0.012, jpt=1.1),
    ])


def _status(ch: REC.Choice) -> dict[str, str]:
    return dict(zip(ch.table["technique"], ch.table["status"], strict=True))


def test_pareto_front_drops_a_run_worse_on_every_measured_objective() -> None:
    t = pd.DataFrame({"technique": ["a", "b", "c"], "ppl": [10.0, 11.0, 12.0],
                      "amu_gb": [2.0, 1.0, 3.0], "al_s": [0.1, 0.1, 0.2]})
    ch = REC.choose_in_set(t, [], axis="inference", quality="ppl")
    st = _status(ch)
    assert st["c"] == "dominated by a" and st["b"] == "pareto" and st["a"] == "CHOSEN"


def test_null_metric_neither_dominates_nor_is_dominated_on_it() -> None:
    # b lacks energy; on the shared objectives a is better, so b is dominated all the same;
    # c is worse on quality but only c measured energy low: c is not dominated by a on energy
    t = pd.DataFrame({"technique": ["a", "b", "c"], "ppl": [10.0, 11.0, 12.0],
                      "amu_gb": [1.0, 2.0, 1.0], "j_per_token": [1.0, None, 0.5]})
    st = _status(REC.choose_in_set(t, [], axis="inference", quality="ppl"))
    assert st["b"] == "dominated by a" and st["c"] == "pareto"


def test_quality_is_named_and_the_best_quality_on_the_front_wins(tidy) -> None:
    (ch,) = REC.recommend(tidy, "inference")
    assert ch.quality == "ppl" and ch.chosen == "fp32"
    assert "quality: ppl" in REC.format_choice(ch)


def test_binding_constraint_names_the_run_it_excluded_and_by_how_much(tidy) -> None:
    (ch,) = REC.recommend(tidy, "inference", max_memory_gb=3.0)
    assert ch.chosen == "bf16"
    binding = next(w for w in ch.why if w.startswith("binding constraint"))
    assert "--max-memory-gb" in binding and "fp32" in binding and "by 1 GB" in binding
    margin = next(w for w in ch.why if w.startswith("margin to runner-up"))
    assert "int8" in margin and "ppl -0.2" in margin


def test_constraint_that_does_not_bind_is_reported_as_such(tidy) -> None:
    (ch,) = REC.recommend(tidy, "inference", max_memory_gb=100.0)
    assert ch.chosen == "fp32"
    assert any(w.startswith("binding constraint: none") for w in ch.why)


def test_tpot_constraint_excludes_with_the_value_in_ms(tidy) -> None:
    (ch,) = REC.recommend(tidy, "inference", max_tpot_ms=20.0, max_memory_gb=1.8)
    st = _status(ch)
    assert st["int8"].startswith("excluded: --max-tpot-ms: 30 ms > 20 ms (by 10 ms)")
    assert ch.chosen == "int4-nf4"


def test_quality_within_combined_ci95_is_a_tie_broken_by_memory() -> None:
    # a is better by 0.1 but both ci95 are 0.1: |diff| <= hypot(0.1, 0.1) -> tie; b uses less
    # memory; b is on the front only because it is worse on quality but better on memory
    tidy = _tidy([_rec("fp32", ppl=10.0, amu=4.0, al=0.1, tpot=0.01, jpt=1.0, ppl_ci=0.1),
                  _rec("bf16", ppl=10.1, amu=2.0, al=0.1, tpot=0.01, jpt=1.0, ppl_ci=0.1)])
    (ch,) = REC.recommend(tidy, "inference")
    assert ch.tie and ch.tie_break == "amu_gb" and ch.chosen == "bf16"
    assert any(w.startswith("tie on ppl between") and "ci95" in w for w in ch.why)


def test_quality_outside_ci95_is_no_tie() -> None:
    tidy = _tidy([_rec("fp32", ppl=10.0, amu=4.0, al=0.1, tpot=0.01, jpt=1.0, ppl_ci=0.01),
                  _rec("bf16", ppl=10.1, amu=2.0, al=0.1, tpot=0.01, jpt=1.0, ppl_ci=0.01)])
    (ch,) = REC.recommend(tidy, "inference")
    assert not ch.tie and ch.chosen == "fp32"


def test_exactly_equal_quality_without_ci_is_a_tie() -> None:
    # both on the front (fp32: less memory, bf16: faster); equal quality -> memory decides
    tidy = _tidy([_rec("fp32", ppl=10.0, amu=2.0, al=0.2, tpot=0.01, jpt=1.0),
                  _rec("bf16", ppl=10.0, amu=3.0, al=0.1, tpot=0.01, jpt=1.0)])
    (ch,) = REC.recommend(tidy, "inference")
    assert ch.tie and ch.chosen == "fp32" and any("exactly equal" in w for w in ch.why)


def test_infeasible_names_the_closest_run_and_its_miss(tidy) -> None:
    (ch,) = REC.recommend(tidy, "inference", max_memory_gb=0.5)
    assert not ch.feasible
    assert ch.why[0].startswith("nothing satisfies --max-memory-gb 0.5")
    assert "closest: int4-nf4" in ch.why[0] and "by 0.5 GB" in ch.why[0]


def test_constraint_on_a_null_metric_excludes_as_unknown() -> None:
    tidy = _tidy([_rec("fp32", ppl=10.0, amu=4.0, al=0.1, tpot=0.01, jpt=None),
                  _rec("bf16", ppl=10.2, amu=2.0, al=0.1, tpot=0.01, jpt=0.5)])
    (ch,) = REC.recommend(tidy, "inference", max_energy_j_per_token=1.0)
    assert ch.chosen == "bf16"
    assert _status(ch)["fp32"] == "excluded: --max-energy-j-per-token: unknown (j_per_token null)"


def test_min_quality_on_perplexity_means_at_most(tidy) -> None:
    (ch,) = REC.recommend(tidy, "inference", min_quality=10.3, max_memory_gb=1.8)
    assert not ch.feasible and "closest: int8" in ch.why[0]


def test_devices_are_never_mixed() -> None:
    tidy = _tidy([_rec("fp32", ppl=10.0, amu=4.0, al=0.1, tpot=0.01, jpt=1.0, device="A"),
                  _rec("bf16", ppl=9.0, amu=2.0, al=0.1, tpot=0.01, jpt=1.0, device="B")])
    chs = REC.recommend(tidy, "inference")
    assert [(c.set_label, c.chosen) for c in chs] == [("A / tiny", "fp32"), ("B / tiny", "bf16")]


def test_cli_exits_1_with_the_closest_run_when_nothing_fits(tidy, tmp_path) -> None:
    csv = tmp_path / "results.csv"
    tidy.to_csv(csv, index=False)
    res = CliRunner().invoke(app, ["recommend", "--results", str(csv), "--max-memory-gb", "0.5"])
    assert res.exit_code == 1, res.output
    assert "nothing satisfies --max-memory-gb 0.5" in res.output and "closest: int4-nf4" in \
        res.output
    ok = CliRunner().invoke(app, ["recommend", "-r", str(csv), "--max-memory-gb", "3"])
    assert ok.exit_code == 0 and "CHOSEN" in ok.output


def test_cli_rejects_latency_and_tpot_together(tidy, tmp_path) -> None:
    csv = tmp_path / "results.csv"
    tidy.to_csv(csv, index=False)
    res = CliRunner().invoke(app, ["recommend", "-r", str(csv), "--max-latency-ms", "1",
                                   "--max-tpot-ms", "1"])
    assert res.exit_code == 2 and "not both" in res.output


def test_help_lists_every_constraint() -> None:
    res = CliRunner().invoke(app, ["recommend", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0
    for opt in ("--results", "--axis", "--max-memory-gb", "--max-latency-ms", "--max-tpot-ms",
                "--max-energy-j-per-token", "--min-quality", "--device", "--size"):
        assert opt in res.output
