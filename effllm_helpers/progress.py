"""Progress bars for long loops, quiet enough for a notebook a sweep executes unwatched."""

from __future__ import annotations

import os
from typing import Any

BATCH_ENV = "EFFLLM_BATCH_RUN"  # set by the sweep's runner: nobody watches this notebook live


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar for long loops: a live widget in JupyterLab; in a sweep-executed notebook a
    plain text bar that prints every 30 s (papermill saves no widget state, and a bar that
    redraws every step fills the saved notebook with carriage returns)."""
    if os.environ.get(BATCH_ENV):
        from tqdm import tqdm

        return tqdm(mininterval=30.0, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


__all__ = ["BATCH_ENV", "progress_bar"]
