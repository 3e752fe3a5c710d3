"""Decode engines: how a request is served and timed.

The study measures a technique (a precision, an attention variant), so the harness around the
model must not be the bottleneck. Two engines serve the same greedy request (a prompt batch,
exactly ``gen_tokens`` new tokens):

* ``hf_generate`` - Hugging Face ``generate`` with its dynamic cache, timed by a per-token
  streamer (:func:`effllm_helpers.measure.timed_generate`). Works for every model; on a GPU its
  per-token Python and kernel launches dominate small-batch decode.
* ``static_graph`` - our greedy loop over one transformers ``StaticCache``: one prefill forward,
  then one fixed-shape forward per token. Fixed shapes and fixed buffer addresses let the step be
  captured in a CUDA graph (``torch.cuda.CUDAGraph``), so a token costs one graph replay. The step
  writes the next token and its history on the device; the host only replays. On a CPU (or when
  capture fails) the same step runs eagerly, which is what the CPU tests check token for token.

Timing of ``static_graph``: TTFT = request start to the first token (prefill + its argmax);
TPOT = (end of the last decode step - end of the prefill) / (gen_tokens - 1), i.e. the first
token is excluded, as for the streamer. On CUDA the marks are CUDA events recorded on the stream
around the prefill and after every graph replay (a replay of ``steps_per_graph`` tokens is timed
as a block and divided by its size); on a CPU they are ``time.perf_counter`` reads.

``auto`` picks ``static_graph`` on CUDA and ``hf_generate`` on a CPU, where there are no CUDA
graphs and ``generate`` is what the CPU study has always timed.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .measure.latency import request_latency_metrics

EngineName = Literal["auto", "static_graph", "hf_generate"]
ENGINES: tuple[str, ...] = ("auto", "static_graph", "hf_generate")


@dataclass(frozen=True)
class EngineChoice:
    """The engine that serves a run, and why (goes into the record)."""

    name: Literal["static_graph", "hf_generate"]
    reason: str
    requested: str = "auto"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "reason": self.reason, "requested": self.requested}


def static_cache_support(model: nn.Module) -> str | None:
    """None when a transformers ``StaticCache`` can serve ``model``, else why not.

    transformers marks the models whose forward runs on a static cache without host-side
    branching as ``_can_compile_fullgraph``; recurrent models (Mamba, RWKV) and our own custom
    decoder (which sizes its attention from the cache length) are not marked, so they are
    detected here, before any request runs.
    """
    if not getattr(model, "_can_compile_fullgraph", False):
        return (f"{type(model).__name__} does not support a static KV cache "
                "(transformers does not mark it compileable)")
    if getattr(model, "config", None) is None:
        return f"{type(model).__name__} has no config to size a static KV cache from"
    if getattr(model.config, "is_encoder_decoder", False):
        return "encoder-decoder models are not served by the static-cache engine"
    return None


def choose_engine(requested: str, model: nn.Module, device: torch.device | str) -> EngineChoice:
    """Resolve ``requested`` (``auto`` / ``static_graph`` / ``hf_generate``) for this model."""
    if requested not in ENGINES:
        raise ValueError(f"unknown decode engine {requested!r}; allowed: {', '.join(ENGINES)}")
    dev = torch.device(device)
    if requested == "hf_generate":
        return EngineChoice("hf_generate", "asked for (params engine=hf_generate)", requested)
    why_not = static_cache_support(model)
    if requested == "static_graph":
        if why_not:
            return EngineChoice("hf_generate", f"static_graph asked for, but {why_not}; "
                                "fell back to hf_generate", requested)
        where = ("decode step in a CUDA graph" if dev.type == "cuda"
                 else f"{dev.type}: eager static-cache loop, no CUDA graphs")
        return EngineChoice("static_graph", f"asked for (params engine=static_graph); {where}",
                            requested)
    if dev.type != "cuda":
        return EngineChoice("hf_generate", f"{dev.type}: no CUDA graphs; static_graph runs only "
                            "when asked", requested)
    if why_not:
        return EngineChoice("hf_generate", f"cuda, but {why_not}", requested)
    return EngineChoice("static_graph", "cuda: static KV cache, decode step in a CUDA graph",
                        requested)


@dataclass
class RequestTiming:
    """One request's clock: what ``generation_metrics``-style summaries need."""

    ttft_s: float | None
    tpot_s: float | None
    e2e_s: float | None
    n_steps: int  # tokens per sequence, the first included
    n_generated: int  # over the batch
    step_s: list[float] = field(default_factory=list)  # per decode token (blocks / their size)

    def result(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "n_steps": self.n_steps, "n_generated": self.n_generated}


def timing_metrics(timings: Sequence[RequestTiming], method: str) -> dict[str, dict[str, Any]]:
    """``ttft_s`` and ``tpot_s`` over requests (mean + percentiles), the keys the streamer path
    produces, with this engine's clock as the method."""
    return request_latency_metrics(timings, method)


def _banned_token_ids(model: nn.Module) -> list[int]:
    """EOS ids: a request of exactly N tokens masks them, as ``min_new_tokens=N`` does."""
    gc = getattr(model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return []
    ids = [eos] if isinstance(eos, int) else list(eos)
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else None
    return [int(i) for i in ids if vocab is None or 0 <= int(i) < vocab]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


class StaticGraphDecoder:
    """Greedy decode of exactly ``gen_tokens`` tokens for a ``(batch, prompt_len)`` prompt.

    Built once per shape (the cache, the buffers and, on CUDA, the graph), then reused for every
    request: ``decode(prompt) -> (tokens (batch, gen_tokens), RequestTiming)``.

    ``use_graph``: None = on CUDA; a failed capture falls back to eager steps and says why in
    ``fallback_reason``. ``compile_step`` compiles the one-token forward with ``torch.compile``
    (inductor kernels, no cudagraph trees: the graph is ours). ``steps_per_graph`` tokens are
    captured into one graph (the remainder into a second one).

    ``tune_gemv`` (compiled steps only) turns on inductor's coordinate-descent tuning. At batch 1
    every projection is a matrix-vector product; with this option inductor lowers each one to a
    Triton reduction and tunes its block sizes for the shape, instead of calling a cuBLAS GEMM
    kernel sized for matrices. This is how gpt-fast-style decoders approach the memory-bandwidth
    bound; it costs compile time (each kernel is benchmarked once), which stays outside the
    timed requests.
    """

    def __init__(self, model: nn.Module, batch: int, prompt_len: int, gen_tokens: int, *,
                 use_graph: bool | None = None, compile_step: bool = False,
                 steps_per_graph: int = 1, suppress_eos: bool = True,
                 tune_gemv: bool = True) -> None:
        from transformers import StaticCache

        why_not = static_cache_support(model)
        if why_not:
            raise ValueError(f"static_graph engine: {why_not}")
        if gen_tokens < 1 or prompt_len < 1 or batch < 1 or steps_per_graph < 1:
            raise ValueError("batch, prompt_len, gen_tokens and steps_per_graph must be >= 1")
        self.model = model
        self.device = _model_device(model)
        self.batch, self.prompt_len, self.gen_tokens = batch, prompt_len, gen_tokens
        self.n_decode = gen_tokens - 1  # forward steps after the prefill
        self.k = max(1, min(steps_per_graph, self.n_decode or 1))
        self.is_cuda = self.device.type == "cuda"
        self.compile_step = compile_step
        self.tune_gemv = bool(compile_step and tune_gemv)
        # the warm-up before capture runs k steps after a prefill: the cache must hold them too
        self.cache = StaticCache(config=model.config,
                                 max_cache_len=prompt_len + max(gen_tokens, self.k + 1))
        dev = self.device
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.hist = torch.zeros((batch, max(gen_tokens, self.k + 1)), dtype=torch.long,
                                device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        # the position of the token being fed, on the device: a CUDA graph must read it from a
        # buffer, never from a host int frozen at capture time
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.prompt_pos = torch.arange(prompt_len, dtype=torch.long, device=dev)
        banned = _banned_token_ids(model) if suppress_eos else []
        self.banned = torch.tensor(banned, dtype=torch.long, device=dev) if banned else None
        self._keep = _accepts_logits_to_keep(model)
        self._cache_kw, self._pass_cache_position = _cache_kwargs(model)
        fwd = self._forward_one
        self._step_forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(fwd, dynamic=False, options=compile_options(self.tune_gemv))
            if compile_step else fwd)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.fallback_reason: str | None = None
        want_graph = self.is_cuda if use_graph is None else use_graph
        if not self.is_cuda:
            self.fallback_reason = f"{dev.type}: no CUDA graphs; eager static-cache steps"
        elif want_graph and self.n_decode > 0:
            try:
                self._capture()
            except Exception as exc:  # capture is an optimisation: the eager loop is exact
                self.graphs = {}
                torch.cuda.synchronize()
                why = f"{type(exc).__name__}: {exc}"[:300]
                if self.compile_step:  # e.g. a quantised kernel inductor cannot trace
                    self._step_forward = self._forward_one
                    self.compile_step = self.tune_gemv = False
                    self.fallback_reason = f"compiled step failed, uncompiled graph: {why}"
                    try:
                        self._capture()
                    except Exception as exc2:
                        self.graphs = {}
                        torch.cuda.synchronize()
                        self.fallback_reason += (f"; CUDA graph capture failed too, eager "
                                                 f"steps: {type(exc2).__name__}: {exc2}"[:300])
                else:
                    self.fallback_reason = f"CUDA graph capture failed, eager steps: {why}"
        elif not want_graph:
            self.fallback_reason = "CUDA graphs not asked for (use_graph=False)"

    # ---------------------------------------------------------------- pieces
    @property
    def mode(self) -> str:
        return "cuda_graph" if self.graphs else "eager"

    @property
    def clock(self) -> str:
        return "cuda_events" if self.is_cuda else "perf_counter"

    def _greedy(self, logits: torch.Tensor) -> torch.Tensor:
        """Next ids (batch, 1) from last-position logits; EOS masked as min_new_tokens does."""
        logits = logits[:, -1, :].float()
        if self.banned is not None:
            logits = logits.index_fill(1, self.banned, float("-inf"))
        return logits.argmax(-1, keepdim=True)

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Greedy next ids for ``ids`` fed at ``positions`` (1-D, shared by the batch).

        Positions are passed explicitly on every transformers version: releases that take
        ``cache_position`` (and ``past_key_values``) would otherwise derive them on the host."""
        kw: dict[str, Any] = {"logits_to_keep": 1} if self._keep else {}
        kw[self._cache_kw] = self.cache
        if self._pass_cache_position:
            kw["cache_position"] = positions
        pos_ids = positions.unsqueeze(0).expand(ids.shape[0], -1)
        out = self.model(input_ids=ids, position_ids=pos_ids, use_cache=True, **kw)
        return self._greedy(out.logits)

    def _forward_one(self, ids: torch.Tensor) -> torch.Tensor:
        return self._forward(ids, self.pos)

    def _prefill(self, prompt: torch.Tensor) -> None:
        self.cache.reset()  # in place: the graph keeps pointing at the same buffers
        self.ids.copy_(self._forward(prompt, self.prompt_pos))
        self.hist[:, :1].copy_(self.ids)
        self.slot.fill_(1)
        self.pos.fill_(self.prompt_len)

    def _steps(self, n: int) -> None:
        """``n`` decode steps, all on the device: token in ``ids`` -> next token in ``ids``."""
        for _ in range(n):
            nxt = self._step_forward(self.ids)
            self.ids.copy_(nxt)
            self.hist.index_copy_(1, self.slot, nxt)
            self.slot.add_(1)
            self.pos.add_(1)

    def _capture(self) -> None:
        """Warm up on a side stream (allocations, cuBLAS handles, compilation), then capture."""
        warm = torch.zeros((self.batch, self.prompt_len), dtype=torch.long, device=self.device)
        self._prefill(warm)  # allocates the cache on the main stream
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self._prefill(warm)
                self._steps(self.k)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        blocks = {self.k} | ({self.n_decode % self.k} - {0})
        pool = None
        for n in sorted(blocks, reverse=True):
            self._prefill(warm)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                self._steps(n)
            pool = g.pool()
            self.graphs[n] = g
        torch.cuda.synchronize()

    def _blocks(self) -> list[int]:
        """Token counts run per timed block: k per graph replay, 1 per eager step."""
        if not self.graphs:
            return [1] * self.n_decode
        full, rem = divmod(self.n_decode, self.k)
        return [self.k] * full + ([rem] if rem else [])

    # ---------------------------------------------------------------- a request
    def decode(self, prompt: torch.Tensor) -> tuple[torch.Tensor, RequestTiming]:
        """Serve one request; returns the generated ids (batch, gen_tokens) and its timing."""
        if tuple(prompt.shape) != (self.batch, self.prompt_len):
            raise ValueError(f"prompt shape {tuple(prompt.shape)} != the decoder's "
                             f"{(self.batch, self.prompt_len)}")
        prompt = prompt.to(self.device)
        blocks = self._blocks()
        if self.is_cuda:
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(len(blocks) + 2)]
            torch.cuda.synchronize()
            marks[0].record()
            self._prefill(prompt)
            marks[1].record()
            for i, n in enumerate(blocks):
                if self.graphs:
                    self.graphs[n].replay()
                else:
                    self._steps(n)
                marks[i + 2].record()
            torch.cuda.synchronize()
            times = [0.0] + [marks[0].elapsed_time(m) / 1e3 for m in marks[1:]]
        else:
            times = [time.perf_counter()]
            self._prefill(prompt)
            times.append(time.perf_counter())
            for n in blocks:
                self._steps(n)
                times.append(time.perf_counter())
            times = [t - times[0] for t in times]
        step_s = [(times[i + 2] - times[i + 1]) / n for i, n in enumerate(blocks)
                  for _ in range(n)]
        ttft = times[1]
        tpot = (times[-1] - times[1]) / self.n_decode if self.n_decode else None
        tokens = self.hist[:, :self.gen_tokens].clone()
        timing = RequestTiming(ttft_s=ttft, tpot_s=tpot, e2e_s=times[-1],
                               n_steps=self.gen_tokens, n_generated=self.gen_tokens * self.batch,
                               step_s=step_s)
        return tokens, timing

    def describe(self) -> dict[str, Any]:
        """What ran, for the record."""
        return {"mode": self.mode, "clock": self.clock, "compile_step": self.compile_step,
                "compile_options": compile_options(self.tune_gemv) if self.compile_step else None,
                "steps_per_graph": self.k if self.graphs else 1,
                "tpot_timing": ("per graph replay / its tokens" if self.graphs
                                else "per decode step"),
                "fallback_reason": self.fallback_reason}


def compile_options(tune_gemv: bool) -> dict[str, Any]:
    """Inductor options of the compiled decode step (recorded as they were passed)."""
    return {"coordinate_descent_tuning": True} if tune_gemv else {}


def _cache_kwargs(model: nn.Module) -> tuple[str, bool]:
    """(the forward's name for the KV cache, whether it takes ``cache_position``).

    transformers renamed ``past_key_values`` to ``cache`` and dropped ``cache_position`` within
    5.x; a cache passed under the wrong name lands in ``**kwargs`` and is silently ignored."""
    import inspect

    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return name, "cache_position" in params


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    """Whether the forward can skip the LM head for all but the last position (as generate)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def linear_kernels(model: nn.Module) -> dict[str, int]:
    """Which implementations hold the weight matrices: ``Class[WeightSubclass]`` -> count.

    A plain ``nn.Linear`` counts as ``Linear``; a quantised one shows its module class (bnb
    ``Linear4bit``) and/or its weight's tensor subclass (bnb ``Params4bit``/``Int8Params``,
    torchao's quantised tensors), so the record says which kernels served the run. 1-D weights
    (norms) are left out.
    """
    counts: Counter[str] = Counter()
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(w, torch.Tensor) or w.dim() < 2 and type(w).__name__ in _PLAIN:
            continue
        key = type(mod).__name__
        if type(w).__name__ not in _PLAIN:
            key += f"[{type(w).__name__}]"
        counts[key] += 1
    return dict(sorted(counts.items()))


_PLAIN = ("Tensor", "Parameter")
