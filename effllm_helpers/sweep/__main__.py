"""``python -m effllm_helpers.sweep exec <run_dir>``: the runner as a fresh interpreter (internal:
used by the sweep where a forkserver is not allowed, e.g. inside a Dask worker)."""

import sys

from .runner import _main

if __name__ == "__main__":
    sys.exit(_main())
