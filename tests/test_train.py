"""The training loop's bookkeeping: what AL, TT and compile_s count (tiny model, CPU, seconds)."""

from __future__ import annotations

import time

import pytest
import torch
from tiny_lm import BATCH, SEQ, VOCAB, TinyLM  # noqa: E402

from effllm_helpers import train
from effllm_helpers.config import MeasureSpec, TrainSpec


def blocks(n: int = 32) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(0))


def run(steps: int = 8, warmup: int = 1, compile: bool = False, evaluate=None,
        eval_every: int = 25, next_batch=None) -> train.TrainResult:
    torch.manual_seed(0)
    spec = TrainSpec(steps=steps, batch_size=BATCH, warmup_steps=1, eval_every=eval_every,
                     compile=compile, dtype="fp32")
    return train.train(TinyLM(), next_batch or train.block_batches(blocks(), BATCH), spec,
                       MeasureSpec(warmup_steps=warmup, sample_interval_s=0.05), n_params=1000,
                       evaluate=evaluate, progress=False)


def test_an_intermediate_evaluation_is_not_in_the_step_latency():
    eval_s = 0.5  # tiny-model steps take milliseconds

    def slow_eval(model):
        time.sleep(eval_s)
        return {"val_loss": 1.0}

    res = run(steps=8, warmup=1, evaluate=slow_eval, eval_every=2)
    al = res.metrics["al_s"]
    assert al["n"] == 8 - 1  # one latency per measured optimizer step, none per evaluation
    assert al["p99"] < eval_s
    assert al["excluded_eval_intervals"] == 3  # after steps 2, 4, 6 (the 8th is outside)
    assert res.metrics["duration_s"]["eval_inside_s"] >= 3 * eval_s


def test_an_intermediate_evaluation_is_in_no_rate_or_duration():
    """Issue 29.6: evaluations were 8.6-12.2 % of the H200 attention runs' windows and sat in
    the rates, MFU and energy; the Meter is paused for them now."""
    eval_s = 1.0  # seven tiny-model steps take far less, however loaded the machine

    def slow_eval(model):
        time.sleep(eval_s)
        return {"val_loss": 1.0}

    res = run(steps=8, warmup=1, evaluate=slow_eval, eval_every=2)
    dur = res.metrics["duration_s"]
    assert dur["n_pauses"] == 3 and dur["paused_s"] >= 3 * eval_s
    assert dur["value"] < dur["eval_inside_s"]  # the window is the steps alone
    tps = res.metrics["tokens_per_s"]
    assert tps["value"] == pytest.approx(tps["count"] / dur["value"])


def test_an_evaluation_during_warm_up_is_neither_measured_nor_a_warm_up_step():
    res = run(steps=6, warmup=3, evaluate=lambda m: {"val_loss": 1.0}, eval_every=1)
    assert res.metrics["al_s"]["n"] == 6 - 3
    # evaluations after steps 1 and 2 fall in warm-up; those after steps 3, 4, 5 are measured
    assert res.metrics["al_s"]["excluded_eval_intervals"] == 3


def test_throughput_counts_next_token_targets_not_tokens():
    res = run(steps=5, warmup=1)
    assert res.tokens == 5 * BATCH * (SEQ - 1)
    assert res.metrics["tokens_per_s"]["count"] == 4 * BATCH * (SEQ - 1)


def test_targets_leave_out_ignored_labels_after_the_shift():
    labels = torch.tensor([[5, 6, -100, 7], [-100, -100, 8, 9]])
    assert train.count_targets(labels) == 2 + 2  # label 5 and the first -100 have no prediction


def test_masked_labels_count_only_their_shifted_targets_in_training():
    ids = blocks(8)
    labels = ids.clone()
    labels[:, -4:] = -100  # padding with no loss after the text, as in SFT

    def next_batch(micro, rank, world):
        return {"input_ids": ids[:BATCH], "labels": labels[:BATCH]}

    res = run(steps=3, warmup=1, next_batch=next_batch)
    assert res.tokens == 3 * BATCH * (SEQ - 4 - 1)  # the first position predicts nothing


def test_compile_off_gives_a_null_compile_time_with_its_reason():
    res = run(steps=3, warmup=1)
    assert res.metrics["compile_s"]["value"] is None
    assert res.metrics["compile_s"]["reason"] == "compile off"


def test_compiling_steps_are_warm_up_and_timed_as_compile_s(monkeypatch):
    compiled = []

    def fake_compile(model, *args, **kwargs):
        compiled.append(model)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    res = run(steps=6, warmup=0, compile=True)
    assert compiled
    cs = res.metrics["compile_s"]
    assert cs["value"] > 0 and cs["method"] == "perf_counter_first_steps"
    assert cs["steps"] == train.COMPILE_WARMUP_STEPS == cs["warmup_steps"]
    assert cs["value"] == pytest.approx(sum(cs["step_s"]))
    # the compiling steps are the Meter's warm-up: AL and the rates start after them
    assert res.metrics["al_s"]["n"] == 6 - train.COMPILE_WARMUP_STEPS
    assert res.metrics["tokens_per_s"]["count"] == (6 - 2) * BATCH * (SEQ - 1)


def test_a_compile_that_fails_falls_back_to_eager_with_the_reason(monkeypatch):
    from torch._dynamo.exc import Unsupported

    class Broken(torch.nn.Module):
        """What torch.compile hands back for a model it cannot trace: fails when called."""

        def forward(self, **batch):
            raise Unsupported("graph break in a peft hook")

    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: Broken())
    res = run(steps=4, warmup=0, compile=True)
    cs = res.metrics["compile_s"]
    assert cs["value"] is None and cs["reason"].startswith("compile failed, the run trained "
                                                           "eagerly: Unsupported: graph break")
    assert res.steps == 4 and res.final_loss == res.final_loss  # trained, finite


def test_an_error_of_the_model_itself_is_not_taken_for_a_compile_failure(monkeypatch):
    class Broken(torch.nn.Module):
        def forward(self, **batch):
            raise ValueError("a bug in the model")

    monkeypatch.setattr(torch, "compile", lambda model, *a, **k: Broken())
    with pytest.raises(ValueError, match="a bug in the model"):
        run(steps=2, warmup=0, compile=True)


def test_sweep_executed_notebooks_get_a_text_progress_bar(monkeypatch) -> None:
    # papermill saves no widget state: a batch run must not draw its progress as a widget
    import tqdm as tqdm_mod

    from effllm_helpers.runenv import BATCH_ENV, progress_bar

    monkeypatch.setenv(BATCH_ENV, "1")
    import io

    bar = progress_bar(total=3, file=io.StringIO())
    assert type(bar) is tqdm_mod.std.tqdm and bar.mininterval == 30.0
    bar.close()


def test_a_cuda_batch_is_staged_through_pinned_memory(monkeypatch) -> None:
    # a copy from pageable memory blocks the host until the GPU drains, every step
    calls: list[tuple[str, object]] = []

    def pin(self):
        calls.append(("pin", tuple(self.shape)))
        return self

    def to(self, device, non_blocking=False):
        calls.append(("to", non_blocking))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    train.to_device({"input_ids": torch.zeros(2, 3)}, torch.device("cuda"))
    assert calls == [("pin", (2, 3)), ("to", True)]


def test_a_cpu_batch_is_not_pinned(monkeypatch) -> None:
    def pin(self):
        raise AssertionError("pinned on a CPU run")

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    out = train.to_device({"input_ids": torch.ones(2)}, torch.device("cpu"))
    assert torch.equal(out["input_ids"], torch.ones(2))


def test_the_loss_is_read_back_about_ten_times_but_every_curve_point_is_kept(monkeypatch):
    """Each read syncs the device; reading every other step kept the H200 waiting for the host."""
    from effllm_helpers.measure import meter as meter_mod

    reads = []
    real = meter_mod.Meter.energy_j_so_far
    monkeypatch.setattr(meter_mod.Meter, "energy_j_so_far",
                        lambda self: reads.append(1) or real(self))
    res = run(steps=100, warmup=1, next_batch=train.block_batches(blocks(400), BATCH))
    curve = res.curves["loss_vs_tokens"]
    assert len(curve["y"]) == 50  # every 2nd step, as before
    assert curve["x"] == sorted(curve["x"]) and all(y == y for y in curve["y"])
    assert len(reads) == 10


class _DivergesAt(torch.nn.Module):
    """TinyLM whose loss turns NaN from its ``at``-th forward on."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lm, self.at, self.calls = TinyLM(), at, 0

    def forward(self, **batch):
        out = self.lm(**batch)
        self.calls += 1
        if self.calls > self.at:
            out.loss = out.loss * float("nan")
        return out


def test_a_diverged_loss_fails_the_run_at_the_next_read_naming_its_step():
    from effllm_helpers.errors import DivergedError

    spec = TrainSpec(steps=100, batch_size=BATCH, warmup_steps=1, eval_every=1000, dtype="fp32")
    with pytest.raises(DivergedError, match="at step 13"):  # the first curve point after 12
        train.train(_DivergesAt(12), train.block_batches(blocks(400), BATCH), spec,
                    MeasureSpec(warmup_steps=1, sample_interval_s=0.05), n_params=1000,
                    progress=False)


def test_a_long_run_reads_its_loss_at_least_every_hundred_steps(monkeypatch):
    from effllm_helpers.measure import meter as meter_mod

    reads = []
    real = meter_mod.Meter.energy_j_so_far
    monkeypatch.setattr(meter_mod.Meter, "energy_j_so_far",
                        lambda self: reads.append(1) or real(self))
    run(steps=1200, warmup=1)
    assert len(reads) == 12  # ceil(1200 / 10) = 120 would leave a divergence unseen longer


def test_the_cpu_optimizer_is_fused_and_updates_as_the_per_tensor_loop_does():
    torch.manual_seed(0)
    fused_model, loop_model = TinyLM(), TinyLM()
    loop_model.load_state_dict(fused_model.state_dict())
    init = {k: v.clone() for k, v in fused_model.state_dict().items()}
    fused = train.adamw(fused_model, 1e-2, 0.1, torch.device("cpu"))
    assert fused.defaults["fused"] is True
    decay = [p for p in loop_model.parameters() if p.ndim >= 2]
    no_decay = [p for p in loop_model.parameters() if p.ndim < 2]
    loop = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": no_decay, "weight_decay": 0.0}][:1 + bool(no_decay)],
                             lr=1e-2, betas=train.PRETRAIN_BETAS, foreach=False)
    x = blocks(4)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            model(x).logits.float().pow(2).mean().backward()
            opt.step()
    for (name, a), b in zip(fused_model.named_parameters(), loop_model.parameters(),
                            strict=True):
        assert not torch.equal(a, init[name]), name  # the steps moved it
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
