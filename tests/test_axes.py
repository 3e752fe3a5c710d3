"""The three axis modules at the ci preset, in-process: every metric present (or null + reason)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from effllm_helpers import config
from effllm_helpers.axes import architecture, finetuning, inference
from effllm_helpers.models import embedded, flops
from effllm_helpers.techniques import precision as prec

pytestmark = pytest.mark.slow

TRAIN_METRICS = {"amu_gb", "amu_frac", "peak_gb", "pcu", "mfu", "al_s", "tt", "st",
                 "tokens_per_s", "aec_w", "energy_j", "j_per_token"}


def assert_complete(section: dict, names: set[str]) -> None:
    missing_names = names - set(section)
    assert not missing_names, missing_names
    for name in names:
        val = section[name]
        assert val["unit"] is not None, name
        assert val["value"] is not None or val.get("reason"), f"{name}: null without a reason"


def arch_params(**model) -> config.ArchitectureParams:
    p = config.notebook_params("architecture", "ci", None)
    return p.model_copy(update={"model": p.model.model_copy(update=model), "save_model": False})


SPECS = [
    {"attention": "gqa"},
    {"attention": "mla"},
    {"attention": "nsa", "positional": "sinusoidal"},
    {"ffn": "moe"},
    {"family": "mamba"},
    {"family": "rwkv"},
    {"family": "pythia"},
    {"positional": "relative"},
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.values()))
def test_architecture_run_records_every_metric(spec):
    res = architecture.run(arch_params(**spec), progress=False)
    assert_complete(res.metrics, TRAIN_METRICS | {"kv_bytes_per_token_analytic",
                                                  "kv_bytes_per_token_measured"})
    assert_complete(res.quality, {"val_ppl", "val_loss", "probe_acc"})
    assert res.quality["val_ppl"]["value"] > 1
    assert res.model["tokens_trained"] == 8 * 4 * 63  # ci: 8 steps x batch 4 x 63 targets
    val = res.quality["val_loss"]  # the whole ci held-out split (under the token cap)
    assert val["n_tokens"] == val["heldout_tokens"] == res.quality["val_ppl"]["n_tokens"]
    assert res.curves["loss_vs_tokens"]["x"][-1] == res.model["tokens_trained"]
    losses = res.curves["loss_vs_tokens"]["y"]
    assert losses[-1] < losses[0]  # the optimizer steps
    if spec.get("ffn") == "moe":
        assert res.model["params_active"] < res.model["params_total"]
        assert res.model["ffn_label"] == "moe 4x top-2"  # the ci preset's experts
    else:
        assert res.model["params_active"] == res.model["params_total"]


def test_measured_kv_cache_matches_the_analytic_bytes_for_gqa():
    res = architecture.run(arch_params(attention="gqa"), progress=False)
    assert (res.metrics["kv_bytes_per_token_measured"]["value"]
            == res.metrics["kv_bytes_per_token_analytic"]["value"])


def test_attention_free_models_cache_nothing_per_token():
    res = architecture.run(arch_params(family="mamba"), progress=False)
    assert res.metrics["kv_bytes_per_token_measured"]["value"] == 0


@pytest.mark.parametrize("method", ["lora", "freeze"])
def test_finetuning_run_records_every_metric(method):
    p = config.notebook_params("finetuning", "ci", None).model_copy(update={"method": method})
    res = finetuning.run(p, progress=False)
    assert_complete(res.metrics, TRAIN_METRICS | {"adapter_bytes", "merge_max_abs_diff",
                                                  "computed_positions", "real_tokens",
                                                  "loss_tokens", "padding_frac"})
    assert_complete(res.quality, {"eval_loss", "eval_loss_before", "accuracy",
                                  "accuracy_before"})
    # the embedded Llama keeps packed examples apart, so `auto` packs them: no padding but
    # the last row's tail, and the loss counts exactly the response targets
    assert res.model["packing"]["mode"] == "pack"
    assert res.metrics["padding_frac"]["value"] < 0.2
    assert res.metrics["loss_tokens"]["value"] == res.model["train_tokens"]
    assert 0 < res.model["params_trainable"] < res.model["params_total"]
    assert res.quality["eval_loss"]["value"] < res.quality["eval_loss_before"]["value"]
    if method == "lora":
        assert res.metrics["merge_max_abs_diff"]["value"] < 1e-4


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_inference_run_records_every_metric(precision):
    p = config.notebook_params("inference", "ci", None).model_copy(
        update={"precision": precision})
    res = inference.run(p, progress=False)
    assert_complete(res.metrics, {"it", "al_s", "ttft_s", "tpot_s", "amu_gb", "aec_w",
                                  "j_per_token", "size_bytes", "mcr", "it_bs2"})
    assert_complete(res.quality, {"ppl", "task_acc"})
    ppl = res.quality["ppl"]  # ppl_batches=32 x 8 blocks of 256, spread over the split
    assert ppl["n_tokens"] == 32 * 8 * 255 < ppl["heldout_tokens"]
    assert res.metrics["tpot_s"]["note"] == "excludes the first token of each request"
    # on a CPU the baseline is fp32, and the record says so
    assert res.model["baseline_precision"] == "fp32"
    mcr = res.metrics["mcr"]
    assert mcr["size_ratio"] == pytest.approx(res.model["baseline_weight_bytes"]
                                              / res.model["weight_bytes"])
    assert mcr["perf_ratio"] == pytest.approx(res.model["baseline_ppl"]
                                              / res.quality["ppl"]["value"])
    if precision == "fp32":
        assert mcr["value"] == pytest.approx(1.0)
    else:
        assert mcr["size_ratio"] > 2  # int8 weights against the fp32 baseline
        assert res.metrics["mcr_nominal"]["size_ratio"] == 4.0


def test_inference_on_cpu_is_served_by_hf_generate_and_records_why():
    p = config.notebook_params("inference", "ci", None).model_copy(
        update={"precision": "fp32", "batch_sizes": [1]})
    res = inference.run(p, progress=False)
    assert res.model["engine"]["name"] == "hf_generate"
    assert res.model["engine"]["reason"].startswith("cpu: no CUDA graphs")
    assert res.metrics["tpot_s"]["method"] == "perf_counter_streamer"
    # fp32 serves every linear as a plain torch Linear (the precision loader's names)
    assert res.model["linear_kernels"] == {"torch.nn.Linear(fp32)": res.model["linear_kernels"][
        "torch.nn.Linear(fp32)"]} and res.model["linear_kernels"]["torch.nn.Linear(fp32)"] > 0
    assert "model_flops" in res.metrics["mfu"]["flops_method"]
    assert res.model["fused_projections"] == {"applied": False,
                                              "reason": "fuse_projections=auto on cpu"}


def test_inference_asked_to_fuse_on_cpu_records_the_fused_model_it_served():
    p = config.notebook_params("inference", "ci", None).model_copy(
        update={"precision": "fp32", "batch_sizes": [1], "fuse_projections": "on"})
    res = inference.run(p, progress=False)
    fused = res.model["fused_projections"]
    assert fused["applied"] and fused["groups"] > 0
    before, after = fused["linears_per_model"]
    assert before - after == fused["groups"] // 2 * 3  # per layer: q/k/v -> 1, gate/up -> 1
    assert res.model["linear_kernels"]["torch.nn.Linear(fp32)"] == after
    assert res.quality["ppl"]["value"] > 0


def test_inference_static_graph_engine_runs_on_cpu_with_its_own_clock():
    p = config.notebook_params("inference", "ci", None).model_copy(
        update={"precision": "fp32", "engine": "static_graph"})
    res = inference.run(p, progress=False)
    assert_complete(res.metrics, {"it", "al_s", "ttft_s", "tpot_s", "it_bs2", "tpot_s_bs2"})
    assert res.model["engine"]["name"] == "static_graph"
    assert res.model["engine"]["per_batch"]["2"]["mode"] == "eager"
    for key in ("ttft_s", "tpot_s", "tpot_s_bs2"):
        assert res.metrics[key]["method"] == "perf_counter"
        assert res.metrics[key]["value"] > 0
    assert res.metrics["tpot_s"]["note"] == "excludes the first token of each request"


def test_request_flops_spread_one_request_over_the_tokens_it_runs():
    """MFU numerator: flops_per_token * batch * (P + N) = batch x the request's model FLOPs."""
    cfg = _tiny_llama_config()
    fpt, method = inference.request_flops(cfg, 16, 8)
    total = flops.generation_flops(cfg, 16, 8)["total"]
    assert fpt * (16 + 8) == pytest.approx(total)
    assert method == flops.generation_flops(cfg, 16, 8)["method"]


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


def test_mcr_compares_one_performance_measure_on_both_sides():
    q = {"ppl": {"value": 13.0}, "lm_eval/mean": {"value": 0.4}}
    base_no_lm = {"ppl": {"value": 10.0}}
    assert inference.performance(q, base_no_lm) == (1 / 13.0, 1 / 10.0, "inverse_perplexity")
    base_lm = {"ppl": {"value": 10.0}, "lm_eval/mean": {"value": 0.5}}
    assert inference.performance(q, base_lm) == (0.4, 0.5, "mean_lm_eval_score")


def test_perplexity_that_overflows_is_null_with_its_reason():
    from effllm_helpers import evaluate

    class Huge(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.full((*input_ids.shape, 4), -1e4)
            logits[..., 0] = 1e4  # certain of token 0; the data is all token 1
            return type("Out", (), {"logits": logits})()

    out = evaluate.perplexity(Huge(), torch.ones(2, 8, dtype=torch.long))
    assert out["loss"]["value"] > 700 and out["ppl"]["value"] is None
    assert "overflows" in out["ppl"]["reason"]


def test_weight_bytes_order_int4_int8_half_fp32_on_the_embedded_model():
    path = embedded.resolve("embedded@sft", profile="ci")
    sizes = {}
    for name in ("fp32", "bf16", "fp16", "int8", "int4-nf4"):
        reason = prec.check_supported(name, "cpu")
        if reason:
            pytest.skip(f"{name} cannot run here: {reason}")
        p = config.InferenceParams(precision=name)
        sizes[name] = prec.load_for_inference(path, p, torch.device("cpu")).weight_bytes
    assert sizes["int4-nf4"] < sizes["int8"] < sizes["fp16"] == sizes["bf16"] < sizes["fp32"]


def test_embedded_build_runs_in_a_child_and_reports_its_failure(tmp_path):
    """The build is a child process (its memory stays out of the asking run); a failing child
    surfaces as an error carrying the child's own message."""
    with pytest.raises(RuntimeError, match=r"(?s)'ci' 'sft' model failed.*needs --base"):
        embedded._build_in_child("sft", "ci", tmp_path / "out", None, progress=False)


def test_embedded_model_is_built_without_training_in_this_process(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    from effllm_helpers.axes import architecture

    def no_training_here(*a, **k):
        raise AssertionError("the embedded model was trained in the asking process")

    monkeypatch.setattr(architecture, "run", no_training_here)
    path = Path(embedded.resolve("embedded", profile="ci"))
    assert (path / "config.json").is_file() and str(path).startswith(str(tmp_path))


def test_measured_kv_cache_counts_the_serving_dtype_and_leaves_the_model_alone():
    """An fp32 master copy served in bf16 caches 2-byte elements: half the fp32 slope."""
    from effllm_helpers import evaluate, models

    size = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
            "max_seq_len": 64}
    model = models.build({"attention": "gqa"}, size, vocab_size=50, max_seq_len=64)
    fp32 = evaluate.measured_kv_bytes_per_token(model, 50, t1=4, t2=12)
    bf16 = evaluate.measured_kv_bytes_per_token(model, 50, t1=4, t2=12, dtype=torch.bfloat16)
    assert fp32["value"] == 2 * bf16["value"] == 2 * models.kv_cache_bytes_per_token(
        model.config, dtype_bytes=2)
    assert bf16["dtype"] == "bfloat16"
    assert next(model.parameters()).dtype == torch.float32


def test_probe_sample_longer_than_a_block_is_an_error_not_a_cut():
    tok = None  # the check comes before any tokenizer use
    with pytest.raises(ValueError, match=r"probe_pairs=32: .* needs 97 tokens, more than "
                                         r"data.seq_len=64"):
        architecture.probe_blocks(tok, seq_len=64, n_blocks=2, n_pairs=32, seed=0)
