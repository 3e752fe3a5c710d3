# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Axis 3 — inference precision and quantization
#
# One run = one model at one precision (fp32, bf16, fp16, int8 LLM.int8, int4 NF4/FP4): decode
# latency (TTFT, TPOT — which excludes the first token —, AL per request), IT, memory, energy and
# J/token per batch size, weight bytes and MCR against the baseline, held-out perplexity and task
# accuracy (paper Table 9, Fig. 5). Run by hand it serves the embedded tiny model, at fp32 on a
# CPU (bf16/fp16 are emulated there, so their timings would not describe the technique).

# %% tags=["parameters"]
# the main knobs; None = the preset's value (a sweep injects `params` and leaves these at None)
precision = None     # e.g. "fp32", "bf16", "int8", "int4-nf4", "int8-wo"; None = fp32 on a CPU
batch_sizes = None   # e.g. [1, 4, 16]
model = None         # "embedded@sft", a hub id like "HuggingFaceTB/SmolLM2-135M-Instruct", a folder
gen_tokens = None    # tokens generated per request, e.g. 64
# every other param, as a (partial) dict, e.g. {"lm_eval_tasks": ["arc_easy"], "prompt_len": 64}
params = None        # resolved params (a sweep injects them); None = defaults under `preset`
preset = "tiny"      # ci | tiny | gpu | paper, used when params is None
study = None
run_id = None
seed = 0
output_dir = None    # None = outputs/runs/interactive/inference/<run_id>
point = None

# %%
import pandas as pd

from effllm_helpers import notebook_view as view
from effllm_helpers.axes import inference
from effllm_helpers.report import figures
from effllm_helpers.run import start_run

params = view.with_knobs(params, {"precision": precision, "batch_sizes": batch_sizes,
                                  "model": model, "gen_tokens": gen_tokens})
params = view.cpu_precision_default(params)
ctx = start_run("inference", params=params, preset=preset, study=study, run_id=run_id,
                seed=seed, output_dir=output_dir, point=point)
ctx.params

# %% [markdown]
# ## Benchmark
# An unsupported combination (a dtype or kernel this device lacks) is recorded as a skip with its
# reason instead of crashing the sweep.

# %%
view.announce("inference", ctx.params)
result = ctx.attempt(inference.run, ctx.params, seed=ctx.seed)
view.show(view.metrics_table(result, "inference"))

# %% [markdown]
# ## Per batch size, against the baseline precision
# The baseline's curve is the newest recorded run of this model at the baseline precision (run
# the notebook once with `precision` set to it to draw one); when this run is the baseline, its
# own curve is the reference.

# %%
rows = result.per_batch_rows()
base = result.model["baseline_precision"]
base_rows = [] if base == ctx.params.precision else view.baseline_rows(ctx.params.model, base)
figures.show(view.per_batch_plot(
    rows, ctx.params.precision + (" (baseline)" if base == ctx.params.precision else ""),
    baseline=base_rows, baseline_label=f"{base} (baseline, recorded run)"))

# %%
pd.DataFrame(rows).set_index("batch_size")[
    ["it", "al_s", "ttft_s", "tpot_s", "amu_gb", "j_per_token"]]

# %%
result.notes

# %% [markdown]
# ## Record

# %%
path = ctx.finish(metrics=result.metrics, quality=result.quality, model=result.model,
                  extra={"notes": result.notes, "per_batch": result.per_batch_rows()})
print("record written to", path)
