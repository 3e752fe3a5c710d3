"""Params files: valid ones expand into runs; bad ones fail before compute, naming key and value."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from effllm_helpers import config, studies

GOOD = """
study: t
axis: finetuning
notebook: notebooks/02_finetuning.ipynb
base: {rank: 8}
grid:
  method: [lora, dora]
  task: [arithmetic, docname]
seeds: [0, 1]
weights: {quality: 2, al_s: 1}
"""


def write(tmp_path: Path, text: str, name: str = "study.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def test_grid_expands_to_cartesian_product_times_seeds(tmp_path):
    runs = studies.expand(write(tmp_path, GOOD), preset="ci")
    assert len(runs) == 2 * 2 * 2
    assert {(r.params["method"], r.params["task"], r.seed) for r in runs} == {
        (m, t, s) for m in ("lora", "dora") for t in ("arithmetic", "docname") for s in (0, 1)}


def test_run_id_is_stable_and_distinct(tmp_path):
    a = studies.expand(write(tmp_path, GOOD), preset="ci")
    b = studies.expand(write(tmp_path, GOOD), preset="ci")
    assert [r.run_id for r in a] == [r.run_id for r in b]
    assert len({r.run_id for r in a}) == len(a)


def test_preset_overlays_base_and_grid_overlays_preset(tmp_path):
    text = GOOD.replace("base: {rank: 8}", "base: {rank: 8, n_train: 999}")
    runs = studies.expand(write(tmp_path, text), preset="ci")
    assert runs[0].params["rank"] == 4  # ci preset sets rank 4 over the base's 8
    assert runs[0].params["n_train"] == 64
    assert {r.params["method"] for r in runs} == {"lora", "dora"}
    # a grid key the ci preset sets too: the grid point wins
    grid = text.replace("  task: [arithmetic, docname]\n", "  task: [arithmetic, docname]\n"
                        "  rank: [32]\n")
    runs = studies.expand(write(tmp_path, grid, "grid.yaml"), preset="ci")
    assert {r.params["rank"] for r in runs} == {32}


def test_run_id_is_pinned_across_interpreters_and_versions():
    """Records are matched to runs by id: the hash of a fixed run must never drift."""
    params = {"n": 64, "steps": 5, "measure": {"warmup_steps": 1, "repeats": 1}}
    assert studies.run_id_for("golden", "smoke", "notebooks/smoke.ipynb", params, 0) == \
        "b36fd42797df"
    # key order does not matter
    shuffled = {"measure": {"repeats": 1, "warmup_steps": 1}, "steps": 5, "n": 64}
    assert studies.run_id_for("golden", "smoke", "notebooks/smoke.ipynb", shuffled, 0) == \
        "b36fd42797df"


def test_run_id_changes_with_preset(tmp_path):
    path = write(tmp_path, GOOD)
    ci = {r.run_id for r in studies.expand(path, preset="ci")}
    tiny = {r.run_id for r in studies.expand(path, preset="tiny")}
    assert not ci & tiny


def test_every_committed_study_file_validates_under_every_preset():
    files = sorted(config.PARAMS_DIR.glob("**/*.yaml"))
    files = [f for f in files if f.parent.name != "presets"]
    assert files, "no study files found"
    for f in files:
        for preset in config.available_presets():
            assert studies.expand(f, preset), f


def test_paper_preset_has_qwen25_dimensions():
    sizes = config.resolve_params("architecture", config.load_preset("paper", "architecture"))
    assert sizes["sizes"]["small"]["d_model"] == 896
    assert sizes["sizes"]["medium"] == {"d_model": 1536, "n_layers": 28, "n_heads": 12,
                                        "n_kv_heads": 2, "d_ff": 8960, "max_seq_len": 8192}


# ---------------------------------------------------------------- bad inputs
BAD = {
    "unknown top-level key": (GOOD + "colour: blue\n", "colour: unknown key"),
    "misspelt technique": (GOOD.replace("[lora, dora]", "[lora, dorra]"),
                           "method: Value error, unknown fine-tuning method"),
    "wrong type": (GOOD.replace("rank: 8", "rank: eight"), "rank: Input should be a valid "
                                                             "integer"),
    "rank zero": (GOOD.replace("rank: 8", "rank: 0"), "rank: Input should be greater than 0"),
    "negative steps": (GOOD.replace("base: {rank: 8}", "base: {train: {steps: -5}}"),
                       "train.steps: Input should be greater than 0"),
    "empty grid": (GOOD.replace("  method: [lora, dora]\n  task: [arithmetic, docname]\n", "")
                   .replace("grid:\n", "grid: {}\n"), "grid: Value error, grid is empty"),
    "grid key with no choices": (GOOD.replace("[lora, dora]", "[]"), "has no choices"),
    "missing notebook": (GOOD.replace("notebooks/02_finetuning.ipynb", "notebooks/nope.ipynb"),
                         "no such notebook"),
    "malformed YAML": (GOOD.replace("grid:", "grid: [unclosed"), "malformed YAML"),
    "duplicate keys": (GOOD + "seeds: [3]\n", "duplicate key 'seeds'"),
    "unknown axis": (GOOD.replace("axis: finetuning", "axis: chemistry"), "axis: Input should be"),
    "missing required key": (GOOD.replace("notebook: notebooks/02_finetuning.ipynb\n", ""),
                             "notebook: Field required"),
    "unknown grid key": (GOOD.replace("task: [arithmetic, docname]",
                                      "tsak: [arithmetic, docname]"),
                         "grid.tsak: unknown key 'tsak'"),
    "unknown nested key": (GOOD.replace("base: {rank: 8}", "base: {train: {stpes: 3}}"),
                           "train.stpes: unknown key"),
    "negative weight": (GOOD.replace("quality: 2", "quality: -2"),
                        "weights.quality: Input should be greater than or equal to 0"),
    "unknown weight metric": (GOOD.replace("quality: 2", "qualty: 2"),
                              "unknown metric 'qualty' in weights"),
    "dropout above one": (GOOD.replace("rank: 8", "dropout: 1.5"),
                          "dropout: Input should be less than or equal to 1"),
    "empty seeds": (GOOD.replace("seeds: [0, 1]", "seeds: []"), "needs at least one seed"),
    "top level not a mapping": ("- just\n- a list\n", "top level must be a mapping"),
    "python tag is not executed": (GOOD + "evil: !!python/object/apply:os.system ['echo hi']\n",
                                   "malformed YAML"),
    "bad study name": (GOOD.replace("study: t", "study: 'a b/c'"), "study: String should match"),
    "bad corpus scheme": (GOOD.replace("axis: finetuning", "axis: architecture")
                          .replace("02_finetuning", "01_architecture")
                          .replace("base: {rank: 8}", "base: {data: {corpus: 'ftp:x'}}")
                          .replace("  method: [lora, dora]\n  task: [arithmetic, docname]\n",
                                   "  model.attention: [mha]\n"),
                          "data.corpus: Value error, must be 'stdlib'"),
    "size not in sizes": (GOOD.replace("axis: finetuning", "axis: architecture")
                          .replace("02_finetuning", "01_architecture")
                          .replace("base: {rank: 8}", "base: {}")
                          .replace("  method: [lora, dora]\n  task: [arithmetic, docname]\n",
                                   "  model.size: [huge]\n"),
                          "model.size 'huge' is neither one of the sizes"),
    "precision misspelt": (GOOD.replace("axis: finetuning", "axis: inference")
                           .replace("02_finetuning", "03_inference")
                           .replace("base: {rank: 8}", "base: {}")
                           .replace("  method: [lora, dora]\n  task: [arithmetic, docname]\n",
                                    "  precision: [bf16, int3]\n"),
                           "precision: Input should be 'fp32', 'bf16'"),
    "notebook of another axis": (GOOD.replace("02_finetuning", "03_inference"),
                                 "notebook: 'notebooks/03_inference.ipynb' is the inference "
                                 "notebook, not one for axis 'finetuning'; allowed for "
                                 "finetuning: notebooks/02_finetuning.ipynb"),
    "infinite timeout": (GOOD + "timeout_s: .inf\n", "timeout_s: Input should be a finite"),
    "nan float param": (GOOD.replace("rank: 8", "alpha: .nan"), "Input should be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_params_file_fails_before_compute_with_clear_message(tmp_path, case):
    text, expected = BAD[case]
    path = write(tmp_path, text)
    with pytest.raises(config.ParamsError) as err:
        studies.expand(path, preset="ci")
    msg = str(err.value)
    assert expected in msg, msg
    assert str(path) in msg or "preset" in msg, msg


def test_unknown_preset_lists_the_allowed_ones(tmp_path):
    with pytest.raises(config.ParamsError, match=r"unknown preset 'huge'; allowed: ci, gpu, "
                                                  r"paper, tiny"):
        studies.expand(write(tmp_path, GOOD), preset="huge")


def test_missing_params_file(tmp_path):
    with pytest.raises(config.ParamsError, match="no such params file"):
        studies.expand(tmp_path / "absent.yaml")


def test_bad_value_is_quoted_in_the_message(tmp_path):
    with pytest.raises(config.ParamsError, match=r'\(got "dorra"\)'):
        studies.expand(write(tmp_path, GOOD.replace("[lora, dora]", "[lora, dorra]")))


def test_python_tag_in_yaml_does_not_execute(tmp_path):
    marker = tmp_path / "pwned"
    text = GOOD + f"evil: !!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(config.ParamsError):
        studies.expand(write(tmp_path, text))
    assert not marker.exists()


def test_only_keeps_matching_grid_points_and_their_run_ids(tmp_path):
    path = write(tmp_path, GOOD)
    full = studies.expand(path, preset="ci")
    part = studies.expand(path, preset="ci", only=studies.parse_only(["method=dora"]))
    assert {r.params["method"] for r in part} == {"dora"}
    assert len(part) == 4
    assert {r.run_id for r in part} <= {r.run_id for r in full}


def test_only_with_several_keys_and_values_intersects(tmp_path):
    only = studies.parse_only(["method=lora,dora", "task=docname"])
    runs = studies.expand(write(tmp_path, GOOD), preset="ci", only=only)
    assert {(r.params["method"], r.params["task"]) for r in runs} == {
        ("lora", "docname"), ("dora", "docname")}


def test_only_unknown_grid_key_names_the_allowed_keys(tmp_path):
    with pytest.raises(config.ParamsError, match=r"--only rank: not a grid key.*method, task"):
        studies.expand(write(tmp_path, GOOD), preset="ci", only=studies.parse_only(["rank=8"]))


def test_only_value_outside_the_grid_names_the_allowed_values(tmp_path):
    with pytest.raises(config.ParamsError, match=r"method='pissa'.*allowed: lora, dora"):
        studies.expand(write(tmp_path, GOOD), preset="ci",
                       only=studies.parse_only(["method=pissa"]))


def test_only_without_a_value_is_rejected():
    with pytest.raises(config.ParamsError, match="GRIDKEY=VALUE"):
        studies.parse_only(["method="])


def test_non_utf8_params_file_is_a_params_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(GOOD.replace("study: t", "study: t\ndescription: caf\xe9").encode("latin-1"))
    with pytest.raises(config.ParamsError, match=r"latin1\.yaml: not UTF-8"):
        studies.expand(path)


def test_infinite_or_nan_timeout_override_is_rejected():
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(config.ParamsError, match="--timeout: must be a finite number"):
            studies.check_timeout(bad)
    assert studies.check_timeout(5.0) == 5.0 and studies.check_timeout(None) is None


def test_only_that_selects_nothing_is_an_error(tmp_path):
    # --set of a grid key relabels every point, so --only on that key cannot match any
    with pytest.raises(config.ParamsError, match=r"--only method=lora selects no runs"):
        studies.expand(write(tmp_path, GOOD), preset="ci",
                      overrides=studies.parse_overrides(["method=dora"]),
                      only=studies.parse_only(["method=lora"]))


def test_notebook_params_layers_partial_params_over_the_preset():
    p = config.notebook_params("finetuning", "ci", {"method": "dora"})
    assert p.method == "dora"
    assert p.rank == 4 and p.n_train == 64  # from the ci preset, not the schema defaults
    # a sweep injects full resolved params with preset=None: used as they are
    full = config.resolve_params("finetuning", config.load_preset("ci", "finetuning"),
                                 {"rank": 16})
    assert config.notebook_params("finetuning", None, full).model_dump(mode="json") == full


@pytest.mark.parametrize("corpus", ["text:", "hf:", "jsonl: "])
def test_corpus_source_without_its_argument_is_rejected(corpus):
    with pytest.raises(ValueError, match="'text:<path>'"):
        config.DataSpec(corpus=corpus)


def test_seeds_option_replaces_the_study_seeds_and_keeps_run_ids(tmp_path):
    path = write(tmp_path, GOOD)
    study_runs = {(r.params["method"], r.params["task"], r.seed): r.run_id
                  for r in studies.expand(path, preset="ci")}
    runs = studies.expand(path, preset="ci", only={"method": ["lora"]},
                         seeds=studies.parse_seeds("0,1,2"))
    assert sorted({r.seed for r in runs}) == [0, 1, 2] and len(runs) == 2 * 3
    for r in runs:  # seeds the study has keep their ids: a sweep resumes onto their records
        key = (r.params["method"], r.params["task"], r.seed)
        assert r.seed == 2 or study_runs[key] == r.run_id
    assert studies.parse_seeds(None) is None


@pytest.mark.parametrize("text", ["", "a", "1,1", "-1", "0,,x", "1,,2", "4294967296"])
def test_bad_seeds_are_refused_with_the_form_to_use(text):
    with pytest.raises(config.ParamsError, match="--seeds .*e.g. --seeds 0,1,2"):
        studies.parse_seeds(text)


@pytest.mark.parametrize("task", ["arithmetic:easy", "arithmetic:medium", "arithmetic:hard"])
def test_arithmetic_levels_are_valid_tasks(tmp_path, task):
    runs = studies.expand(write(tmp_path, GOOD.replace("[arithmetic, docname]", f"[{task}]")),
                         preset="ci")
    assert {r.params["task"] for r in runs} == {task}
    with pytest.raises(config.ParamsError, match="arithmetic"):
        studies.expand(write(tmp_path, GOOD.replace("[arithmetic, docname]", "[arithmetic:x]"),
                            "bad.yaml"), preset="ci")


def test_a_study_adjusts_a_named_preset_over_the_preset(tmp_path):
    text = GOOD + "per_preset:\n  tiny: {max_len: 77}\n"
    runs = studies.expand(write(tmp_path, text), preset="tiny")
    assert {r.params["max_len"] for r in runs} == {77}
    ci = studies.expand(write(tmp_path, text), preset="ci")
    assert 77 not in {r.params["max_len"] for r in ci}  # only the preset it names


def test_per_preset_names_a_preset_that_exists(tmp_path):
    with pytest.raises(config.ParamsError, match="per_preset: unknown preset 'gpuu'; allowed: ci"):
        studies.expand(write(tmp_path, GOOD + "per_preset:\n  gpuu: {max_len: 77}\n"), "ci")
