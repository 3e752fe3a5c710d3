"""Axis 4 (cross-modal): image sources, runs and their records, the cached bases, figures (the
models, quality and fine-tuning door are tested in test_vision.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from effllm_helpers.axes import cross_modal as xm
from effllm_helpers.config import CrossModalParams, notebook_params
from effllm_helpers.data.images import load_images

SIX = ("amu_gb", "pcu", "mfu", "al_s", "tt", "st", "aec_w", "mcr")


def _params(**over) -> CrossModalParams:
    return CrossModalParams(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, image_size=8,
                            patch=2, **over)


def test_digits_are_read_from_the_cache_without_scikit_learn(tmp_path, monkeypatch) -> None:
    # a GPU host given the cache needs no scikit-learn/SciPy (too large to carry)
    import sys

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    first = load_images("digits", 8, seed=0)
    assert (tmp_path / "images" / "sklearn-digits.npz").exists()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # any import of it now fails
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    again = load_images("digits", 8, seed=0)
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.val_y, again.val_y)
    assert again.classes == [str(c) for c in range(10)]


def test_digits_source_is_16px_in_unit_range_with_a_deterministic_split() -> None:
    a, b = load_images("digits", 16, seed=0), load_images("digits", 16, seed=0)
    assert a.train_x.shape[1:] == (1, 16, 16) and a.n_classes == 10
    assert a.train_x.shape[0] + a.val_x.shape[0] == 1797
    assert a.train_x.min() >= -1 and a.train_x.max() <= 1
    assert torch.equal(a.val_y, b.val_y) and a.fingerprint == b.fingerprint


def test_folder_source_reads_class_subfolders_of_pngs(tmp_path) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.fromarray(np.full((10, 10), 40 * i, np.uint8)).save(tmp_path / c / f"{i}.png")
    d = load_images(f"folder:{tmp_path}", 8, val_fraction=0.34)
    assert d.classes == ["cat", "dog"]
    assert d.train_x.shape[1:] == (1, 8, 8)
    assert d.train_x.shape[0] + d.val_x.shape[0] == 6
    assert sorted(torch.cat([d.train_y, d.val_y]).tolist()) == [0, 0, 0, 1, 1, 1]


def test_hf_source_reads_a_saved_dataset_with_image_and_label_columns(tmp_path) -> None:
    import datasets
    from PIL import Image

    imgs = [Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)) for i in range(4)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "label": [0, 1, 0, 1]},
        features=datasets.Features({"image": datasets.Image(),
                                    "label": datasets.ClassLabel(names=["a", "b"])}))
    ds.save_to_disk(str(tmp_path / "ds"))
    d = load_images(f"hf:{tmp_path / 'ds'}", 8, val_fraction=0.25)
    assert d.classes == ["a", "b"] and d.channels == 3
    assert d.train_x.shape == (3, 3, 8, 8)


def test_unknown_source_and_attention_are_rejected() -> None:
    with pytest.raises(ValueError, match="digits"):
        load_images("mnist", 16)
    with pytest.raises(ValueError):
        CrossModalParams(attention="nsa")
    with pytest.raises(ValueError):
        CrossModalParams(data="nowhere")


@pytest.mark.slow
@pytest.mark.parametrize("study,only,expected", [
    # a cross-section of each grid keeps make test short: every attention and FFN kind of the
    # DiT, every target with an adapter and with full fine-tuning (the whole 26-point grid ran
    # ok at the ci preset when the axis landed; `effllm sweep ... -p ci` repeats it)
    ("params/cross_modal/dit_attention.yaml", ["attention=mqa,mla"], 4),
    ("params/cross_modal/peft.yaml", ["method=lora,full"], 6)])
def test_ci_sweep_gives_ok_records_with_six_metrics_and_quality(study, only, expected,
                                                                 tmp_path) -> None:
    """Every grid point at the ci preset is an ok record with the six metrics (a value or null
    with a reason) and its quality score."""
    from typer.testing import CliRunner

    from effllm_helpers.cli import app

    args = ["sweep", study, "--preset", "ci", "-o", str(tmp_path)]
    for o in only:
        args += ["--only", o]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    recs = [json.loads(f.read_text()) for f in tmp_path.rglob("record.json")]
    assert len(recs) == expected
    for rec in recs:
        assert rec["status"] == "ok", rec.get("error")
        for k in SIX:
            m = rec["metrics"][k]
            assert m["value"] is not None or m["reason"]
        q = rec["quality"]
        assert ("frechet_classifier_distance" in q) if "dit" in study else ("eval_loss" in q)


def test_one_ci_dit_run_measures_training_and_sampling() -> None:
    p = notebook_params("cross_modal", "ci", {"attention": "gqa", "n_samples": 10,
                                              "sample_batch": 10, "sample_steps": 2})
    r = xm.run(p, progress=False)
    for k in ("sample_images_per_s", "sample_s_per_image"):
        assert r.metrics[k]["value"] > 0
    assert r.metrics["sample_j_per_image"]["unit"] == "J/image"
    assert r.metrics["sample_s_per_image"]["value"] == pytest.approx(
        1 / r.metrics["sample_images_per_s"]["value"])
    q = r.quality["frechet_classifier_distance"]
    assert q["value"] >= 0 and "not_fid" in q["method"]
    assert 0 <= r.quality["sample_class_accuracy"]["value"] <= 1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_dit_samples_at_its_training_precision(dtype: str) -> None:
    p = notebook_params("cross_modal", "ci", {"attention": "gqa", "n_samples": 4,
                                              "sample_batch": 4, "sample_steps": 2,
                                              "dit_train": {"dtype": dtype}})
    r = xm.run(p, progress=False)
    assert r.metrics["mfu"]["dtype"] == dtype
    assert r.metrics["sample_mfu"]["dtype"] == dtype
    assert r.model["moe_impl"] is None  # dense: no experts ran


def test_moe_dit_record_names_what_ran_the_experts() -> None:
    p = notebook_params("cross_modal", "ci", {"attention": "gqa", "ffn": "moe", "n_samples": 4,
                                              "sample_batch": 4, "sample_steps": 2})
    impl = xm.run(p, progress=False).model["moe_impl"]
    assert set(impl) == {"train", "sampling", "eval_loss"} and impl["train"] == "grouped_mm"


def _record(run_id: str, params: dict, metrics: dict, quality: dict) -> dict:
    from effllm_helpers.results import metric, new_record

    full = CrossModalParams(**params).model_dump(mode="json")
    return new_record(run_id=run_id, study=f"xm_{params['experiment']}", axis="cross_modal",
                      params=full, metrics={k: metric(v, "u", "test") for k, v in metrics.items()},
                      quality={k: metric(v, "u", "test") for k, v in quality.items()})


def test_figures_draw_the_dit_and_peft_comparisons_from_the_tidy_table(tmp_path) -> None:
    import pandas as pd

    from effllm_helpers.report import figures as fx
    from effllm_helpers.report.figures import NO_DATA, figure_texts
    from effllm_helpers.results import tidy_rows

    recs = [_record(f"d{i}", {"experiment": "dit", "attention": a, "ffn": f},
                    {"al_s": 0.1 + i, "amu_gb": 1.0, "aec_w": 5.0, "sample_images_per_s": 9.0},
                    {"frechet_classifier_distance": 10.0 + i, "sample_class_accuracy": 0.5})
            for i, (a, f) in enumerate([("mha", "dense"), ("gqa", "moe")])]
    recs[1]["metrics"]["aec_w"] = {"value": None, "unit": "W", "method": "test", "reason": "x"}
    recs += [_record(f"p{i}", {"experiment": "peft", "target": t, "method": m},
                     {"al_s": 0.1}, {"eval_loss": 1.0 + i, "eval_loss_before": 2.0,
                                     **({"accuracy": 0.5} if t != "dit" else {})})
             for i, (t, m) in enumerate([("vit", "lora"), ("vlm", "full"), ("dit", "loha")])]
    tidy = pd.DataFrame([row for r in recs for row in tidy_rows(r)])
    drawn = [fx.fig6a_dit_attention(tidy, tmp_path), fx.fig6b_peft_transfer(tidy, tmp_path)]
    assert [d.name for d in drawn] == ["fig6a_dit_attention", "fig6b_peft_transfer"]
    for d in drawn:
        assert {p.suffix for p in d.paths} == {".png", ".pdf"}
        assert all(p.stat().st_size > 0 for p in d.paths)
    no_data = [[t for t in figure_texts(d.figure) if t.startswith(NO_DATA)] for d in drawn]
    assert no_data == [[], []]  # the DiT's missing accuracy is a "not scored" note, not a gap
    assert any("not scored" in t for t in figure_texts(drawn[1].figure))
    # mha-moe and gqa-dense have no record: said on the bars' places, not drawn as zeros;
    # gqa-moe ran but its energy is null
    texts = figure_texts(drawn[0].figure)
    assert "not run" in texts and texts.count("not measured") == 1


def test_peft_transfer_figure_of_one_model_fits_its_title(tmp_path) -> None:
    import pandas as pd

    from effllm_helpers.report import figures as fx
    from effllm_helpers.results import tidy_rows

    recs = [_record(f"p{i}", {"experiment": "peft", "target": "vit", "method": m}, {"al_s": 0.1},
                    {"eval_loss": 1.0, "eval_loss_before": 2.0, "accuracy": 0.5})
            for i, m in enumerate(["lora", "full"])]
    tidy = pd.DataFrame([row for r in recs for row in tidy_rows(r)])
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = fx.fig6b_peft_transfer(tidy, tmp_path).figure
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    title = fig._suptitle.get_window_extent(canvas.get_renderer())
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width  # one panel used to cut the title


def test_dit_study_trains_with_dit_train_and_peft_with_train(monkeypatch, tmp_path) -> None:
    class Stop(Exception):
        pass

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))  # its untrained "base" is cached there

    seen: list[int] = []

    def fake_train(model, batches, spec, measure, **kw):
        seen.append(spec.steps)
        raise Stop

    monkeypatch.setattr(xm.train, "train", fake_train)
    monkeypatch.setattr(xm, "feature_classifier", lambda data, steps: (None, {}))
    monkeypatch.setattr(xm.train, "pretrain", lambda *a: 0.0)
    small = {"d_model": 32, "n_layers": 1, "n_heads": 4, "image_size": 8, "patch": 4,
             "train": {"steps": 3}, "dit_train": {"steps": 7}}
    for experiment in ("dit", "peft"):
        with pytest.raises(Stop):
            xm.run(CrossModalParams(experiment=experiment, **small), progress=False)
    assert seen == [7, 3]
    assert CrossModalParams(train={"steps": 3}).dit_train is None


def test_every_method_adapts_the_same_cached_base(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    small = {"experiment": "peft", "target": "vit", "d_model": 32, "n_layers": 1, "n_heads": 4,
             "image_size": 8, "patch": 4, "pretrain_steps": 4, "n_eval": 20,
             "train": {"steps": 2, "batch_size": 8}}
    first = xm.run(CrossModalParams(method="lora", **small), progress=False)
    second = xm.run(CrossModalParams(method="full", **small), progress=False)
    assert (first.model["base"]["cached"], second.model["base"]["cached"]) == (False, True)
    assert first.model["base"]["file"] == second.model["base"]["file"]
    for k in ("eval_loss_before", "accuracy_before"):
        assert first.quality[k]["value"] == second.quality[k]["value"]


def test_a_base_is_keyed_by_what_shapes_it_not_by_the_method() -> None:
    data = load_images("digits", 8, 0.1, seed=0)
    p = CrossModalParams(experiment="peft", target="vit", method="lora")
    same = [p.model_copy(update={"method": "full", "rank": 8, "shift": "rotate"})]
    other = [p.model_copy(update=u) for u in ({"pretrain_lr": 3e-4}, {"pretrain_steps": 61},
                                              {"d_model": 32}, {"target": "vlm"})]
    path = xm.base_path(p, data, 16, 0)
    assert all(xm.base_path(q, data, 16, 0) == path for q in same)
    assert all(xm.base_path(q, data, 16, 0) != path for q in other)
    assert xm.base_path(p, data, 32, 0) != path and xm.base_path(p, data, 16, 1) != path
