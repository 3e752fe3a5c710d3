"""MQAR probe: construction, and accuracy of an oracle, random guessers and a real HF model."""

from __future__ import annotations

import pytest
import torch

from effllm_helpers.data import make_probe, probe_accuracy, probe_ids_in_range
from effllm_helpers.data.tokenizer import _train_tokenizer, _wrap

VOCAB = 64


class Oracle(torch.nn.Module):
    """Predicts, at each position, the token that followed the latest earlier copy of its token."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, n = input_ids.shape
        logits = torch.zeros(b, n, VOCAB)
        for i in range(b):
            for t in range(n):
                prev = (input_ids[i, :t] == input_ids[i, t]).nonzero()
                if len(prev):
                    logits[i, t, input_ids[i, int(prev[-1]) + 1]] = 1.0
        return logits


class Random(torch.nn.Module):
    def __init__(self, ids: list[int] | None = None) -> None:
        super().__init__()
        self.ids = ids
        self.gen = torch.Generator().manual_seed(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = torch.rand(*input_ids.shape, VOCAB, generator=self.gen)
        if self.ids is not None:  # guesses uniformly among the value ids only
            mask = torch.full((VOCAB,), -1e9)
            mask[self.ids] = 0.0
            logits = logits + mask
        return logits


def test_probe_layout_and_determinism() -> None:
    p = make_probe(probe_ids_in_range(VOCAB, 60), n_pairs=8, n_queries=4, n_samples=16, seed=1)
    assert p.input_ids.shape == (16, 24) and p.targets.shape == (16, 4)
    assert set(p.key_ids).isdisjoint(p.value_ids)
    for s in range(16):
        keys = p.input_ids[s, 0:16:2].tolist()
        assert len(set(keys)) == 8 and set(keys) <= set(p.key_ids)
        for q, pos in enumerate(p.query_positions[s].tolist()):
            k = int(p.input_ids[s, pos])
            assert int(p.input_ids[s, pos + 1]) == int(p.targets[s, q])
            assert int(p.input_ids[s, 2 * keys.index(k) + 1]) == int(p.targets[s, q])
    again = make_probe(probe_ids_in_range(VOCAB, 60), n_pairs=8, n_queries=4, n_samples=16, seed=1)
    assert torch.equal(again.input_ids, p.input_ids)


def test_oracle_scores_one() -> None:
    p = make_probe(probe_ids_in_range(VOCAB, 60), n_pairs=8, n_queries=4, n_samples=32)
    assert probe_accuracy(Oracle(), p, "cpu", batch_size=7) == 1.0


def test_random_models_score_about_chance() -> None:
    p = make_probe(probe_ids_in_range(VOCAB, 60), n_pairs=8, n_queries=8, n_samples=512)
    assert probe_accuracy(Random(), p) < 0.05  # argmax over the whole vocab: ~1/64
    acc = probe_accuracy(Random(p.value_ids), p)
    assert abs(acc - p.chance) < 0.015  # 4096 queries, chance 1/30


def test_probe_from_tokenizer_uses_single_token_ids() -> None:
    tok = _wrap(_train_tokenizer(["the quick brown fox 0123456789 !#$%&*+-/<=>?@^~"] * 4, 300))
    p = make_probe(tok, n_pairs=16, n_queries=8, n_samples=4)
    assert len(p.key_ids) == 52 and len(p.value_ids) >= 20
    for i in p.key_ids + p.value_ids:
        assert len(tok.encode(tok.decode([i]), add_special_tokens=False)) == 1
    with pytest.raises(ValueError, match="n_pairs"):
        make_probe(tok, n_pairs=60)


def test_probe_runs_on_a_hf_model() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).train()
    p = make_probe(probe_ids_in_range(VOCAB, 60), n_pairs=8, n_queries=4, n_samples=8)
    acc = probe_accuracy(model, p, torch.device("cpu"))
    assert 0.0 <= acc <= 1.0 and model.training  # mode restored
