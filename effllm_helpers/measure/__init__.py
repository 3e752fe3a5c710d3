"""The six metrics of the EfficientLLM study, measured one way for every axis.

``Meter`` is the entry point; the submodules hold the pieces (sampler, memory, compute, latency,
energy, compression, stats, device) so that each can be tested and reused on its own.
"""

from effllm_helpers.measure.compression import compression_metrics, mcr, mcr_nominal, weight_bytes
from effllm_helpers.measure.compute import PEAK_TFLOPS, calibrate_matmul, peak_flops
from effllm_helpers.measure.device import device_facts
from effllm_helpers.measure.latency import (
    GenerationTimer,
    generation_metrics,
    latency_metric,
    percentile,
    timed_generate,
)
from effllm_helpers.measure.meter import METRIC_KEYS, Meter
from effllm_helpers.measure.sampler import Sampler
from effllm_helpers.measure.stats import summarize

__all__ = [
    "METRIC_KEYS", "PEAK_TFLOPS", "GenerationTimer", "Meter", "Sampler", "calibrate_matmul",
    "compression_metrics", "device_facts", "generation_metrics", "latency_metric", "mcr",
    "mcr_nominal", "peak_flops", "percentile", "summarize", "timed_generate",
    "weight_bytes",
]
