"""Technique registries: fine-tuning methods (``finetuning``), inference precisions (``precision``).

The shared exception lives here, import-light, so notebooks can catch it without importing peft or
bitsandbytes first.
"""

from __future__ import annotations


class UnsupportedTechnique(RuntimeError):
    """This machine (device, library build) cannot run the technique; a run records it as a skip.

    Distinct from ``ValueError``, which means the *configuration* is wrong everywhere.
    """


__all__ = ["UnsupportedTechnique"]
