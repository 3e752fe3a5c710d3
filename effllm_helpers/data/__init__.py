"""Data for every axis: corpora, tokenizer and packing, fine-tuning task suites, the MQAR probe.

Everything works offline: the default corpus is the interpreter's standard library, the built-in
tasks are generated or mined locally, and real sets load from local disk through ``datasets``.
"""

from effllm_helpers.data.corpus import Corpus, load_corpus, stdlib_files
from effllm_helpers.data.probe import Probe, make_probe, probe_accuracy, probe_ids_in_range
from effllm_helpers.data.tasks import (
    PROMPT_TEMPLATE,
    STOP_STRINGS,
    TaskData,
    detect_format,
    extract_answer,
    format_prompt,
    load_task,
    pad_id,
    prompt_style,
    response_end,
    score,
    sft_rows,
    sft_tensors,
)
from effllm_helpers.data.tokenizer import EOS, get_tokenizer, pack, token_blocks

__all__ = [
    "EOS",
    "PROMPT_TEMPLATE",
    "STOP_STRINGS",
    "Corpus",
    "Probe",
    "TaskData",
    "detect_format",
    "extract_answer",
    "format_prompt",
    "prompt_style",
    "response_end",
    "get_tokenizer",
    "load_corpus",
    "load_task",
    "pad_id",
    "sft_rows",
    "make_probe",
    "pack",
    "probe_accuracy",
    "probe_ids_in_range",
    "score",
    "sft_tensors",
    "stdlib_files",
    "token_blocks",
]
