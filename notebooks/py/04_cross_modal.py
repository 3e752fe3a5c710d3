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
# # Axis 4 — cross-modal transfer
#
# Do the text techniques transfer to images? One run is either a class-conditional DiT with one
# attention variant (MHA/MQA/GQA/MLA) and FFN (dense/MoE), trained and sampled under the Meter
# and scored by a Fréchet distance in a small CNN classifier's feature space (not FID) and that
# classifier's accuracy on the samples; or one fine-tuning method adapting a ViT classifier, a
# tiny LLaVA-style VLM or the DiT to inverted digits, with quality before and after. Run by hand
# it trains the tiny MHA DiT on the built-in digits.

# %% tags=["parameters"]
params = None        # resolved params (a sweep injects them); None = defaults under `preset`
preset = "tiny"      # ci | tiny | gpu | paper, used when params is None
study = None
run_id = None
seed = 0
output_dir = None    # None = outputs/runs/interactive/cross_modal/<run_id>
point = None

# %%
import pandas as pd

from effllm_helpers.axes import cross_modal
from effllm_helpers.report import figures
from effllm_helpers.run import start_run

ctx = start_run("cross_modal", params=params, preset=preset, study=study, run_id=run_id,
                seed=seed, output_dir=output_dir, point=point)
ctx.params

# %% [markdown]
# ## Train, sample and measure
# A technique this machine cannot run is recorded as a skip with its reason.

# %%
result = ctx.attempt(cross_modal.run, ctx.params, seed=ctx.seed)
pd.DataFrame({**result.metrics, **result.quality}).T[["value", "unit", "method"]]

# %%
figures.show(figures.run_curves(result.curves, title=f"{ctx.params.experiment} on "
                                                     f"{ctx.params.data}"))

# %% [markdown]
# ## Record

# %%
path = ctx.finish(metrics=result.metrics, quality=result.quality, curves=result.curves,
                  model=result.model, extra={"notes": result.notes})
print("record written to", path)
