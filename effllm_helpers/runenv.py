"""What the sweep tells a run through its environment, and the progress bar that listens.

Import-light and at the bottom of the import graph: the measurement layer records the thread
count, the training loop draws the bar, the notebook side and the sweep set both.
"""

from __future__ import annotations

import os
from typing import Any

THREADS_ENV = "EFFLLM_THREADS"  # torch threads for this run, set by the sweep
BATCH_ENV = "EFFLLM_BATCH_RUN"  # set by the sweep's runner: nobody watches this notebook live
# "1": lm_eval_tasks may name task YAML files, whose ``!function`` imports and runs Python next
# to them; off, a params file stays data (task names from lm-eval's registry only). Set by
# ``effllm validate/sweep --allow-task-files``; the runs inherit it.
TASK_FILES_ENV = "EFFLLM_ALLOW_TASK_FILES"


def task_files_allowed() -> bool:
    """Whether this process was explicitly allowed to load lm-eval task files (see above)."""
    return os.environ.get(TASK_FILES_ENV) == "1"


def progress_bar(**kwargs: Any) -> Any:
    """A tqdm bar for long loops: a live widget in JupyterLab; in a sweep-executed notebook a
    plain text bar that prints every 30 s (papermill saves no widget state, and a bar that
    redraws every step fills the saved notebook with carriage returns)."""
    if os.environ.get(BATCH_ENV):
        from tqdm import tqdm

        return tqdm(mininterval=30.0, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


def is_main_rank() -> bool:
    """True outside a launch and on rank 0 of one: the launched ranks hold the same trained
    weights, and one of them writes them (N writers of one file could interleave)."""
    return int(os.environ.get("RANK", "0")) == 0


__all__ = ["BATCH_ENV", "TASK_FILES_ENV", "THREADS_ENV", "is_main_rank", "progress_bar",
           "task_files_allowed"]
