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
# # Axis 2 — fine-tuning methods
#
# One run = one adaptation method (LoRA, LoRA+, RSLoRA, DoRA, PiSSA, Freeze, full, or any peft
# method by name; optionally on a 4-bit QLoRA base) on one base model and task suite, scored with
# memory, utilisation, latency, ST, energy, eval loss and exact-match accuracy (paper Tables 7–8,
# Fig. 4). Run by hand it fine-tunes the embedded tiny model (built on first use) with LoRA.

# %% tags=["parameters"]
# the main knobs; None = the preset's value (a sweep injects `params` and leaves these at None)
method = None        # e.g. "lora", "lora_plus", "rslora", "dora", "pissa", "freeze", "full"
rank = None          # adapter rank, e.g. 16
quant = None         # "none", or "nf4"/"fp4" for a 4-bit QLoRA base (needs CUDA)
base_model = None    # "embedded", a hub id like "HuggingFaceTB/SmolLM2-135M-Instruct", or a folder
steps = None         # fine-tuning steps, e.g. 100
# every other param, as a (partial) dict, e.g. {"task": "docname", "train": {"lr": 2e-4}}
params = None        # resolved params (a sweep injects them); None = defaults under `preset`
preset = "tiny"      # ci | tiny | gpu | paper, used when params is None
study = None
run_id = None
seed = 0
output_dir = None    # None = outputs/runs/interactive/finetuning/<run_id>
point = None

# %%
import pandas as pd

from effllm_helpers import notebook_view as view
from effllm_helpers.axes import finetuning
from effllm_helpers.launch import run_point
from effllm_helpers.report import figures
from effllm_helpers.run import start_run

params = view.with_knobs(params, {"method": method, "rank": rank, "quant": quant,
                                  "base_model": base_model, "train.steps": steps})
ctx = start_run("finetuning", params=params, preset=preset, study=study, run_id=run_id,
                seed=seed, output_dir=output_dir, point=point)
ctx.params

# %% [markdown]
# ## Fine-tune and measure
# A technique this machine cannot run (e.g. QLoRA's 4-bit kernels without CUDA) is recorded as a
# skip with its reason.

# %%
view.announce("finetuning", ctx.params)
# launch: {processes: N, strategy: ddp|fsdp} in params runs this point on N GPUs (DDP/FSDP)
result = ctx.attempt(run_point, finetuning.run, ctx.params, seed=ctx.seed)
view.show(view.metrics_table(result, "finetuning"))

# %%
pd.DataFrame(result.examples)

# %%
figures.show(figures.run_curves(result.curves,
                                 title=f"{ctx.params.method} on {ctx.params.task}"))

# %% [markdown]
# ## Record

# %%
path = ctx.finish(metrics=result.metrics, quality=result.quality, curves=result.curves,
                  model=result.model, extra={"notes": result.notes, "examples": result.examples})
print("record written to", path)
