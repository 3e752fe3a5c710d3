"""After FSDP training, evaluation needs the full model: FSDP leaves each rank's module holding
flat shards (on GPUs this failed as "'weight' must be 2-D"). Two gloo processes on the CPU."""

from __future__ import annotations

import os

import torch


class _Acc:
    """What ``train.full_module`` reads of an Accelerator."""

    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model: torch.nn.Module, keep_torch_compile: bool = True) -> torch.nn.Module:
        return model.module


def _rank(index: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from transformers import LlamaConfig, LlamaForCausalLM

    from effllm_helpers.train import full_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=index, world_size=2)
    try:
        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        model = LlamaForCausalLM(cfg).eval()
        ids = torch.randint(0, 64, (2, 12))
        with torch.no_grad():
            want = model(input_ids=ids).logits
        sharded = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        flat = model.model.embed_tokens.weight.dim() != 2  # what evaluation used to run on
        full = full_module(sharded, _Acc())
        with torch.no_grad():
            got = full(input_ids=ids).logits
        torch.save({"flat": flat, "close": bool(torch.allclose(got, want, atol=1e-5)),
                    "type": type(full).__name__}, f"{out}/rank{index}.pt")
    finally:
        dist.destroy_process_group()


def test_a_sharded_model_is_gathered_whole_on_every_rank_for_evaluation(tmp_path) -> None:
    import torch.multiprocessing as mp

    from effllm_helpers.launch import free_port

    mp.start_processes(_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for r in (0, 1):
        res = torch.load(tmp_path / f"rank{r}.pt")
        assert res["flat"], "FSDP should have left flat shards in the wrapped module"
        assert res["close"] and res["type"] == "LlamaForCausalLM"


def test_an_unsharded_model_needs_no_gather() -> None:
    from effllm_helpers.train import full_module

    assert full_module(torch.nn.Linear(2, 2), _Acc()) is None
