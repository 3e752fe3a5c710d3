"""Fused q/k/v and gate/up projections (models/fused.py): same tokens, fewer matmuls."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from effllm_helpers.config import InferenceParams
from effllm_helpers.decode import StaticGraphDecoder
from effllm_helpers.models.fused import FusedLead, FusedPart, fuse_projections
from effllm_helpers.techniques import precision as prec


def tiny_llama(bias: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      attention_bias=bias)
    return LlamaForCausalLM(cfg).eval()


def ids(n: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (2, n), generator=torch.Generator().manual_seed(1))


def n_linear(model: nn.Module) -> int:
    return sum(isinstance(m, nn.Linear) for m in model.modules())


@pytest.mark.parametrize("bias", [False, True])
def test_a_fused_model_gives_the_same_logits_with_four_weight_matmuls_per_layer(bias):
    model = tiny_llama(bias)
    ref = copy.deepcopy(model)
    fusion = fuse_projections(model)
    assert fusion.applied and fusion.groups == 2 * 2  # attention + MLP in each of 2 layers
    assert n_linear(ref) == 2 * 7 + 1 and n_linear(model) == 2 * 4 + 1  # + the LM head
    with torch.no_grad():
        torch.testing.assert_close(model(ids()).logits, ref(ids()).logits, rtol=1e-5, atol=1e-5)


def test_the_static_graph_engine_decodes_the_same_tokens_fused():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    assert fuse_projections(model).applied
    prompt = ids(8)[:1]
    got, _ = StaticGraphDecoder(model, 1, 8, 10).decode(prompt)
    want, _ = StaticGraphDecoder(ref, 1, 8, 10).decode(prompt)
    assert torch.equal(got, want)


def test_a_traced_forward_hands_the_slices_on_as_eager_does():
    """torch.compile traces the lead's hand-over (a Python attribute write) in one graph."""
    model = tiny_llama()
    assert fuse_projections(model).applied
    with torch.no_grad():
        want = model(ids()).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(ids()).logits, want)


class SiblingFirst(nn.Module):
    """An attention whose k projection runs before q: fusing it would read stale slices."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=16)
        self.emb = nn.Embedding(16, 8)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> SimpleNamespace:
        x = self.emb(input_ids)
        k = self.k_proj(x)
        q = self.q_proj(x)
        return SimpleNamespace(logits=self.head(q * k + self.v_proj(x)))


def test_a_model_calling_a_sibling_before_its_lead_is_left_unfused_with_the_reason():
    model = SiblingFirst()
    ref = copy.deepcopy(model)
    fusion = fuse_projections(model)
    assert not fusion.applied and "fused forward failed" in fusion.reason
    assert type(model.q_proj) is nn.Linear and type(model.k_proj) is nn.Linear
    torch.testing.assert_close(model(ids(4) % 16).logits, ref(ids(4) % 16).logits)


def test_fusion_is_off_on_a_cpu_by_default_and_on_when_asked():
    auto = prec.load_for_inference(tiny_llama(), InferenceParams(precision="fp32"), "cpu")
    assert auto.fusion == {"applied": False, "reason": "fuse_projections=auto on cpu"}
    assert not any(isinstance(m, FusedLead) for m in auto.model.modules())
    on = prec.load_for_inference(tiny_llama(), InferenceParams(precision="fp32",
                                                               fuse_projections="on"), "cpu")
    assert on.fusion["applied"] and on.fusion["linears_per_model"] == [15, 9]
    assert sum(isinstance(m, FusedPart) for m in on.model.modules()) == 2 * 3


def test_an_unknown_fuse_projections_value_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="auto.*on.*off"):
        InferenceParams(fuse_projections="yes")


def test_bitsandbytes_layers_stay_unfused_and_the_record_says_why():
    pytest.importorskip("bitsandbytes")
    if prec.check_supported("int4-nf4", "cpu"):
        pytest.skip("bitsandbytes 4-bit does not run on this CPU")
    loaded = prec.load_for_inference(tiny_llama(), InferenceParams(precision="int4-nf4",
                                                                   fuse_projections="on"), "cpu")
    assert loaded.fusion == {"applied": False,
                             "reason": "bitsandbytes layers are quantised at load: not fused"}
    assert not any(isinstance(m, FusedLead) for m in loaded.model.modules())
