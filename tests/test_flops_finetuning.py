"""Fine-tuning FLOPs per method against FlopCounterMode over one forward + backward.

Tiny Llama (eager attention so the counter sees the score matmuls), batch 2 x 12 tokens, each
registry method prepared as the fine-tuning axis prepares it (LoRA dropout 0.1, all linears).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig, LlamaForCausalLM

from effllm_helpers.config import FinetuneParams
from effllm_helpers.models.flops import finetune_flops_per_token, flops_per_token
from effllm_helpers.techniques import finetuning as ft

warnings.filterwarnings("ignore", category=UserWarning)

BATCH, SEQ, VOCAB = 2, 12, 256
METHODS = ["lora", "lora_plus", "rslora", "dora", "pissa", "freeze", "full"]


def _prepared(method: str, **kw: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        tie_word_embeddings=False, attn_implementation="eager"))
    return ft.prepare(model, FinetuneParams(method=method, rank=4, alpha=16.0, **kw)).model


def _counted(model: torch.nn.Module) -> float:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    model.train()
    with FlopCounterMode(display=False) as fc:
        model(input_ids=ids, labels=ids).loss.backward()
    return fc.get_total_flops() / (BATCH * SEQ)


@pytest.mark.parametrize("method", METHODS)
def test_method_flops_match_flop_counter_within_5pct(method: str) -> None:
    model = _prepared(method)
    predicted = finetune_flops_per_token(model, SEQ, BATCH * SEQ, causal_discount=False)
    counted = _counted(model)
    assert abs(counted - predicted["total"]) <= 0.05 * counted, (counted, predicted)


def test_full_finetuning_is_three_forwards() -> None:
    model = _prepared("full")
    got = finetune_flops_per_token(model, SEQ, BATCH * SEQ)
    assert got["total"] == pytest.approx(flops_per_token(model.config, SEQ))
    assert got["backward"] == pytest.approx(2 * got["forward"])


def test_freeze_has_no_backward_below_the_first_trainable_block() -> None:
    """Training only the last block and the head: the two frozen blocks below it run forward
    only, so the step costs less than forward + input-gradient everywhere."""
    one = finetune_flops_per_token(_prepared("freeze", freeze_last_k=1), SEQ, BATCH * SEQ)
    two = finetune_flops_per_token(_prepared("freeze", freeze_last_k=2), SEQ, BATCH * SEQ)
    assert one["backward"] < two["backward"] < 2 * one["forward"]


def test_dora_costs_more_than_lora() -> None:
    lora = finetune_flops_per_token(_prepared("lora"), SEQ, BATCH * SEQ)
    dora = finetune_flops_per_token(_prepared("dora"), SEQ, BATCH * SEQ)
    assert dora["forward"] > lora["forward"] and dora["backward"] > lora["backward"]


def test_fine_tuning_flops_count_attention_at_each_examples_length() -> None:
    """The axis's FLOPs/token times the real tokens equal FlopCounterMode over every example
    trained at its own length (issue 29.2: the count used max_len, then the mean length; with
    a short and a long example the mean length's (L+1)/2 keys understate attention ~40 %)."""
    from effllm_helpers.axes.finetuning import _flops_per_token

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(  # small layers, so attention is a large share
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=256,
        tie_word_embeddings=False, attn_implementation="eager"))
    prepared = ft.prepare(model, FinetuneParams(method="full"))
    rows = [([1] * 4, [2] * 4), ([1] * 60, [2] * 60)]  # 8 and 120 tokens
    counted = 0.0
    for p, r in rows:
        ids = torch.tensor([p + r])
        with FlopCounterMode(display=False) as fc:
            prepared.model(input_ids=ids, labels=ids).loss.backward()
        counted += fc.get_total_flops()
    per_token = _flops_per_token(prepared.model, prepared, FinetuneParams(max_len=128), rows)
    assert per_token is not None
    # causal attention (the axis's count) vs the counter's full score matrices: compare on
    # the non-causal count, which is what eager attention executes
    lengths = [len(p) + len(r) for p, r in rows]
    full = finetune_flops_per_token(prepared.model, 64, 64, causal_discount=False,
                                    lengths=lengths)["total"]
    assert full * sum(lengths) == pytest.approx(counted, rel=0.01)
    mean_len = finetune_flops_per_token(prepared.model, 64, 64, causal_discount=False)["total"]
    assert abs(mean_len * sum(lengths) - counted) > 0.05 * counted  # the old count's error
    assert per_token == pytest.approx(finetune_flops_per_token(
        prepared.model, 64, 64, lengths=lengths)["total"])
