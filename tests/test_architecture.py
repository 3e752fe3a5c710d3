"""The architecture axis' comparisons and scores: MoE baselines follow the preset's experts, and
perplexity says which held-out tokens it scored."""

from __future__ import annotations

import pytest
import torch

from effllm_helpers import config, evaluate, studies
from effllm_helpers.axes.architecture import effective_size, ffn_label
from effllm_helpers.models import build, count_params


def moe_study(preset: str) -> dict[str, config.ArchitectureParams]:
    runs = studies.expand("params/architecture/moe.yaml", preset)
    return {r.point["variant"]: config.ArchitectureParams.model_validate(r.params)
            for r in runs if r.point["model.size"] == "small"}


def params_of(p: config.ArchitectureParams) -> dict[str, int]:
    return count_params(build(p.model, effective_size(p), vocab_size=64, max_seq_len=64))


@pytest.mark.parametrize("preset", ["ci", "tiny"])
def test_dense_same_total_matches_the_moe_total_params_at_the_preset(preset):
    runs = moe_study(preset)
    moe, dense = params_of(runs["moe_topk"]), params_of(runs["dense_same_total"])
    assert dense["total"] == pytest.approx(moe["total"], rel=0.10)


@pytest.mark.parametrize("preset", ["ci", "tiny"])
def test_dense_same_active_matches_the_moe_active_params_at_the_preset(preset):
    runs = moe_study(preset)
    moe, dense = params_of(runs["moe_topk"]), params_of(runs["dense_same_active"])
    assert dense["active"] == pytest.approx(moe["active"], rel=0.02)


@pytest.mark.parametrize(("preset", "experts"), [("ci", 4), ("tiny", 8)])
def test_moe_label_names_the_experts_the_preset_really_builds(preset, experts):
    runs = moe_study(preset)
    assert runs["moe_topk"].model.n_experts == experts
    assert ffn_label(runs["moe_topk"]) == f"moe {experts}x top-2"
    assert ffn_label(runs["dense_same_total"]) == f"dense d_ff x{experts}"
    assert ffn_label(runs["dense_same_active"]) == "dense d_ff x2"


def test_symbolic_ffn_width_resolves_to_a_number_in_the_params():
    spec = config.ModelSpec(d_ff_mult="n_experts", n_experts=6, top_k=3)
    assert spec.d_ff_mult == 6.0
    assert config.ModelSpec(d_ff_mult="top_k", n_experts=6, top_k=3).d_ff_mult == 3.0
    assert spec.model_dump(mode="json")["d_ff_mult"] == 6.0  # records and run ids see a number


def test_spread_blocks_cover_the_whole_split_not_its_beginning():
    blocks = torch.arange(40).reshape(10, 4)
    kept = evaluate.spread_blocks(blocks, max_tokens=16)
    assert kept[:, 0].tolist() == [0, 12, 24, 36]  # blocks 0, 3, 6 and 9: first to last
    assert evaluate.spread_blocks(blocks, max_tokens=None) is blocks


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.vocab = vocab

    def forward(self, input_ids):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab)})()


def test_perplexity_records_the_tokens_scored_and_the_split_size():
    blocks = torch.zeros(10, 5, dtype=torch.long)
    capped = evaluate.perplexity(Uniform(), blocks, batch_size=2, max_tokens=15)
    assert capped["ppl"]["n_tokens"] == 3 * 4 and capped["ppl"]["heldout_tokens"] == 10 * 4
    assert capped["ppl"]["selection"] == "evenly_spaced_blocks"
    assert capped["ppl"]["value"] == pytest.approx(8.0)
    whole = evaluate.perplexity(Uniform(), blocks, batch_size=3)
    assert whole["loss"]["n_tokens"] == whole["loss"]["heldout_tokens"] == 40
    assert whole["loss"]["selection"] == "all"


def test_nsa_record_names_its_dense_masked_implementation() -> None:
    from types import SimpleNamespace

    from effllm_helpers.axes.architecture import _implementation
    p = config.notebook_params("architecture", "ci", {"model": {"attention": "nsa"}})
    cfg = build(p.model, effective_size(p), vocab_size=64, max_seq_len=128).config
    facts = _implementation(cfg, 128)
    assert facts["implementation"] == "pytorch_dense_masked_reference"
    assert facts["flops_per_token_fwd_executed"] > facts["flops_per_token_fwd_model"]
    assert _implementation(SimpleNamespace(model_type="llama"), 128) == {}


def test_the_memory_baseline_is_marked_after_the_corpus_and_tokenizer_before_the_model(
        monkeypatch) -> None:
    # the first run of a study trains the tokenizer (a cold cache): below the baseline it cannot
    # make that run's variant look hungrier than the rest (issue 17, fault 3)
    from effllm_helpers import data as data_mod
    from effllm_helpers import models as models_mod
    from effllm_helpers.axes import architecture
    from effllm_helpers.measure import memory

    order: list[str] = []
    real_blocks = data_mod.token_blocks

    class Stop(Exception):
        pass

    def blocks(*a, **k):
        order.append("data")
        return real_blocks(*a, **k)

    def build(*a, **k):
        order.append("model")
        raise Stop

    monkeypatch.setattr(data_mod, "token_blocks", blocks)
    monkeypatch.setattr(memory, "mark_baseline", lambda: order.append("baseline"))
    monkeypatch.setattr(models_mod, "build", build)
    p = config.notebook_params("architecture", "ci", None)
    with pytest.raises(Stop):
        architecture.run(p, progress=False)
    assert order == ["data", "data", "baseline", "model"]
