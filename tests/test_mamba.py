"""Our fast Mamba must be transformers' Mamba, only faster: same logits, same gradients."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaForCausalLM

from effllm_helpers.config import SizeSpec
from effllm_helpers.models.mamba import (
    EffllmMambaForCausalLM,
    FastMambaMixer,
    build_mamba,
    selective_scan,
    selective_scan_reference,
)

TINY = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128}
VOCAB = 256


@pytest.fixture(scope="module")
def pair() -> tuple[EffllmMambaForCausalLM, MambaForCausalLM]:
    """Our model and transformers' reference model holding the same weights."""
    torch.manual_seed(0)
    fast = build_mamba(TINY, VOCAB)
    ref = MambaForCausalLM(fast.config)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _ids(batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def test_build_from_sizespec_uses_fast_mixers() -> None:
    model = build_mamba(SizeSpec(**TINY), VOCAB)
    assert isinstance(model, MambaForCausalLM)
    assert model.config.hidden_size == 64 and model.config.num_hidden_layers == 2
    assert model.config.vocab_size == VOCAB and model.config.model_type == "effllm_mamba"
    assert all(isinstance(layer.mixer, FastMambaMixer) for layer in model.backbone.layers)


@pytest.mark.parametrize("train", [True, False])
def test_logits_match_reference(pair: tuple, train: bool) -> None:
    fast, ref = pair
    fast.train(train)
    ref.train(train)
    ids = _ids()
    with torch.no_grad():
        diff = (fast(ids).logits - ref(ids, use_cache=False).logits).abs().max().item()
    assert diff < 1e-4


def test_logits_match_reference_with_padding_mask(pair: tuple) -> None:
    fast, ref = pair
    fast.train()
    ref.train()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # left padding on the first row
    with torch.no_grad():
        a = fast(ids, attention_mask=mask).logits
        b = ref(ids, attention_mask=mask, use_cache=False).logits
    assert (a - b).abs().max().item() < 1e-4


def test_gradients_match_reference(pair: tuple) -> None:
    fast, ref = pair
    fast.train()
    ref.train()
    fast.zero_grad()
    ref.zero_grad()
    ids = _ids(seq=24)
    fast(ids, labels=ids).loss.backward()
    ref(ids, labels=ids).loss.backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        g_ref = ref_grads[name].grad
        scale = g_ref.abs().max().item() + 1e-8
        assert (p.grad - g_ref).abs().max().item() / scale < 1e-4, name


def test_scan_gradcheck_across_chunks() -> None:
    """Analytic backward == numerical gradient in fp64, with chunk carries exercised."""
    g = torch.Generator().manual_seed(0)
    b, seq, d, n = 2, 7, 3, 4
    args = (torch.randn(b, seq, d, generator=g, dtype=torch.float64),
            torch.rand(b, seq, d, generator=g, dtype=torch.float64) + 0.1,
            -torch.rand(d, n, generator=g, dtype=torch.float64) - 0.5,
            torch.randn(b, seq, n, generator=g, dtype=torch.float64),
            torch.randn(b, seq, n, generator=g, dtype=torch.float64))
    args = tuple(a.requires_grad_() for a in args)
    assert torch.autograd.gradcheck(lambda *a: selective_scan(*a, chunk_len=3), args)


def test_scan_chunking_does_not_change_result() -> None:
    g = torch.Generator().manual_seed(2)
    b, seq, d, n = 2, 33, 8, 4
    x, B, C = (torch.randn(b, seq, k, generator=g) for k in (d, n, n))
    dt = torch.rand(b, seq, d, generator=g)
    A = -torch.rand(d, n, generator=g) * 8
    want = selective_scan_reference(x, dt, A, B, C)
    for chunk in (1, 5, 33, None):
        assert torch.allclose(selective_scan(x, dt, A, B, C, chunk_len=chunk), want, atol=1e-5)


def test_save_load_roundtrip_keeps_fast_class(pair: tuple, tmp_path) -> None:
    fast, _ = pair
    fast.eval()
    fast.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, EffllmMambaForCausalLM)
    assert all(isinstance(layer.mixer, FastMambaMixer) for layer in loaded.backbone.layers)
    ids = _ids(seq=16)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, fast(ids).logits, atol=1e-6)


def test_cached_greedy_decoding_agrees_with_fast_forward(pair: tuple) -> None:
    """generate() (reference recurrent steps) picks the argmax of our full-sequence logits."""
    fast, _ = pair
    fast.eval()
    prompt = _ids(batch=1, seq=8)
    out = fast.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = fast(out).logits
    assert torch.equal(logits[0, 7:-1].argmax(-1), out[0, 8:])
