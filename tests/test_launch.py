"""One study point on several processes: the launch key, the strategy, one record per run."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_lm import BATCH, SEQ, VOCAB, TinyLM  # noqa: E402

from effllm_helpers import config, launch, studies, train
from effllm_helpers.config import MeasureSpec, TrainSpec
from effllm_helpers.results import validate_metric


def tiny_point(params: dict, steps: int = 4) -> dict:
    """An axis function in miniature: train, return what the notebook records."""
    torch.manual_seed(0)
    blocks = torch.randint(0, VOCAB, (32, SEQ), generator=torch.Generator().manual_seed(0))
    spec = TrainSpec(steps=steps, batch_size=BATCH, warmup_steps=1, dtype="fp32")
    res = train.train(TinyLM(), train.block_batches(blocks, BATCH), spec,
                      MeasureSpec(warmup_steps=1, sample_interval_s=0.05), n_params=1000,
                      flops_per_token=6 * 1000, progress=False)
    return {"metrics": res.metrics, "tokens": res.tokens, "rank": int(os.environ.get("RANK", 0)),
            "strategy": os.environ.get(train.STRATEGY_ENV)}


def test_without_launch_the_params_dump_has_no_launch_key():
    # the run ids of every one-process run stay what they were before the key existed
    assert "launch" not in config.resolve_params("architecture", {})
    assert "launch" not in config.resolve_params("finetuning", {})


def test_launch_key_validates_processes_and_strategy():
    p = config.resolve_params("architecture", {"launch": {"processes": 2, "strategy": "fsdp"}})
    assert p["launch"] == {"processes": 2, "strategy": "fsdp"}
    with pytest.raises(config.ParamsError, match="strategy"):
        config.resolve_params("finetuning", {"launch": {"processes": 2, "strategy": "zero3"}})
    with pytest.raises(config.ParamsError, match="processes"):
        config.resolve_params("architecture", {"launch": {"processes": 0}})


def test_one_process_calls_the_function_in_place():
    assert launch.run_point(lambda p, x: (p, x), {"a": 1}, 2) == ({"a": 1}, 2)
    assert launch.launch_spec({"launch": {"processes": 3, "strategy": "fsdp"}}) == (3, "fsdp")


def test_fsdp_plugin_is_full_shard_with_bf16_compute_and_fp32_reduce():
    plugin = train.fsdp_plugin(torch.bfloat16)
    assert "FULL_SHARD" in str(plugin.sharding_strategy)
    assert plugin.mixed_precision_policy.param_dtype == torch.bfloat16
    assert plugin.mixed_precision_policy.reduce_dtype == torch.float32


def test_unknown_strategy_in_the_environment_is_refused(monkeypatch):
    monkeypatch.setenv(train.STRATEGY_ENV, "zero3")
    with pytest.raises(ValueError, match="zero3"):
        train.launch_strategy()


@pytest.fixture
def fresh_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook kernel that has not imported bitsandbytes (the notebooks never do before a
    launch); earlier tests in this process did, and accelerate refuses to fork after it."""
    import sys

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)


def test_two_gloo_processes_train_one_ddp_point_and_return_one_record(fresh_kernel):
    params = {"launch": {"processes": 2, "strategy": "ddp"}}
    out = launch.run_point(tiny_point, params)
    assert out["rank"] == 0 and out["strategy"] == "ddp"
    m = out["metrics"]
    assert m["world_size"]["value"] == 2 and m["world_size"]["strategy"] == "ddp"
    for name, value in m.items():
        validate_metric(name, value)
    tp = m["tokens_per_s"]
    # 4 steps, 1 of them warm-up: 3 measured steps x BATCH x (SEQ-1) targets on each rank
    assert tp["count"] == 2 * 3 * BATCH * (SEQ - 1)
    assert len(tp["per_device"]) == 2 and tp["world_size"] == 2
    assert out["tokens"] == 2 * 4 * BATCH * (SEQ - 1)  # the curves count every rank's tokens
    assert m["mfu"]["value"] is None or m["mfu"]["method"].startswith("sum_flops_over_ranks")


def test_workers_pin_disjoint_groups_of_gpus_for_launched_runs(monkeypatch):
    from effllm_helpers import sweep

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert sweep.gpu_slots(2, per_run=2) == ["0,1", "2,3"]
    assert sweep.gpu_slots(3, per_run=2) == ["0,1", "2,3", "0,1"]
    assert sweep.gpu_slots(2) == ["0", "1"]
    with pytest.raises(ValueError, match="only 4 GPU"):
        sweep.gpu_slots(1, per_run=8)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert sweep.gpu_slots(2, per_run=2) == [None, None]


def test_a_sweep_groups_by_the_most_processes_any_run_launches():
    from effllm_helpers import sweep

    def run(launch_params):
        params = {"launch": launch_params} if launch_params else {}
        return studies.Run(run_id="r", study="s", axis="architecture", notebook="n", seed=0,
                          point={}, params=params, weights={}, timeout_s=None)

    assert sweep.launch_processes([run(None), run({"processes": 2, "strategy": "ddp"})]) == 2
    assert sweep.launch_processes([run(None)]) == 1


def _rank_value() -> int:
    return int(os.environ.get("RANK", "-1"))


def test_a_launch_after_a_single_process_run_in_the_same_kernel_is_not_refused(
        fresh_kernel) -> None:
    # notebook_launcher refuses to fork while an Accelerator's shared state exists; a notebook
    # that trained once in-process and then launches N ranks must still work
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from effllm_helpers import launch

    Accelerator(cpu=True)
    assert AcceleratorState._shared_state
    out = launch.launch(_rank_value, (), {}, processes=2, strategy="ddp")
    assert out == 0


def _world() -> tuple[int, int]:
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def test_ranks_are_spawned_when_cuda_is_already_initialised_here(monkeypatch) -> None:
    # importing torchao (through transformers) initialises CUDA, after which a forked rank
    # could not use the GPU: the launch then spawns fresh interpreters instead
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert launch.start_method() == "spawn"
    monkeypatch.undo()
    assert launch.start_method() == "fork"
    with pytest.raises(ValueError, match="fork, spawn"):
        launch.start_method("forkserver")


def test_spawned_ranks_get_their_rendezvous_and_rank_0_answers() -> None:
    assert launch.launch(_world, processes=2, method="spawn") == (0, 2)


def test_only_rank_0_of_a_launch_writes_the_trained_model(monkeypatch) -> None:
    from effllm_helpers import runenv

    monkeypatch.delenv("RANK", raising=False)
    assert runenv.is_main_rank()  # no launch: the one process writes
    monkeypatch.setenv("RANK", "1")
    assert not runenv.is_main_rank()
    monkeypatch.setenv("RANK", "0")
    assert runenv.is_main_rank()


def test_fsdp_fine_tuning_is_refused_before_any_compute() -> None:
    # its evaluations, merge and save would run on FSDP's flat shards (only the architecture
    # axis gathers the model back), so validation says so instead of a crash after training
    with pytest.raises(config.ParamsError, match="fsdp.*not supported on the fine-tuning axis"):
        config.resolve_params("finetuning", {"launch": {"processes": 2, "strategy": "fsdp"}})
    assert config.resolve_params("architecture", {"launch": {"processes": 2,
                                                             "strategy": "fsdp"}})["launch"]


def test_a_spawn_launch_of_a_local_function_says_what_it_needs() -> None:
    with pytest.raises(RuntimeError, match="must be a module-level function"):
        launch.launch(lambda: 0, processes=2, method="spawn")
