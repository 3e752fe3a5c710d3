"""Fine-tuning batch layouts: packed examples stay apart, counts are right, unsafe packs refused."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM

from effllm_helpers.axes.finetuning import layout_metrics
from effllm_helpers.data import packing
from effllm_helpers.train import TrainResult

VOCAB, PAD = 64, 0


def _rows(n: int = 6, seed: int = 0) -> list[packing.Row]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(3, VOCAB, (3 + i % 4,), generator=gen).tolist()
        r = torch.randint(3, VOCAB, (2 + (i * 3) % 5,), generator=gen).tolist()
        out.append((p, r))
    return out


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def _example_losses(model, batch: dict, spans: list[tuple[int, int, int]]) -> list[float]:
    """Per-example mean loss from one forward: spans are (row, start, end) of each example."""
    fwd = {k: v for k, v in batch.items() if k not in packing.META_KEYS and k != "labels"}
    logits = model(**fwd).logits.float()
    labels = batch["labels"]
    out = []
    for row, a, b in spans:
        lg, lb = logits[row, a:b - 1], labels[row, a + 1:b]
        out.append(float(torch.nn.functional.cross_entropy(lg, lb, ignore_index=-100)))
    return out


def _packed_spans(rows: list[packing.Row], batch: dict) -> list[tuple[int, int, int]]:
    """Where each example landed in a packed batch (position ids restart at its start)."""
    spans = []
    pos, ids = batch["position_ids"], batch["input_ids"]
    for r in range(ids.shape[0]):
        starts = (pos[r] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
        spans += [(r, a, b) for a, b in zip(starts, starts[1:], strict=False)
                  if ids[r, a] != PAD]  # the row's trailing padding is no example
    return spans


@torch.no_grad()
def test_a_packed_batch_gives_each_example_the_loss_it_has_alone(llama) -> None:
    rows = _rows()
    batch = packing.packed(rows, PAD, max_len=40)
    assert batch["input_ids"].shape[0] < len(rows)  # several examples share a row
    spans = _packed_spans(rows, batch)
    assert len(spans) == len(rows)
    got = sorted(_example_losses(llama, batch, spans))
    alone = sorted(_example_losses(llama, packing.padded([r], PAD), [(0, 0, len(r[0] + r[1]))])[0]
                   for r in rows)
    assert got == pytest.approx(alone, abs=1e-5)


@torch.no_grad()
def test_the_batch_loss_is_the_padded_batchs(llama) -> None:
    rows = _rows()
    pk = packing.packed(rows, PAD, max_len=40)
    pd = packing.padded(rows, PAD)
    strip = packing.META_KEYS
    loss_pk = llama(**{k: v for k, v in pk.items() if k not in strip}).loss
    loss_pd = llama(**{k: v for k, v in pd.items() if k not in strip}).loss
    assert float(loss_pk) == pytest.approx(float(loss_pd), abs=1e-5)


@torch.no_grad()
def test_changing_one_packed_example_leaves_its_neighbours_alone(llama) -> None:
    rows = _rows(3)
    a = packing.packed(rows, PAD, max_len=64)
    assert a["input_ids"].shape[0] == 1
    changed = [rows[0], ([5] * len(rows[1][0]), [6] * len(rows[1][1])), rows[2]]
    b = packing.packed(changed, PAD, max_len=64)
    la = llama(input_ids=a["input_ids"], position_ids=a["position_ids"], use_cache=False).logits
    lb = llama(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
    differs = (la - lb).abs().amax(-1)[0] > 1e-5
    touched = (a["input_ids"] != b["input_ids"])[0]
    assert torch.equal(differs, touched)  # only the rewritten example's own positions move


def test_every_example_starts_without_a_label() -> None:
    batch = packing.packed(_rows(), PAD, max_len=40)
    starts = batch["position_ids"] == 0
    assert (batch["labels"][starts] == -100).all()


def test_layout_counts_and_padding_fraction() -> None:
    rows = [([1, 2], [3]), ([1, 2, 3, 4], [5, 6])]  # 3 and 6 tokens
    pd = packing.padded(rows, PAD)
    assert packing.layout_counts(pd) == {"positions": 12, "real_tokens": 9, "loss_tokens": 3}
    res = TrainResult(metrics={}, curves={}, steps=1, tokens=3, samples=2, final_loss=0.0,
                      positions=12, real_tokens=9)
    m = layout_metrics(res)
    assert m["padding_frac"]["value"] == pytest.approx(0.25)
    assert m["computed_positions"]["unit"] == "positions" and m["loss_tokens"]["value"] == 3
    pk = packing.packed(rows, PAD, max_len=16)
    assert packing.layout_counts(pk) == {"positions": 9, "real_tokens": 9, "loss_tokens": 3}


def test_fixed_width_rows_are_max_len_wide_and_count_the_padding() -> None:
    rows = [([1, 2], [3]), ([1, 2, 3, 4], [5, 6])]  # 3 and 6 tokens
    pk = packing.packed(rows, PAD, max_len=16, fixed_width=True)
    assert pk["input_ids"].shape == (1, 16)
    assert packing.layout_counts(pk) == {"positions": 16, "real_tokens": 9, "loss_tokens": 3}
    assert pk["position_ids"][0, 9:].tolist() == list(range(7))  # padding: its own sequence


def test_first_fit_decreasing_fills_rows_within_capacity() -> None:
    lengths = [9, 3, 7, 2, 5, 1]
    bins = packing.first_fit_decreasing(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(6))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3  # 27 tokens need at least 3 rows of 10


def test_an_example_longer_than_a_row_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not fit max_len 4"):
        packing.packed([([1, 2, 3], [4, 5])], PAD, max_len=4)


def test_pack_and_none_train_on_the_same_examples_each_step() -> None:
    rows = _rows(20)
    none = packing.sft_batches(rows, 4, "none", PAD, 40, seed=3)
    pack = packing.sft_batches(rows, 4, "pack", PAD, 40, seed=3)
    for step in range(6):
        a, b = none(step, 0, 1), pack(step, 0, 1)
        assert Counter(a["input_ids"][a["attention_mask"].bool()].tolist()) == Counter(
            b["input_ids"][b["input_ids"] != PAD].tolist())
        assert int(a["_examples"]) == int(b["_examples"]) == 4


def test_group_pads_less_than_none_over_an_epoch() -> None:
    rows = _rows(64)
    waste = {}
    for mode in ("none", "group"):
        nb = packing.sft_batches(rows, 4, mode, PAD, 40, seed=1)
        counts = [packing.layout_counts(nb(s, 0, 1)) for s in range(16)]
        waste[mode] = sum(c["positions"] - c["real_tokens"] for c in counts)
    assert waste["group"] < waste["none"]
    order = packing.group_order([len(p) + len(r) for p, r in rows], 4, seed=1)
    assert sorted(order.tolist()) == list(range(64))  # an epoch sees every example once


def test_auto_packs_a_model_that_keeps_examples_apart(llama) -> None:
    mode, info = packing.choose("auto", llama, VOCAB, "cpu", torch.float32)
    assert mode == "pack" and info["probe_rel_diff"] < 1e-4


def test_a_recurrent_model_is_grouped_with_the_reason_and_pack_refused() -> None:
    torch.manual_seed(0)
    mamba = MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, state_size=4,
                                         num_hidden_layers=1, expand=2)).eval()
    mode, info = packing.choose("auto", mamba, VOCAB, "cpu", torch.float32)
    assert mode == "group" and "carries state" in info["reason"]
    with pytest.raises(ValueError, match="packing 'pack' is unsafe"):
        packing.choose("pack", mamba, VOCAB, "cpu", torch.float32)


def test_an_unknown_layout_is_refused() -> None:
    with pytest.raises(ValueError, match="allowed none, group, pack"):
        packing.sft_batches(_rows(), 4, "dense", PAD, 40)
