# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py//py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Summary — the paper's figures, rankings, Pareto fronts and a leaderboard
#
# Reads every `record.json` under `results_dir` (nothing is re-run), writes the tidy table, draws
# the paper-style figures (Fig. 2 rank table, Fig. 3a–c architecture, Fig. 4a–b PEFT, Fig. 5
# precision) and ours (Pareto fronts, loss vs tokens and vs joules, error bars from repeats) as
# PNG + PDF, and a self-contained HTML leaderboard. `effllm report` executes it with papermill.

# %% tags=["parameters"]
results_dir = "../outputs/runs"   # folder searched recursively for record.json
output_dir = "../outputs"         # figures/, results/ and leaderboard.html go here

# %%
from pathlib import Path

from IPython.display import Image, display

from effllm_helpers import results
from effllm_helpers.report import figures, leaderboard, scoring

out = Path(output_dir)
tidy = results.collect(results_dir)
results.write_tidy(tidy, out / "results")
results.run_counts(tidy)

# %% [markdown]
# ## Rankings (Fig. 2) and efficiency scores

# %%
ranks = scoring.rank_table(tidy)
ranks.to_csv(out / "results" / "rank_table.csv", index=False)
ranks

# %%
html, csvs = leaderboard.write_leaderboard(tidy, out / "leaderboard.html", out / "results")
print("leaderboard:", html)

# %% [markdown]
# ## Figures

# %%
paths = figures.draw_all(tidy, results_dir, out / "figures")
for p in paths:
    if p.suffix == ".png":
        print(p.name)
        display(Image(filename=str(p)))

# %% [markdown]
# ## The paper's claims on this hardware
#
# Each claim of EfficientLLM beside what these records measured, judged by the rule written next
# to it: holds, does not hold, or not measured here (and why). Rebuilt from whatever records
# exist; `run_ids` names the runs each row used.

# %%
from effllm_helpers.report import claims

claim_table = claims.claims_table(tidy)
results.write_csv(claim_table, out / "results" / "claims.csv")
claim_table.drop(columns=["run_ids", "id"])

# %% [markdown]
# ## Where does a technique start to pay?
#
# Each technique's efficiency as a ratio to its peer on the same model (int4-wo / bf16 TPOT,
# LoRA / full s/step, MoE / dense peak memory, ...) against model size, with the crossover
# (ratio = 1) marked or "no crossover up to N B". Sweep `params/scaling/*.yaml` on a GPU for
# the sizes where it appears; a study of one size gives one point per pair.

# %%
from effllm_helpers.report import scaling

crossovers = scaling.table(tidy)
results.write_csv(crossovers, out / "results" / "crossovers.csv")
for p in scaling.draw(tidy, out / "figures"):
    if p.suffix == ".png":
        display(Image(filename=str(p)))
crossovers

# %% [markdown]
# ## Which technique should I use?
#
# `effllm recommend` on these records: per device and model size, the best quality among the
# Pareto-optimal inference precisions, and why (add constraints such as `max_memory_gb=1.0`,
# `max_tpot_ms=10`; `effllm recommend --help` lists them).

# %%
from effllm_helpers.report import recommend

try:
    for choice in recommend.recommend(tidy, "inference"):
        print(recommend.format_choice(choice), end="\n\n")
except recommend.RecommendError as exc:  # e.g. no inference runs in these records
    print(f"no recommendation: {exc}")
