"""Model zoo: build a Hugging Face causal LM for any study spec, count its parameters.

Importing this package registers our decoder (``model_type="effllm_decoder"``) with
``AutoConfig`` / ``AutoModelForCausalLM`` so saved runs reload with ``from_pretrained``.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from . import flops
from .decoder import EffllmConfig, EffllmDecoderForCausalLM
from .flops import flops_per_token, kv_cache_bytes_per_token
from .mamba import EffllmMambaConfig, EffllmMambaForCausalLM, build_mamba  # registers on import
from .zoo import build, count_params

__all__ = ["build", "build_mamba", "count_params", "flops", "flops_per_token",
           "kv_cache_bytes_per_token", "register", "EffllmConfig", "EffllmDecoderForCausalLM",
           "EffllmMambaConfig", "EffllmMambaForCausalLM"]


def register() -> None:
    """Register our custom config/model with the Auto classes (idempotent)."""
    AutoConfig.register(EffllmConfig.model_type, EffllmConfig, exist_ok=True)
    AutoModelForCausalLM.register(EffllmConfig, EffllmDecoderForCausalLM, exist_ok=True)


register()
