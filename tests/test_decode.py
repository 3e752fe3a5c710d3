"""Decode engines: the static-cache engine decodes exactly like ``generate`` and is timed by its
own clock; the engine choice follows the params and the device, and says why."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from effllm_helpers import config, models
from effllm_helpers.decode import (
    StaticGraphDecoder,
    choose_engine,
    linear_kernels,
    static_cache_support,
    timing_metrics,
)

VOCAB = 97
SIZE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ff": 64,
        "max_seq_len": 64}


def _model(**spec: str) -> nn.Module:
    torch.manual_seed(0)
    spec = {"attention": "gqa", "positional": "rope", "ffn": "dense", **spec}
    return models.build(spec, SIZE, vocab_size=VOCAB, max_seq_len=64).eval()


def _hf_greedy(model: nn.Module, prompt: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[:, prompt.shape[1]:]


@pytest.mark.parametrize("batch", [1, 3])
def test_static_engine_tokens_equal_generate_greedy(batch: int) -> None:
    model = _model()
    torch.manual_seed(1)
    prompt = torch.randint(0, VOCAB, (batch, 7))
    with torch.inference_mode():
        dec = StaticGraphDecoder(model, batch, 7, 12)
        ours, timing = dec.decode(prompt)
        again, _ = dec.decode(prompt)  # the decoder is reused across requests
        hf = _hf_greedy(model, prompt, 12)
    assert ours.shape == (batch, 12)
    assert torch.equal(ours, hf)
    assert torch.equal(again, hf)
    assert timing.n_generated == 12 * batch and len(timing.step_s) == 11


def test_static_engine_masks_eos_like_min_new_tokens() -> None:
    """A request of exactly N tokens never ends early: the token generate would stop on is
    masked, so the engine agrees with ``generate(min_new_tokens=N)``."""
    model = _model()
    prompt = torch.randint(0, VOCAB, (2, 5))
    with torch.inference_mode():
        free = StaticGraphDecoder(model, 2, 5, 6, suppress_eos=False).decode(prompt)[0]
    model.generation_config.eos_token_id = int(free[0, 2])  # a token the free run picks
    with torch.inference_mode():
        ours = StaticGraphDecoder(model, 2, 5, 6).decode(prompt)[0]
        hf = _hf_greedy(model, prompt, 6)
    assert int(free[0, 2]) not in ours[0].tolist()
    assert torch.equal(ours, hf)


class _HostSyncs(TorchDispatchMode):
    """Counts device-to-host reads (``.item()``/``bool()``), which a CUDA graph cannot hold."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
                    torch.ops.aten.item.default):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_decode_step_reads_nothing_back_to_the_host() -> None:
    """What the CUDA graph captures (one decode step) must not depend on host-read values."""
    model = _model()
    with torch.inference_mode():
        dec = StaticGraphDecoder(model, 2, 5, 4)
        dec._prefill(torch.randint(0, VOCAB, (2, 5)))
        with _HostSyncs() as seen:
            dec._steps(1)
    assert seen.ops == []


def test_cpu_timing_uses_perf_counter_and_excludes_the_first_token() -> None:
    model = _model()
    with torch.inference_mode():
        dec = StaticGraphDecoder(model, 1, 5, 6)
        _, t = dec.decode(torch.randint(0, VOCAB, (1, 5)))
    assert dec.describe()["clock"] == "perf_counter" and dec.mode == "eager"
    assert "no CUDA graphs" in dec.describe()["fallback_reason"]
    assert t.tpot_s == pytest.approx(sum(t.step_s) / 5)
    assert t.e2e_s == pytest.approx(t.ttft_s + 5 * t.tpot_s)
    m = timing_metrics([t, t], "perf_counter")
    assert m["ttft_s"]["method"] == m["tpot_s"]["method"] == "perf_counter"
    assert m["tpot_s"]["n"] == 2 and m["tpot_s"]["note"].startswith("excludes the first token")


def test_one_token_request_has_no_tpot() -> None:
    with torch.inference_mode():
        tokens, t = StaticGraphDecoder(_model(), 1, 4, 1).decode(torch.randint(0, VOCAB, (1, 4)))
    assert tokens.shape == (1, 1) and t.tpot_s is None and t.ttft_s is not None
    assert timing_metrics([t], "perf_counter")["tpot_s"]["value"] is None


def test_prompt_of_another_shape_is_an_error() -> None:
    with torch.inference_mode():
        dec = StaticGraphDecoder(_model(), 2, 4, 3)
        with pytest.raises(ValueError, match="prompt shape"):
            dec.decode(torch.randint(0, VOCAB, (1, 4)))


def test_auto_is_hf_generate_on_cpu_and_says_why() -> None:
    choice = choose_engine("auto", _model(), "cpu")
    assert choice.name == "hf_generate"
    assert "cpu: no CUDA graphs" in choice.reason


def test_auto_is_static_graph_on_cuda_for_a_static_cache_model() -> None:
    choice = choose_engine("auto", _model(), "cuda")  # the choice itself needs no GPU
    assert choice.name == "static_graph" and "CUDA graph" in choice.reason


@pytest.mark.parametrize("spec", [{"family": "rwkv"}, {"positional": "relative"}])
def test_models_without_static_cache_support_fall_back_with_the_reason(spec) -> None:
    model = _model(**spec)
    why = static_cache_support(model)
    assert why and type(model).__name__ in why
    choice = choose_engine("static_graph", model, "cuda")
    assert choice.name == "hf_generate" and "fell back to hf_generate" in choice.reason
    with pytest.raises(ValueError, match="static KV cache"):
        StaticGraphDecoder(model, 1, 4, 3)


def test_static_graph_asked_for_on_cpu_runs_the_eager_loop() -> None:
    choice = choose_engine("static_graph", _model(), "cpu")
    assert choice.name == "static_graph" and "eager static-cache loop" in choice.reason


def test_unknown_engine_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown decode engine"):
        choose_engine("vllm", _model(), "cpu")


def test_params_engine_defaults_to_auto_and_rejects_unknown_names() -> None:
    assert config.InferenceParams().engine == "auto"
    assert config.InferenceParams(engine="static_graph").engine == "static_graph"
    with pytest.raises(ValueError):
        config.InferenceParams(engine="vllm")


def test_linear_kernels_name_module_classes_and_weight_subclasses() -> None:
    class Packed(torch.Tensor):
        pass

    class QLinear(nn.Linear):
        pass

    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), QLinear(4, 4), nn.LayerNorm(4))
    net[2].weight = nn.Parameter(net[2].weight.detach().as_subclass(Packed),
                                 requires_grad=False)
    assert linear_kernels(net) == {"Embedding": 1, "Linear": 1, "QLinear[Packed]": 1}


def test_gpu_self_check_script_says_it_needs_a_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "decode_engine_check.py"
    spec = importlib.util.spec_from_file_location("decode_engine_check", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cache_kwarg_follows_the_installed_transformers_forward() -> None:
    # transformers 5.17 takes past_key_values + cache_position, later 5.x take cache: a cache
    # under the wrong name falls into **kwargs and every step would decode without context
    from effllm_helpers.decode import _cache_kwargs

    class Old(torch.nn.Module):
        def forward(self, input_ids=None, past_key_values=None, cache_position=None, **kw):
            return input_ids

    class New(torch.nn.Module):
        def forward(self, input_ids=None, cache=None, **kw):
            return input_ids

    assert _cache_kwargs(Old()) == ("past_key_values", True)
    assert _cache_kwargs(New()) == ("cache", False)


def test_measured_requests_continue_until_the_window_is_long_enough(monkeypatch) -> None:
    from types import SimpleNamespace

    from effllm_helpers.axes import inference

    clock = SimpleNamespace(now=0.0)  # a fake host clock: each request takes 0.01 s
    monkeypatch.setattr(inference, "time", SimpleNamespace(perf_counter=lambda: clock.now))
    spec = config.MeasureSpec(warmup_steps=1, repeats=2, min_duration_s=0.05)
    served = []
    for i in inference._requests(spec):
        served.append(i)
        clock.now += 0.01
    # the warm-up request, then measured ones until 0.05 s of them: 5 (the 2 repeats included)
    assert served == [0, 1, 2, 3, 4, 5]
    quick = config.MeasureSpec(warmup_steps=0, repeats=2, min_duration_s=0.0)
    assert list(inference._requests(quick)) == [0, 1]


def test_compiled_step_gets_gemv_tuning_and_records_it(monkeypatch) -> None:
    """inductor is asked for coordinate-descent tuning (the default), and the record says so."""
    asked: list[dict] = []

    def fake_compile(fn, **kw):
        asked.append(kw.get("options"))
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _model()
    tuned = StaticGraphDecoder(model, 1, 4, 3, compile_step=True).describe()
    plain = StaticGraphDecoder(model, 1, 4, 3, compile_step=True, tune_gemv=False).describe()
    eager = StaticGraphDecoder(model, 1, 4, 3).describe()
    assert asked == [{"coordinate_descent_tuning": True}, {}]  # the eager step compiles nothing
    assert tuned["compile_options"] == {"coordinate_descent_tuning": True}
    assert plain["compile_options"] == {} and plain["compile_step"]
    assert eager["compile_options"] is None
