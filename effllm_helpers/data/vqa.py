"""The VLM's task: a digit VQA ("which class is this?") over labelled images, word-level.

The vocabulary is the special tokens, the question's words, then one token per class name, so
the answer is one token and exact match is the argmax at the answer position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .packing import dict_batches

VLM_SPECIAL = ("<pad>", "<s>", "</s>", "<image>")
VLM_QUESTION = ("which", "class", "is", "this", "?", "answer:")


@dataclass
class VQA:
    """A digit VQA task: token ids, labels (answer + eos only) and the answer token per item."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    answers: torch.Tensor
    prompt_len: int


def vlm_vocab(classes: list[str]) -> dict[str, int]:
    words = [*VLM_SPECIAL, *VLM_QUESTION, *(f"cls:{c}" for c in classes)]
    return {w: i for i, w in enumerate(words)}


def vqa_task(x: torch.Tensor, y: torch.Tensor, classes: list[str], n_image_tokens: int) -> VQA:
    """``<s> <image>*n which class is this ? answer: <class> </s>``, loss on the last two."""
    vocab = vlm_vocab(classes)
    prompt = ([vocab["<s>"]] + [vocab["<image>"]] * n_image_tokens
              + [vocab[w] for w in VLM_QUESTION])
    answers = torch.tensor([vocab[f"cls:{classes[int(c)]}"] for c in y])
    n = y.shape[0]
    ids = torch.cat([torch.tensor(prompt).expand(n, -1), answers[:, None],
                     torch.full((n, 1), vocab["</s>"])], dim=1)
    labels = torch.full_like(ids, -100)
    labels[:, len(prompt):] = ids[:, len(prompt):]
    return VQA(ids, torch.ones_like(ids), labels, x, answers, len(prompt))


def vlm_batches(task: VQA, batch_size: int,
                seed: int) -> Callable[[int, int, int], dict[str, torch.Tensor]]:
    """The task's rows as the shared loop's batches."""
    return dict_batches({"input_ids": task.input_ids, "attention_mask": task.attention_mask,
                         "labels": task.labels, "pixel_values": task.pixel_values},
                        batch_size, seed)
