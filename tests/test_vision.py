"""The image models of axis 4 (models/vision.py) on the house's floors: the catalog's attention
variants, the text MoE with its balancing loss, the DiT FLOP count, the image quality yardstick,
the fine-tuning door and the pretraining loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from effllm_helpers import evaluate_images as ei
from effllm_helpers import train
from effllm_helpers.config import CrossModalParams, ModelSpec, SizeSpec, notebook_params
from effllm_helpers.data.vqa import vqa_task
from effllm_helpers.models import vision as vis
from effllm_helpers.models import zoo
from effllm_helpers.models.flops import dit_flops_per_token
from effllm_helpers.models.zoo import count_params
from effllm_helpers.techniques import finetuning as ft


def _params(**over) -> CrossModalParams:
    return CrossModalParams(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, image_size=8,
                            patch=2, **over)


def _text_model(attention: str, ffn: str = "dense") -> torch.nn.Module:
    """A tiny text model of the zoo, for the class and shape its variant has there."""
    size = SizeSpec(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64)
    return zoo.build(ModelSpec(attention=attention, ffn=ffn, n_experts=4, top_k=2), size, 50, 32)


def _reference_attention(attn, x: torch.Tensor, kv: int) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d)) V written out, each K/V head repeated for its query heads."""
    b, n, _ = x.shape
    h = attn.heads
    q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
    d = q.shape[-1] // h
    q = q.view(b, n, h, d).transpose(1, 2)
    k = k.view(b, n, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    v = v.view(b, n, kv, d).transpose(1, 2).repeat_interleave(h // kv, dim=1)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    return attn.to_out[0]((w @ v).transpose(1, 2).reshape(b, n, h * d))


@pytest.mark.parametrize(("attention", "kv"), [("mha", 4), ("mqa", 1), ("gqa", 2)])
def test_dit_attention_equals_explicit_softmax_reference(attention: str, kv: int) -> None:
    """Same conditions as the text models' attention tests: fp32, eval, atol/rtol 1e-5."""
    torch.manual_seed(0)
    p = _params(attention=attention)
    attn = vis.build_dit(p, channels=1, n_classes=10).eval().transformer_blocks[0].attn1
    assert zoo.kv_heads(attention, p) == kv  # the catalog's rule, as the text model's
    assert attn.to_k.out_features == kv * (p.d_model // p.n_heads)
    x = torch.randn(2, 16, p.d_model)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), _reference_attention(attn, x, kv),
                                   atol=1e-5, rtol=1e-5)


def test_dit_mla_is_the_text_mla_module_and_shape() -> None:
    p = _params(attention="mla")
    mla = vis.build_dit(p, 1, 10).transformer_blocks[0].attn1.mla
    text = _text_model("mla").model.layers[0].self_attn
    assert type(mla) is type(text)
    for name in ("kv_a_proj_with_mqa", "kv_b_proj", "q_proj", "o_proj"):
        assert getattr(mla, name).weight.shape == getattr(text, name).weight.shape
    assert mla.kv_lora_rank == p.d_model // p.mla_latent_ratio == p.d_model // 8


def test_dit_mla_equals_latent_attention_written_out() -> None:
    """K and V from the normed shared latent, the decoupled key half shared by all heads and
    not rotated (the DiT's positions are in its patch embeddings), no causal mask."""
    torch.manual_seed(0)
    p = _params(attention="mla")
    mla = vis.build_dit(p, 1, 10).eval().transformer_blocks[0].attn1
    m = mla.mla
    x = torch.randn(2, 16, p.d_model)
    b, n, h = 2, 16, p.n_heads
    nope, rope, hv = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
    with torch.no_grad():
        q = m.q_proj(x).view(b, n, h, nope + rope).transpose(1, 2)
        latent, k_pe = m.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, rope], dim=-1)
        kv = m.kv_b_proj(m.kv_a_layernorm(latent)).view(b, n, h, nope + hv).transpose(1, 2)
        k = torch.cat([kv[..., :nope], k_pe[:, None].expand(b, h, n, rope)], dim=-1)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(nope + rope), dim=-1)
        ref = m.o_proj((w @ kv[..., nope:]).transpose(1, 2).reshape(b, n, h * hv))
        torch.testing.assert_close(mla(x), ref, atol=1e-5, rtol=1e-5)


def test_an_attention_without_a_dit_form_is_refused_by_name() -> None:
    p = _params().model_copy(update={"attention": "nsa"})  # the schema refuses it first
    with pytest.raises(ValueError, match="NSA has no DiT form.*mha, mqa, gqa, mla"):
        vis.build_dit(p, 1, 10)


def test_dit_moe_is_the_text_moe_and_counts_top_k_experts_active() -> None:
    p = _params(ffn="moe", n_experts=4, top_k=1)
    dit = vis.build_dit(p, 1, 10)
    moe = dit.transformer_blocks[0].ff
    assert type(moe) is type(_text_model("gqa", "moe").model.layers[0].mlp)
    assert moe.experts.config.router_aux_loss_coef == zoo.MOE_AUX_LOSS_COEF
    per_expert = moe.experts.gate_up_proj[0].numel() + moe.experts.down_proj[0].numel()
    counts = count_params(dit)
    assert counts["active"] == counts["total"] - 3 * per_expert


def test_moe_dit_training_loss_adds_the_balancing_loss() -> None:
    torch.manual_seed(0)
    p = _params(ffn="moe", n_experts=4, top_k=2)
    model = vis.Diffusion(vis.build_dit(p, 1, 10), 100)
    x, y = torch.randn(3, 1, 8, 8), torch.tensor([0, 4, 9])
    torch.manual_seed(1)
    t = torch.randint(0, 100, (3,))
    noise = torch.randn_like(x)
    with vis.router_logits(model.dit) as logits:
        mse = model.loss(x, y, t, noise)
    aux = vis.balancing_loss(model.dit, logits)
    assert len(logits) == p.n_layers and float(aux.detach()) > 0
    torch.manual_seed(1)  # the forward draws the same t and noise
    torch.testing.assert_close(model(pixel_values=x, class_labels=y).loss, mse + aux)


def test_moe_record_names_the_text_moes_experts_implementation() -> None:
    dit = vis.build_dit(_params(ffn="moe"), 1, 10)
    impl = _text_model("gqa", "moe").config._experts_implementation
    assert vis.moe_impls(dit) == {"train": impl, "sampling": impl, "eval_loss": impl}
    assert vis.moe_impls(vis.build_dit(_params(), 1, 10)) is None


@pytest.mark.parametrize(("attention", "ffn"), [("mha", "dense"), ("mqa", "dense"),
                                               ("gqa", "dense"), ("mla", "dense"),
                                               ("gqa", "moe"), ("mla", "moe")])
def test_dit_flop_count_agrees_with_flop_counter_mode(attention: str, ffn: str) -> None:
    # adaLN-Zero's conditioning runs once per image: counted per token it overstated 1.4-2x
    from torch.utils.flop_counter import FlopCounterMode

    p = notebook_params("cross_modal", "ci", {"attention": attention, "ffn": ffn})
    dit = vis.build_dit(p, 1, 10).eval()
    for block in dit.transformer_blocks:  # FlopCounterMode does not see grouped_mm
        if hasattr(block.ff, "experts"):
            block.ff.experts.config._experts_implementation = "eager"
    s, b = vis.n_patches(p), 3
    x = torch.randn(b, 1, p.image_size, p.image_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        dit(x, timestep=torch.tensor([1, 50, 99]), class_labels=torch.tensor([0, 4, 9]))
    ours = dit_flops_per_token(dit, s, training=False) * b * s
    assert ours == pytest.approx(fc.get_total_flops(), rel=0.05)


def test_classifier_frechet_is_zero_for_identical_sets_and_grows_with_noise() -> None:
    torch.manual_seed(0)
    clf = ei.FeatureCNN(1, 10).eval()
    real = torch.rand(64, 1, 16, 16) * 2 - 1
    assert ei.classifier_frechet(clf, real, real) == pytest.approx(0.0, abs=1e-6)
    d = [ei.classifier_frechet(clf, real, (real + s * torch.randn_like(real)).clamp(-1, 1))
         for s in (0.1, 0.5, 1.5)]
    assert 0 < d[0] < d[1] < d[2]


def test_frechet_distance_matches_the_gaussian_formula_for_shifted_means() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 3))
    assert ei.frechet_distance(a, a + 2.0) == pytest.approx(3 * 4.0, rel=1e-9)


@pytest.mark.parametrize("method", ["lora", "dora", "loha", "lokr", "freeze", "full"])
def test_vlm_trainable_params_equal_peft_count(method: str) -> None:
    from effllm_helpers.axes.cross_modal import finetune_params

    p = _params(method=method)
    vlm = vis.build_vlm(p, channels=1, classes=[str(i) for i in range(10)])
    prepared = ft.prepare(vlm, finetune_params(p))
    counts = count_params(prepared.model)
    ours, total = counts["trainable"], counts["total"]
    assert prepared.trainable_params == ours > 0
    if method in ("freeze", "full"):
        assert ours == sum(q.numel() for q in vlm.parameters() if q.requires_grad)
        assert (ours == total) == (method == "full")
    else:
        assert (ours, total) == tuple(prepared.model.get_nb_trainable_parameters())


@pytest.mark.parametrize("target", ["vit", "dit"])
@pytest.mark.parametrize("method", ["lora", "loha"])
def test_the_door_adapts_vision_models_and_counts_like_peft(target: str, method: str) -> None:
    from effllm_helpers.axes.cross_modal import finetune_params

    p = _params(method=method, ffn="moe")
    model = vis.build_vit(p, 1, 10) if target == "vit" else vis.build_dit(p, 1, 10)
    prepared = ft.prepare(model, finetune_params(p), task_type=None,
                          output_layers=vis.OUTPUT_LAYERS)
    counts = count_params(prepared.model)
    assert (counts["trainable"], counts["total"]) == tuple(
        prepared.model.get_nb_trainable_parameters())
    assert type(prepared.model).__name__ == "PeftModel"  # no language-model head wrapper


@pytest.mark.parametrize("target", ["vit", "dit"])
def test_freeze_through_the_door_trains_the_last_block_and_the_output_layers(target) -> None:
    from effllm_helpers.axes.cross_modal import finetune_params

    p = _params(method="freeze", freeze_last_k=1).model_copy(update={"n_layers": 2})
    model = vis.build_vit(p, 1, 10) if target == "vit" else vis.build_dit(p, 1, 10)
    ft.prepare(model, finetune_params(p), task_type=None, output_layers=vis.OUTPUT_LAYERS)
    last = "transformer_blocks.1." if target == "dit" else "vit.layers.1."
    kept = (last, *(("proj_out_1.", "proj_out_2.") if target == "dit" else ("classifier.",)))
    trained = {n for n, q in model.named_parameters() if q.requires_grad}
    assert trained == {n for n, _ in model.named_parameters() if n.startswith(kept)}
    assert any(n.startswith(last) for n in trained) and len(kept) > 1


def test_vqa_task_takes_loss_only_on_the_answer_and_eos() -> None:
    x = torch.zeros(3, 1, 8, 8)
    task = vqa_task(x, torch.tensor([0, 7, 9]), [str(i) for i in range(10)], n_image_tokens=16)
    assert (task.labels != -100).sum(1).tolist() == [2, 2, 2]
    assert task.input_ids[:, task.prompt_len].tolist() == task.answers.tolist()


def test_the_feature_classifier_is_built_once_through_the_shared_lock(monkeypatch,
                                                                     tmp_path) -> None:
    from contextlib import contextmanager

    from effllm_helpers import paths
    from effllm_helpers.data.images import load_images

    monkeypatch.setenv("EFFLLM_CACHE", str(tmp_path))
    locked: list[str] = []
    real = paths.file_lock

    @contextmanager
    def spy(path):
        locked.append(path.name)
        with real(path):
            yield

    monkeypatch.setattr(paths, "file_lock", spy)
    data = load_images("digits", 8, seed=0)
    _, first = ei.feature_classifier(data, 2)
    _, again = ei.feature_classifier(data, 2)
    assert (first["cached"], again["cached"]) == (False, True)
    assert locked == [ei.classifier_path(data, 2).with_suffix(".lock").name]
    assert first["val_accuracy"] == again["val_accuracy"]


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
    sched = vis.Diffusion(_RecordingDiT(), train_steps).scheduler
    assert float(sched.alphas_cumprod[-1]) < 1e-3


def test_sampler_starts_at_the_last_training_timestep_and_passes_the_labels() -> None:
    dit = _RecordingDiT()
    model = vis.Diffusion(dit, 100)
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
            return vis.LossOutput(loss=self.w * x.sum())  # gradient 1: Adam steps by the lr

    seen: list[float] = []

    def batches(step: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        seen.append(float(w.detach()))
        return {"x": torch.ones(1)}

    train.pretrain(Linear(), batches, 20, 0.1)
    moves = -np.diff(seen)  # the first 19 updates
    assert moves[0] == pytest.approx(0.05, rel=1e-3)  # warm-up: 2 of 20 steps, 1/2 at the first
    assert moves.max() == pytest.approx(0.1, rel=1e-3)
    assert moves[-1] < 0.03  # cosine decay towards 10%


def test_diffusion_noises_like_the_scheduler_without_leaving_the_device(monkeypatch) -> None:
    # the scheduler's add_noise needed host timesteps: t.cpu() synchronised every GPU step
    p = notebook_params("cross_modal", "ci", {"attention": "gqa"})
    model = vis.Diffusion(vis.build_dit(p, 1, 10), p.diffusion_steps)
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
