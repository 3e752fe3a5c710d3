"""Technique registries: fine-tuning methods (``finetuning``), inference precisions (``precision``).

Their "cannot run on this machine" error is :class:`effllm_helpers.errors.UnsupportedTechnique`.
"""

from __future__ import annotations
