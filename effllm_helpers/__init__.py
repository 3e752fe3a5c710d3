"""effllm: measure what LLM efficiency techniques cost and buy, in the EfficientLLM study's metrics.

Notebooks in ``notebooks/`` are thin; the logic they run lives here, one module per study concept.
"""

__version__ = "0.1.0"
