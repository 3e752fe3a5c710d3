"""The two measurement benchmarks start, take --help, and fail clearly where they cannot run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_overhead_help_and_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("measure_overhead")
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    assert mod.main(["--steps", "30", "--rounds", "1", "--dim", "32", "--threads", "0"]) == 0
    out = capsys.readouterr().out
    assert "overhead ratio" in out and "process CPU-time ratio" in out


def test_gpu_validate_without_gpu_exits_with_a_message(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    mod = _load("gpu_validate")
    assert mod.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_gpu_validate_summary_handles_skipped_parts() -> None:
    mod = _load("gpu_validate")
    res = {"device": {"device_name": "X"}, "finished_at": "now", "command": "cmd",
           "a_energy": {"ok": False, "reason": "skipped by --skip"},
           "b_mfu": {"ok": False, "reason": "skipped by --skip"},
           "c_overhead": {"ok": False, "reason": "skipped by --skip"}}
    text = mod.summary_text(res)
    assert text.count("not measured: skipped by --skip") == 3 and "command: cmd" in text


def _tiny_gqa():
    from effllm_helpers import models

    torch.manual_seed(0)
    size = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
            "max_seq_len": 64}
    return models.build({"attention": "gqa", "positional": "rope", "ffn": "dense"}, size,
                        vocab_size=97, max_seq_len=64).eval()


def test_decode_roofline_own_loop_decodes_like_hf_greedy() -> None:
    """Our static-cache loop (uncompiled here) yields the same tokens as ``generate``."""
    mod = _load("decode_roofline")
    model = _tiny_gqa()
    prompt = torch.randint(0, 97, (1, 6))
    with torch.inference_mode():
        _, ours = mod.own_loop(model, prompt, new_tokens=9, repeats=1, mode=None)
        _, hf = mod.time_generate(model, prompt, new_tokens=9, repeats=1)
    assert len(ours) == 9
    assert ours == hf


def test_decode_roofline_agreement_counts_the_shared_prefix() -> None:
    mod = _load("decode_roofline")
    assert mod.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.5
    assert mod.agreement([5, 6], [5, 6, 7]) == 1.0


def test_decode_roofline_bytes_per_token_skips_the_embedding_table() -> None:
    mod = _load("decode_roofline")
    model = _tiny_gqa()
    total, read, kv = mod.bytes_read_per_token(model)
    emb = model.get_input_embeddings().weight
    assert read == total - emb.numel() * emb.element_size() + emb.shape[1] * emb.element_size()
    assert kv == 2 * 2 * 2 * 8 * 2  # K and V, 2 layers, 2 KV heads of 8 dims, 2 bytes


def test_decode_roofline_writes_text_json_and_figure(tmp_path: Path) -> None:
    mod = _load("decode_roofline")
    args = mod.argparse.Namespace(prompt_len=8, new_tokens=9, repeats=1, k=4)

    def entry(label: str, per_token: float, rates: dict) -> dict:
        bound = 3e12 / per_token
        return {"label": label, "model": {"d_model": 8, "n_layers": 1, "params": 5e6},
                "bytes_per_token": per_token, "bound_tokens_per_s": bound,
                "step_time_us_at_bound": 1e6 / bound, "tokens_per_s": rates,
                "errors": {"own_loop_graph_k": "RuntimeError: x"},
                "greedy_agreement_with_dynamic_eager": {"own_loop_cuda_graphs": 1.0}}

    entries = [entry("gpu:medium", 1.9e8, {"dynamic_eager": 120.0, "own_loop_cuda_graphs": 4e3,
                                           "own_loop_graph_k": None}),
               entry("paper:small", 9e8, {"dynamic_eager": 100.0})]
    lines = mod.write(entries, 3e12, "Fake GPU", args, tmp_path)
    text = "\n".join(lines)
    assert "own_loop_graph_k       failed: RuntimeError: x" in text
    assert "best on gpu:medium: 25.3% of the bound" in text
    assert (tmp_path / "decode_roofline.png").stat().st_size > 10_000
    assert (tmp_path / "decode_roofline.json").exists()


def test_decode_roofline_replot_merges_runs_in_order(tmp_path: Path) -> None:
    import json

    mod = _load("decode_roofline")

    def run(label: str, rate: float) -> dict:
        return {"command": f"run {label}", "device": "Fake GPU", "torch": "2.11",
                "copy_bandwidth_Bps": 3e12, "prompt_len": 8, "new_tokens": 9, "repeats": 1,
                "k": 4, "sizes": [{"label": label, "model": {"d_model": 8, "n_layers": 1,
                                                             "params": 1e9},
                                   "bytes_per_token": 2e9, "bound_tokens_per_s": 1500.0,
                                   "step_time_us_at_bound": 667.0,
                                   "tokens_per_s": {"own_loop_graph_k": rate}, "errors": {},
                                   "greedy_agreement_with_dynamic_eager": None}]}

    files = []
    for i, (label, rate) in enumerate((("gpu:medium", 150.0), ("paper:large", 900.0))):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(run(label, rate)))
    mod.replot(files, tmp_path / "merged")
    merged = json.loads((tmp_path / "merged" / "decode_roofline.json").read_text())
    assert [e["label"] for e in merged["sizes"]] == ["gpu:medium", "paper:large"]
    assert merged["best_fraction_of_bound"] == 0.1  # the headline is the first file's model
    assert merged["torch"] == "2.11" and "run gpu:medium ; run paper:large" in merged["command"]


@pytest.mark.parametrize(("name", "args"), [
    ("measure_overhead", ["--rounds", "0"]), ("measure_overhead", ["--steps", "0"]),
    ("gpu_validate", ["--overhead-rounds", "0"]), ("gpu_validate", ["--overhead-steps", "-3"])])
def test_zero_rounds_or_steps_is_a_usage_error(name: str, args: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load(name)
    with pytest.raises(SystemExit) as exc:
        mod.main(args)
    assert exc.value.code == 2
    assert "must be a positive integer" in capsys.readouterr().err


def test_decode_roofline_unknown_size_is_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    mod = _load("decode_roofline")
    monkeypatch.setattr(sys, "argv", ["decode_roofline.py", "--sizes", "gpu:huge"])
    with pytest.raises(SystemExit) as exc:
        mod.main()
    assert exc.value.code == 2
    assert "size 'huge' not in the gpu preset; allowed: small, medium, large" in (
        capsys.readouterr().err)


def test_decode_roofline_profile_writes_the_kernel_table_and_per_token_totals(tmp_path) -> None:
    mod = _load("decode_roofline")
    a = torch.randn(64, 64)
    stats = mod.kernel_profile(lambda: [a @ a for _ in range(4)], 4, tmp_path / "p.txt")
    assert "aten::mm" in (tmp_path / "p.txt").read_text()
    # no CUDA here: no kernels are counted, and the totals say so rather than guess
    assert stats["kernels"] == 0 and stats["kernels_per_token"] == 0 and stats["table"] == "p.txt"


def test_bf16_agreement_reports_nsa_block_choices_and_the_gqa_control(tmp_path: Path,
                                                                       monkeypatch) -> None:
    mod = _load("bf16_agreement")
    monkeypatch.setattr(sys, "argv", ["bf16_agreement.py", "--preset", "ci", "--device", "cpu",
                                      "--variants", "gqa,nsa", "--out", str(tmp_path)])
    mod.main()
    out = json.loads((tmp_path / "bf16_agreement.json").read_text())
    nsa, gqa = out["variants"]["nsa"], out["variants"]["gqa"]
    assert [row["layer"] for row in nsa["nsa_layers"]] == [0, 1]  # the ci preset's two layers
    for row in nsa["nsa_layers"]:
        assert 0.0 <= row["rows_chosen_differently_bf16"] <= 1.0
        assert 0.0 <= row["near_tie_rows_fp32"] <= 1.0
    first = nsa["nsa_layers"][0]  # same input in both runs: only rounding flips a choice
    assert first["rows_chosen_differently_bf16"] > 0 and first["near_tie_rows_fp32"] > 0
    # the flipped choices move NSA well past the rounding the GQA control shows
    assert 0 < gqa["reference_bf16_vs_fp32_logits_rel_err"] < 0.1
    assert (nsa["reference_bf16_vs_fp32_logits_rel_err"]
            > 3 * gqa["reference_bf16_vs_fp32_logits_rel_err"])
    assert len(gqa["hidden_bf16_vs_fp32_rel_err"]) == 3  # embeddings + two layers
    assert "fla" not in nsa  # no CUDA: fla is not attempted


def test_bf16_agreement_refuses_an_unknown_variant_naming_the_allowed(monkeypatch, capsys):
    mod = _load("bf16_agreement")
    monkeypatch.setattr(sys, "argv", ["bf16_agreement.py", "--variants", "nsa,retnet"])
    with pytest.raises(SystemExit):
        mod.main()
    assert "gqa, nsa, mamba" in capsys.readouterr().err


@pytest.mark.parametrize("script,argv,says", [
    ("finetune_scale", ["--lora-dropout", "1.5"], "a dropout probability in [0, 1)"),
    ("pretrain_mfu", ["--min-window-s", "-1"], "seconds, 0 or more"),
])
def test_a_bad_window_or_dropout_is_refused_naming_what_is_allowed(script, argv, says,
                                                                    monkeypatch, capsys):
    mod = _load(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit):
        mod.main()
    assert says in capsys.readouterr().err


def test_pretrain_mfu_says_when_a_short_window_was_measured_again() -> None:
    mod = _load("pretrain_mfu")
    out = {"impl": "hf", "kernels": "transformers Llama modules", "command": "x",
           "model": {"d_model": 768, "n_layers": 12, "params": 1.05e8},
           "tokens_per_s": 4.2e5, "step_s": 0.039, "window_s": 5.1, "measured_steps": 130,
           "window_extended_from": {"steps": 40, "window_s": 1.56},
           "mfu": {"value": 0.18, "method": "analytic"}, "mfu_no_causal_discount": 0.2,
           "peak_flops_used": 9.89e14, "measured_matmul_peak_flops": 7.6e14,
           "mfu_vs_measured_matmul_peak": 0.23, "pcu_nvml": {"value": 0.9},
           "aec_w": {"value": 600.0}, "energy_j": {"value": 3060.0}}
    args = SimpleNamespace(batch_size=16, seq_len=1024, grad_accum=1, compile=True)
    text = "\n".join(mod.summary(out, "H100", args))
    assert "window 5.1 s over 130 steps (re-run: 1.6 s over 40 was under" in text
    text = "\n".join(mod.summary({**out, "window_s": None}, "H100", args))
    assert "window unmeasured" in text
