"""Quality that can be trusted: intervals, one fixed metric per axis, ties, honest labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from fixtures_records import all_records

from effllm_helpers import evaluate
from effllm_helpers import results as R
from effllm_helpers.config import FinetuneParams
from effllm_helpers.report import figures as G
from effllm_helpers.report import scoring as E
from effllm_helpers.techniques import finetuning as ft


# ---------------------------------------------------------------- bootstrap intervals
def _acc(hits: list[bool]) -> dict:
    items = [{"answer": "a"} for _ in hits]
    preds = ["a" if h else "b" for h in hits]
    return evaluate.accuracy(preds, items, lambda p, it: p == it["answer"])


def test_accuracy_interval_contains_the_point_estimate() -> None:
    m = _acc([True, False, False, True, False, False, False, True] * 4)
    lo, hi = m["interval"]
    assert lo <= m["value"] <= hi and lo < hi
    assert m["ci_method"] == "bootstrap_items" and m["n"] == 32


def test_accuracy_interval_shrinks_with_more_items() -> None:
    small = _acc([True, False] * 8)
    large = _acc([True, False] * 200)
    assert small["value"] == large["value"] == 0.5
    assert large["ci95"] < small["ci95"] / 2


def test_perplexity_interval_is_over_blocks() -> None:
    class Noisy(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(16, 16)

        def forward(self, input_ids: torch.Tensor):  # noqa: ANN202
            return type("O", (), {"logits": self.emb(input_ids)})()

    torch.manual_seed(0)
    out = evaluate.perplexity(Noisy(), torch.randint(0, 16, (12, 9)), batch_size=4)
    lo, hi = out["ppl"]["interval"]
    assert lo <= out["ppl"]["value"] <= hi and out["ppl"]["ci_items"] == 12
    assert out["uniform_ppl"]["value"] == 16


# ---------------------------------------------------------------- fixed quality metric
def _set(**cols: list) -> pd.DataFrame:
    n = len(next(iter(cols.values())))
    base = {"run_id": [f"r{i}" for i in range(n)], "status": ["ok"] * n,
            "study": ["s"] * n, "axis": ["inference"] * n}
    return pd.DataFrame({**base, **cols})


def test_eval_loss_interval_is_over_items_and_token_weighted() -> None:
    from tiny_lm import TinyLM

    torch.manual_seed(0)
    model = TinyLM()
    ids = torch.randint(0, 32, (24, 12))
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[::3, 8:] = -100  # rows of different response lengths: the mean is token-weighted
    tensors = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    m = evaluate.eval_loss_metric(model, tensors, batch_size=5)
    assert m["value"] == pytest.approx(evaluate.eval_loss(model, tensors, batch_size=7))
    sums, counts = evaluate.item_losses(model, tensors, batch_size=5)
    assert len(sums) == 24 and m["n"] == 24 and m["n_tokens"] == sum(counts)
    assert m["value"] == pytest.approx(sum(sums) / sum(counts))
    lo, hi = m["interval"]
    assert lo < m["value"] < hi and m["ci_method"] == "bootstrap_items" and m["ci_items"] == 24
    one = {k: v[:1] for k, v in tensors.items()}  # one item: no interval, and the reason
    assert "ci95" not in evaluate.eval_loss_metric(model, one, 4)
    assert "fewer than 2 items" in evaluate.eval_loss_metric(model, one, 4)["ci95_reason"]


def test_fixed_quality_metric_is_used_even_when_another_varies() -> None:
    wide = _set(ppl=[10.0, 10.0], task_acc=[0.03, 0.06])
    assert E.quality_metric(wide, "inference") == "ppl"
    assert E.default_metrics(wide, "inference")[0] == "ppl"


def test_ppl_worse_than_uniform_is_flagged_and_not_ranked() -> None:
    wide = _set(ppl=[9680.0, 50.0], uniform_ppl=[4096.0, 4096.0], amu_gb=[1.0, 1.0])
    sf = E.score_frame(wide, ["ppl", "amu_gb"], quality="ppl")
    assert sf.loc[0, "flag"] and not sf.loc[1, "flag"]
    assert "worse than uniform" in sf.loc[0, "excluded"]
    assert sf.loc[0, "n_metrics"] == 1  # scored on memory only, not on its perplexity


# ---------------------------------------------------------------- ties
def test_identical_values_tie() -> None:
    n = E.normalise(_set(ppl=[10.0, 10.0, 20.0]), ["ppl"])
    assert n.loc[0, "ppl"] == n.loc[1, "ppl"] == 1.0


def test_difference_inside_the_interval_is_a_tie() -> None:
    wide = _set(ppl=[10.0, 10.5, 20.0])
    wide["ppl.ci95"] = [0.4, 0.4, 0.4]
    n = E.normalise(wide, ["ppl"])
    assert n.loc[0, "ppl"] == n.loc[1, "ppl"] == 1.0 and n.loc[2, "ppl"] == E.FLOOR


def test_difference_outside_the_interval_is_ranked() -> None:
    wide = _set(ppl=[10.0, 11.0, 20.0])
    wide["ppl.ci95"] = [0.4, 0.4, 0.4]
    n = E.normalise(wide, ["ppl"])
    assert n.loc[0, "ppl"] == 1.0 > n.loc[1, "ppl"] > n.loc[2, "ppl"]


def test_spread_inside_the_interval_says_no_difference() -> None:
    agg = pd.DataFrame({"val_ppl": [100.0, 100.9], "val_ppl_ci95": [2.0, 2.0]})
    assert G.spread_note(agg, "val_ppl") == "no difference"
    agg["val_ppl_ci95"] = [0.1, 0.1]
    assert G.spread_note(agg, "val_ppl") == ""


def test_rank_table_gives_tied_ranks_within_the_interval() -> None:
    rows = []
    for i, (att, ppl) in enumerate((("mha", 10.0), ("gqa", 10.3), ("mqa", 30.0))):
        rec = R.new_record(run_id=f"r{i}", study="attention", axis="architecture",
                           params={"model": {"attention": att, "size": "small"}}, status="ok")
        rec["quality"] = {"val_ppl": R.metric(ppl, "", "x", ci95=0.5)}
        rec["metrics"] = {"amu_gb": R.metric(1.0 + i, "GB", "x")}
        rows += R.tidy_rows(rec)
    rt = E.rank_table(pd.DataFrame(rows)).set_index("technique")
    assert rt.loc["mha", "Perf"] == rt.loc["gqa", "Perf"] == 1 and rt.loc["mqa", "Perf"] == 3
    assert "Perf" in rt.loc["gqa", "ties"] and "Perf" not in rt.loc["mqa", "ties"]


# ---------------------------------------------------------------- learning rate per method
def test_method_default_lr_is_applied_and_recorded() -> None:
    lr, source = ft.method_lr(FinetuneParams(method="full"))
    assert lr == 2e-5 and source.startswith("method default")
    assert ft.method_lr(FinetuneParams(method="lora"))[0] == 2e-4


def test_explicit_lr_wins_over_the_method_default() -> None:
    p = FinetuneParams(method="full", train={"lr": 1e-3})
    assert ft.method_lr(p) == (1e-3, "params: train.lr")
    p = FinetuneParams(method="full", train={"lr": 1e-3}, lr_by_method={"full": 3e-5})
    assert ft.method_lr(p) == (3e-5, "params: lr_by_method")


# ---------------------------------------------------------------- labels
@pytest.mark.parametrize("name", ["fig2_rank_table", "fig5_precision_polar",
                                  "pareto_fronts", "repeat_error_bars"])
def test_dollar_signs_in_a_model_name_draw(name: str, tmp_path: Path) -> None:
    recs = [r for r in all_records() if r["axis"] == "inference"]
    for r in recs:
        r["params"]["model"] = "org/my$x$-$\\bad{$model"  # mathtext raised on this
    tidy = pd.DataFrame([row for r in recs for row in R.tidy_rows(r)])
    drawn = G.FIGURES[name](tidy, tmp_path, None)
    assert drawn.paths[0].stat().st_size > 1000
    assert not [t for t in G.figure_texts(drawn.figure) if t.startswith(G.NO_DATA)]


def test_eval_loss_with_no_response_token_is_null_with_its_reason() -> None:
    # every response truncated away by max_len: no loss was measured, so none is recorded
    import torch

    from effllm_helpers import evaluate

    class _Zero(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))  # a device to read

        def forward(self, input_ids, attention_mask=None):
            from types import SimpleNamespace
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 5))

    ids = torch.ones(2, 4, dtype=torch.long)
    out = evaluate.eval_loss_metric(_Zero(), {"input_ids": ids, "attention_mask": ids,
                                              "labels": torch.full_like(ids, -100)}, 2)
    assert out["value"] is None and "no response tokens" in out["reason"]
