"""The errors a run can end with on purpose, in one import-light hierarchy.

``SkipRun`` means *this machine* cannot run the technique (the sweep records a skip, not a
crash); ``UnsupportedTechnique`` is the technique registries' flavour of it, so an axis lets it
propagate without translating. ``DivergedError`` is a non-finite training loss (a failed run of
kind ``diverged``). ``ValueError`` stays what it is: a configuration that is wrong everywhere.
"""

from __future__ import annotations

import math


class SkipRun(RuntimeError):
    """This technique cannot run here (e.g. int4 kernels on a CPU): recorded as skipped."""


class UnsupportedTechnique(SkipRun):
    """This machine (device, library build) cannot run the technique; a run records it as a skip.

    Distinct from ``ValueError``, which means the *configuration* is wrong everywhere.
    """


class DivergedError(RuntimeError):
    """Training produced a non-finite loss; the run is recorded as failed ('diverged')."""


def check_finite(loss: float, step: int) -> None:
    """Raise DivergedError on a NaN or infinite loss, so a sweep records it and moves on."""
    if not math.isfinite(loss):
        raise DivergedError(f"loss is {loss} at step {step}")


__all__ = ["DivergedError", "SkipRun", "UnsupportedTechnique", "check_finite"]
