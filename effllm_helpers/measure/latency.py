"""Latency (AL) with percentiles, and time-to-first-token / time-per-output-token for generation.

Why a streamer: Hugging Face ``generate(streamer=...)`` calls ``streamer.put(ids)`` first with
the prompt and then once per decoding step with the new token(s), after copying them to the
host (``.cpu()``), so the host clock at each ``put`` is when that token really exists -- the
device is synchronised by that copy. (On MPS, transformers may defer the copy by one step.)

Definitions: TTFT = first generated token's arrival - request start (prefill included).
TPOT = (last token's arrival - first token's arrival) / (generated steps - 1): the first token is
*excluded* because it carries the prefill; a one-token generation has no TPOT.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from effllm_helpers.measure.stats import summarize
from effllm_helpers.results import metric, missing


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_metric(values_s: Sequence[float], method: str, unit: str = "s",
                   what: str = "latency") -> dict[str, Any]:
    """Mean of per-iteration (or per-request) seconds with p50/p90/p99, std, n and ci95."""
    vals = [float(v) for v in values_s if v is not None]
    if not vals:
        return missing(unit, f"no {what} samples in the measured phase", method)
    s = summarize(vals)
    return metric(s["mean"], unit, method, p50=percentile(vals, 50), p90=percentile(vals, 90),
                  p99=percentile(vals, 99), n=len(vals), std=s["std"], ci95=s["ci95"],
                  ci95_reason=s.get("ci95_reason"))


class GenerationTimer:
    """A duck-typed Hugging Face streamer that timestamps each generated token.

    Usage::

        timer = GenerationTimer()
        timer.start()                                  # the request begins (optional)
        out = model.generate(**inputs, streamer=timer, max_new_tokens=64)
        timer.ttft_s, timer.tpot_s, timer.n_generated

    Without ``start()`` the clock starts at the prompt ``put`` (a little after ``generate`` was
    called). ``skip_prompt=False`` treats the first ``put`` as a generated token (for callers that
    stream only new tokens). Beam search cannot stream (transformers' own limit).
    """

    def __init__(self, skip_prompt: bool = True,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.skip_prompt = skip_prompt
        self.clock = clock
        self.t_start: float | None = None
        self.token_times: list[float] = []
        self.tokens_per_step: list[int] = []
        self.t_end: float | None = None
        self._prompt_seen = not skip_prompt

    def start(self) -> GenerationTimer:
        self.t_start = self.clock()
        return self

    # streamer protocol ------------------------------------------------------
    def put(self, value: Any) -> None:
        t = self.clock()
        if not self._prompt_seen:
            self._prompt_seen = True
            if self.t_start is None:
                self.t_start = t
            return
        if self.t_start is None:
            self.t_start = t
        self.token_times.append(t)
        n = int(value.numel()) if hasattr(value, "numel") else len(value) if hasattr(
            value, "__len__") else 1
        self.tokens_per_step.append(n)

    def end(self) -> None:
        self.t_end = self.clock()

    # results ----------------------------------------------------------------
    @property
    def n_steps(self) -> int:
        """Decoding steps that produced a token (per sequence)."""
        return len(self.token_times)

    @property
    def n_generated(self) -> int:
        """Generated tokens over the batch (steps × batch size)."""
        return sum(self.tokens_per_step)

    @property
    def ttft_s(self) -> float | None:
        if not self.token_times or self.t_start is None:
            return None
        return self.token_times[0] - self.t_start

    @property
    def tpot_s(self) -> float | None:
        """Mean seconds per output token after the first (None with fewer than 2 tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def e2e_s(self) -> float | None:
        end = self.t_end if self.t_end is not None else (
            self.token_times[-1] if self.token_times else None)
        if end is None or self.t_start is None:
            return None
        return end - self.t_start

    def result(self) -> dict[str, Any]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "e2e_s": self.e2e_s,
                "n_steps": self.n_steps, "n_generated": self.n_generated}


def timed_generate(model: Any, **generate_kwargs: Any) -> tuple[Any, GenerationTimer]:
    """``model.generate(**kwargs)`` with a GenerationTimer as its streamer; (output, timer)."""
    if "streamer" in generate_kwargs:
        raise ValueError("timed_generate supplies the streamer itself")
    timer = GenerationTimer().start()
    out = model.generate(**generate_kwargs, streamer=timer)
    return out, timer


def generation_metrics(timers: Sequence[GenerationTimer]) -> dict[str, dict[str, Any]]:
    """``ttft_s`` and ``tpot_s`` metric values over requests (mean + p50/p90/p99).

    TPOT excludes each request's first token (see the module docstring).
    """
    return request_latency_metrics(timers, "perf_counter_streamer")


def request_latency_metrics(requests: Sequence[Any], method: str) -> dict[str, dict[str, Any]]:
    """``ttft_s`` and ``tpot_s`` over requests that carry ``ttft_s``/``tpot_s`` attributes
    (streamer timers or a decode engine's timings), timed by ``method``."""
    ttft = [t.ttft_s for t in requests if t.ttft_s is not None]
    tpot = [t.tpot_s for t in requests if t.tpot_s is not None]
    out = {
        "ttft_s": latency_metric(ttft, method, what="first-token"),
        "tpot_s": latency_metric(tpot, method, what="multi-token (TPOT needs >= 2 tokens)"),
    }
    if out["tpot_s"]["value"] is not None:
        out["tpot_s"]["note"] = "excludes the first token of each request"
    return out
