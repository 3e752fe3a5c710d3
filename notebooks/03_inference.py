# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
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
# accuracy (paper Table 9, Fig. 5). Run by hand it serves the embedded tiny model.

# %% tags=["parameters"]
params = None        # resolved params (a sweep injects them); None = defaults under `preset`
preset = "tiny"      # ci | tiny | gpu | paper, used when params is None
study = None
run_id = None
seed = 0
output_dir = None    # None = outputs/runs/interactive/inference/<run_id>
point = None

# %%
import pandas as pd

from effllm_helpers.axes import inference
from effllm_helpers.run import start_run

ctx = start_run("inference", params=params, preset=preset, study=study, run_id=run_id,
                seed=seed, output_dir=output_dir, point=point)
ctx.params

# %% [markdown]
# ## Benchmark
# An unsupported combination (a dtype or kernel this device lacks) is recorded as a skip with its
# reason instead of crashing the sweep.

# %%
result = ctx.attempt(inference.run, ctx.params, seed=ctx.seed)
pd.DataFrame({**result.metrics, **result.quality}).T[["value", "unit", "method"]]

# %%
pd.DataFrame(result.per_batch_rows()).set_index("batch_size")[
    ["it", "al_s", "ttft_s", "tpot_s", "amu_gb", "j_per_token"]]

# %%
result.notes

# %% [markdown]
# ## Record

# %%
path = ctx.finish(metrics=result.metrics, quality=result.quality, model=result.model,
                  extra={"notes": result.notes, "per_batch": result.per_batch_rows()})
print("record written to", path)
