"""Fill the corpus, tokenizer and token caches before a sweep's runs, in a process of its own.

Why: the first run of a study would otherwise train the tokenizer inside its own measured
process, and the memory that leaves behind (the Python heap grows and rarely shrinks) showed up in
that run's AMU alone, ranking one variant worst on memory for a cache reason. Usage, as the sweep
calls it: ``python -m effllm_helpers.data.warm '<DataSpec as JSON>' ...``.
"""

from __future__ import annotations

import json
import sys

from ..config import DataSpec
from .tokenizer import token_blocks


def warm(spec: DataSpec) -> None:
    """Build (or find) the tokenizer and both splits' token blocks of ``spec``."""
    for split in ("train", "val"):
        token_blocks(spec, split)


def main(argv: list[str] | None = None) -> int:
    for raw in (sys.argv[1:] if argv is None else argv):
        warm(DataSpec.model_validate(json.loads(raw)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
