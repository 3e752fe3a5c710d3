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
# # Axis 1 — architecture pretraining
#
# One run = one architecture choice (attention, positional encoding, FFN, family) at one size,
# pretrained on the same token budget and scored with the six metrics plus held-out perplexity
# and the associative-recall probe (paper Tables 3–6, Fig. 3). The sweep injects `params`; run by
# hand, the defaults train the tiny GQA model on the built-in `stdlib` corpus.

# %% tags=["parameters"]
# the main knobs; None = the preset's value (a sweep injects `params` and leaves these at None)
attention = None     # e.g. "mha", "mqa", "gqa", "mla", "nsa"
positional = None    # "rope", "sinusoidal", "learned", "relative", "none"
ffn = None           # "dense" or "moe"
size = None          # e.g. "small", "medium" (the preset's `sizes`)
steps = None         # pretraining steps, e.g. 100
# every other param, as a (partial) dict, e.g. {"model": {"family": "mamba"}, "train": {"lr": 3e-4}}
params = None        # resolved params (a sweep injects them); None = defaults under `preset`
preset = "tiny"      # ci | tiny | gpu | paper, used when params is None
study = None
run_id = None
seed = 0
output_dir = None    # None = outputs/runs/interactive/architecture/<run_id>
point = None

# %%
from effllm_helpers import notebook_view as view
from effllm_helpers.axes import architecture
from effllm_helpers.launch import run_point
from effllm_helpers.paths import outputs_dir
from effllm_helpers.report import figures
from effllm_helpers.run import start_run

params = view.with_knobs(params, {"model.attention": attention, "model.positional": positional,
                                  "model.ffn": ffn, "model.size": size, "train.steps": steps})
ctx = start_run("architecture", params=params, preset=preset, study=study, run_id=run_id,
                seed=seed, output_dir=output_dir, point=point)
ctx.params.model

# %% [markdown]
# ## Train and measure

# %%
view.announce("architecture", ctx.params)
save_dir = outputs_dir("models", ctx.run_id) if ctx.params.save_model else None
# launch: {processes: N, strategy: ddp|fsdp} in params runs this point on N GPUs (DDP/FSDP)
result = run_point(architecture.run, ctx.params, seed=ctx.seed, save_dir=save_dir)
view.show(view.metrics_table(result, "architecture"))

# %%
figures.show(figures.run_curves(
    result.curves, title=f"{ctx.params.model.attention} {ctx.params.model.size}"))

# %% [markdown]
# ## Record

# %%
path = ctx.finish(metrics=result.metrics, quality=result.quality, curves=result.curves,
                  model=result.model, extra={"model_dir": result.model_dir})
print("record written to", path)
