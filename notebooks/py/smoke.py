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
# # Smoke run: params → papermill → Meter → record
#
# A timed matmul loop that proves the pipe end to end. The sweep injects the resolved `params`;
# run by hand it uses the `tiny` preset. The logic lives in `effllm_helpers.smoke`.

# %% tags=["parameters"]
params = None        # resolved params (a sweep injects them); None = defaults under `preset`
preset = "tiny"      # ci | tiny | gpu | paper, used when params is None
study = None
run_id = None
seed = 0
output_dir = None    # None = outputs/runs/interactive/smoke/<run_id>
point = None

# %%
import pandas as pd
import torch

from effllm_helpers import smoke
from effllm_helpers.run import start_run

ctx = start_run("smoke", params=params, preset=preset, study=study, run_id=run_id, seed=seed,
                output_dir=output_dir, point=point)
device = "cuda" if torch.cuda.is_available() else "cpu"
ctx.params

# %%
out = smoke.matmul_workload(ctx.params, device=device)
pd.DataFrame(out["metrics"]).T[["value", "unit", "method"]]

# %%
path = ctx.finish(metrics=out["metrics"], curves=out["curves"],
                  model={"params_total": ctx.params.n ** 2})
print("record written to", path)
