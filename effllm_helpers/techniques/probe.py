"""The small layer every precision probe runs: fixed weights, a fixed input, one error measure.

A probe quantises this layer with the library under test and compares its output with the float
layer's, on the device the run will use. Weights and input are ramps (no random draws), and the
layer is built inside ``fork_rng``: probes run once per process, so touching the caller's random
stream would make seeded runs depend on which precision ran first.
"""

from __future__ import annotations

import torch
from torch import nn


def reference_linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free fp32 linear on the CPU with fixed weights (``0.1 * sin`` of a ramp)."""
    with torch.random.fork_rng(devices=[]):
        ref = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        ramp = torch.linspace(-3, 3, out_features * in_features)
        ref.weight.copy_(ramp.sin().reshape(out_features, in_features) * 0.1)
    return ref


def probe_input(rows: int, in_features: int, device: torch.device | str,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``rows`` inputs of width ``in_features``: a ramp over [-1, 1]."""
    return torch.linspace(-1, 1, rows * in_features, device=device).reshape(
        rows, in_features).to(dtype)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    out, ref = out.float(), ref.float()
    return float((out - ref).norm() / ref.norm())
