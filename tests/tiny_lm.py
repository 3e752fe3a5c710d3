"""A tiny causal LM for training-loop tests: embedding + linear head, the shifted LM loss."""

from __future__ import annotations

from types import SimpleNamespace

import torch

VOCAB, SEQ, BATCH = 32, 16, 4


class TinyLM(torch.nn.Module):
    """Embedding + linear head with the shifted causal-LM loss, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids, labels=None, attention_mask=None):
        logits = self.head(self.emb(input_ids))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)
