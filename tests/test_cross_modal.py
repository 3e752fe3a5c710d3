"""Axis 4 (cross-modal): attention variants, the quality yardstick, PEFT counts, image sources."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from effllm_helpers.axes import cross_modal as xm
from effllm_helpers.config import CrossModalParams, notebook_params
from effllm_helpers.data.images import load_images
from effllm_helpers.models.zoo import count_params

SIX = ("amu_gb", "pcu", "mfu", "al_s", "tt", "st", "aec_w", "mcr")


def _params(**over) -> CrossModalParams:
    return CrossModalParams(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, image_size=8,
                            patch=2, **over)


def _reference_attention(attn, x: torch.Tensor, kv: int, latent: bool) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, each K/V head repeated for its query heads."""
    b, n, _ = x.shape
    h = attn.heads
    q = attn.to_q(x)
    src = attn.to_kv_latent(x) if latent else x
    k, v = attn.to_k(src), attn.to_v(src)
    d = q.shape[-1] // h
    q = q.view(b, n, h, d).transpose(1, 2)
    k = k.view(b, n, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    v = v.view(b, n, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, h * d)
    return attn.to_out[0](out)


@pytest.mark.parametrize(("attention", "kv"), [("mha", 4), ("mqa", 1), ("gqa", 2), ("mla", 4)])
def test_dit_attention_equals_explicit_softmax_reference(attention: str, kv: int) -> None:
    """Same conditions as the text models' attention tests: fp32, eval, atol/rtol 1e-5."""
    torch.manual_seed(0)
    p = _params(attention=attention)
    dit = xm.build_dit(p, channels=1, n_classes=10).eval()
    attn = dit.transformer_blocks[0].attn1
    assert xm.kv_heads(p) == kv
    assert attn.to_k.out_features == kv * (p.d_model // p.n_heads) or attention == "mla"
    x = torch.randn(2, 16, p.d_model)
    with torch.no_grad():
        got = attn(x)
        ref = _reference_attention(attn, x, kv, latent=attention == "mla")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mla_projects_keys_and_values_from_a_shared_low_rank_latent() -> None:
    p = _params(attention="mla", mla_latent_ratio=4)
    attn = xm.build_dit(p, 1, 10).transformer_blocks[0].attn1
    assert attn.to_kv_latent.out_features == p.d_model // 4
    assert attn.to_k.in_features == attn.to_v.in_features == p.d_model // 4


def test_moe_ffn_runs_top_k_experts_and_counts_active_params() -> None:
    torch.manual_seed(0)
    p = _params(ffn="moe", n_experts=4, top_k=1)
    dit = xm.build_dit(p, 1, 10).eval()
    moe = dit.transformer_blocks[0].ff
    assert isinstance(moe, xm.MoEFeedForward)
    x = torch.randn(3, 5, p.d_model)
    with torch.no_grad():  # top-1: each token's output is its one expert's output
        e = moe.router(x.reshape(-1, p.d_model)).argmax(-1)
        ref = torch.stack([moe.experts[int(i)](t) for t, i in zip(x.reshape(-1, p.d_model), e,
                                                                     strict=True)])
        torch.testing.assert_close(moe(x).reshape(-1, p.d_model), ref, atol=1e-5, rtol=1e-5)
    per_expert = sum(q.numel() for q in moe.experts[0].parameters())
    total = sum(q.numel() for q in dit.parameters())
    assert xm.active_params(dit) == total - 3 * per_expert


def test_moe_grouped_gemm_path_equals_the_expert_loop_with_gradients() -> None:
    # the sync-free path (CUDA + bf16 under "auto") computes what the per-expert loop does
    torch.manual_seed(0)
    moe = xm.MoEFeedForward(32, 64, n_experts=4, top_k=2)
    x = torch.randn(2, 24, 32)
    outs, grads = {}, {}
    for impl in ("loop", "grouped_mm"):
        moe.impl = impl
        moe.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = moe(x)
        y.float().square().mean().backward()
        assert moe.last_impl == impl
        outs[impl] = y.float()
        grads[impl] = torch.cat([p.grad.flatten() for p in moe.parameters()])
    torch.testing.assert_close(outs["grouped_mm"], outs["loop"], atol=2e-2, rtol=2e-2)
    assert (grads["grouped_mm"] - grads["loop"]).norm() <= 0.03 * grads["loop"].norm()


def test_moe_auto_keeps_the_loop_on_cpu_and_in_fp32() -> None:
    moe = xm.MoEFeedForward(32, 64, n_experts=4, top_k=2)
    moe(torch.randn(1, 4, 32))
    assert moe.last_impl == "loop"
    moe.impl = "fused"
    with pytest.raises(ValueError, match="allowed auto, loop, grouped_mm"):
        moe(torch.randn(1, 4, 32))


def test_classifier_frechet_is_zero_for_identical_sets_and_grows_with_noise() -> None:
    torch.manual_seed(0)
    clf = xm.FeatureCNN(1, 10).eval()
    real = torch.rand(64, 1, 16, 16) * 2 - 1
    assert xm.classifier_frechet(clf, real, real) == pytest.approx(0.0, abs=1e-6)
    d = [xm.classifier_frechet(clf, real, (real + s * torch.randn_like(real)).clamp(-1, 1))
         for s in (0.1, 0.5, 1.5)]
    assert 0 < d[0] < d[1] < d[2]


def test_frechet_distance_matches_the_gaussian_formula_for_shifted_means() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert xm.frechet_distance(a, a + 2.0) == pytest.approx(3 * 4.0, rel=1e-9)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "freeze", "full"])
def test_vlm_trainable_params_equal_peft_count(method: str) -> None:
    from effllm_helpers.techniques import finetuning as ft

    p = _params(method=method)
    vlm = xm.build_vlm(p, channels=1, classes=[str(i) for i in range(10)])
    prepared = ft.prepare(vlm, xm.finetune_params(p))
    counts = count_params(prepared.model)
    ours, total = counts["trainable"], counts["total"]
    assert prepared.trainable_params == ours > 0
    if method in ("freeze", "full"):
        assert ours == sum(q.numel() for q in vlm.parameters() if q.requires_grad)
        assert (ours == total) == (method == "full")
    else:
        assert (ours, total) == tuple(prepared.model.get_nb_trainable_parameters())


def test_vit_and_dit_adapters_count_like_peft() -> None:
    for build in (lambda p: xm.build_vit(p, 1, 10), lambda p: xm.build_dit(p, 1, 10)):
        p = _params(method="lora")
        model, _ = xm.attach_method(build(p), p)
        counts = count_params(model)
        assert (counts["trainable"], counts["total"]) == tuple(
            model.get_nb_trainable_parameters())


def test_vqa_task_takes_loss_only_on_the_answer_and_eos() -> None:
    x = torch.zeros(3, 1, 8, 8)
    task = xm.vqa_task(x, torch.tensor([0, 7, 9]), [str(i) for i in range(10)], n_image_tokens=16)
    assert (task.labels != -100).sum(1).tolist() == [2, 2, 2]
    assert task.input_ids[:, task.prompt_len].tolist() == task.answers.tolist()


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


@pytest.mark.parametrize(("attention", "ffn"), [("mha", "dense"), ("mqa", "dense"),
                                               ("gqa", "dense"), ("mla", "dense"), ("gqa", "moe")])
def test_dit_flop_count_agrees_with_flop_counter_mode(attention: str, ffn: str) -> None:
    # adaLN-Zero's conditioning runs once per image: counted per token it overstated 1.4-2x
    from torch.utils.flop_counter import FlopCounterMode

    p = notebook_params("cross_modal", "ci", {"attention": attention, "ffn": ffn})
    dit = xm.build_dit(p, 1, 10).eval()
    s, b = xm.n_patches(p), 3
    x = torch.randn(b, 1, p.image_size, p.image_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        dit(x, timestep=torch.tensor([1, 50, 99]), class_labels=torch.tensor([0, 4, 9]))
    ours = xm.dit_flops_per_token(dit, s, training=False) * b * s
    assert ours == pytest.approx(fc.get_total_flops(), rel=0.05)


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
    assert xm.run(p, progress=False).model["moe_impl"] == {  # CPU: the loop in every phase
        "train": "loop", "sampling": "loop", "eval_loss": "loop"}


def test_moe_record_names_each_phases_path_on_cuda_bf16() -> None:
    """On an H200 the record said ['loop'] although training ran grouped_mm: it named only the
    last forward, the fp32 loss evaluation. Each phase is named now."""
    dit = nn.Sequential(xm.MoEFeedForward(32, 64, n_experts=4, top_k=2))
    assert xm.moe_impls(dit, torch.device("cuda"), torch.bfloat16) == {
        "train": "grouped_mm", "sampling": "grouped_mm", "eval_loss": "loop"}
    assert xm.moe_impls(nn.Sequential(nn.Linear(2, 2)), torch.device("cuda"),
                        torch.bfloat16) is None


def test_diffusion_noises_like_the_scheduler_without_leaving_the_device(monkeypatch) -> None:
    # the scheduler's add_noise needed host timesteps: t.cpu() synchronised every GPU step
    p = notebook_params("cross_modal", "ci", {"attention": "gqa"})
    model = xm.Diffusion(xm.build_dit(p, 1, 10), p.diffusion_steps)
    x, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 7, 42, p.diffusion_steps - 1])
    expected = model.scheduler.add_noise(x, noise, t)
    assert torch.allclose(model.add_noise(x, noise, t), expected, atol=1e-6)

    def host_copy(*_a, **_k):
        raise AssertionError("a host copy inside the training step")

    monkeypatch.setattr(torch.Tensor, "cpu", host_copy)
    monkeypatch.setattr(torch.Tensor, "item", host_copy)
    out = model(pixel_values=torch.randn(4, 1, p.image_size, p.image_size),
                class_labels=torch.tensor([0, 1, 2, 3]))
    assert out.loss.ndim == 0


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


class _RecordingDiT(torch.nn.Module):
    """Predicts zero noise and records the timesteps and labels the sampler feeds it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[int, list[int]]] = []

    def forward(self, x, timestep, class_labels):
        self.calls.append((int(timestep[0]), class_labels.tolist()))
        return type("Out", (), {"sample": torch.zeros_like(x) + self.w})()


@pytest.mark.parametrize("train_steps", [20, 100, 1000])
def test_diffusion_schedule_ends_in_pure_noise_at_any_step_count(train_steps: int) -> None:
    """Sampling starts from N(0, I), so the last training timestep must carry (almost) no
    image: the 1,000-step linear betas at 100 steps kept alpha_bar_T = 0.36."""
    sched = xm.Diffusion(_RecordingDiT(), train_steps).scheduler
    assert float(sched.alphas_cumprod[-1]) < 1e-3


def test_sampler_starts_at_the_last_training_timestep_and_passes_the_labels() -> None:
    dit = _RecordingDiT()
    model = xm.Diffusion(dit, 100)
    labels = torch.tensor([3, 7])
    x = model.sample(labels, 10, (1, 4, 4), torch.Generator().manual_seed(0))
    ts = [t for t, _ in dit.calls]
    assert ts[0] == 99 and ts == sorted(ts, reverse=True) and len(ts) == 10
    assert all(lab == [3, 7] for _, lab in dit.calls)
    assert x.shape == (2, 1, 4, 4) and float(x.abs().max()) <= 1


def test_pretrain_warms_up_then_decays_the_learning_rate() -> None:
    """The PEFT base's pretraining follows the shared loop's schedule: at a constant 3e-3 from
    the first step the gpu preset's ViT never left chance on plain digits."""
    w = torch.nn.Parameter(torch.zeros(()))

    class Linear(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = w

        def forward(self, x):
            return xm.LossOutput(loss=self.w * x.sum())  # gradient 1: Adam steps by the lr

    seen: list[float] = []

    def batches(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        seen.append(float(w.detach()))
        return {"x": torch.ones(1)}

    xm._pretrain(Linear(), batches, 20, 0.1)
    moves = -np.diff(seen)  # the first 19 updates
    assert moves[0] == pytest.approx(0.05, rel=1e-3)  # warm-up: 2 of 20 steps, 1/2 at the first
    assert moves.max() == pytest.approx(0.1, rel=1e-3)
    assert moves[-1] < 0.03  # cosine decay towards 10%


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
    monkeypatch.setattr(xm, "_pretrain", lambda *a: 0.0)
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
