"""OGM-GE coefficients and gradient edits against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.methods.base import TrainContext
from mmval.methods.ogm_ge import OGMGE, OGMGEConfig, discrepancy_ratios, modulation_coefficients
from mmval.models import ModelConfig, ModelOutput, build_model


def test_two_modality_ratio_and_coefficients():
    scores = torch.tensor([3.0, 1.0])
    assert discrepancy_ratios(scores).tolist() == pytest.approx([3.0, 1 / 3])
    coeffs = modulation_coefficients(scores, alpha=0.1)
    assert coeffs.tolist() == pytest.approx([1 - math.tanh(0.3), 1.0])


def test_three_modality_ratio_is_mean_of_pairwise():
    scores = torch.tensor([4.0, 2.0, 1.0])
    rho = discrepancy_ratios(scores)
    assert rho.tolist() == pytest.approx([3.0, 1.25, 0.375])
    coeffs = modulation_coefficients(scores, alpha=0.5)
    assert coeffs.tolist() == pytest.approx([1 - math.tanh(1.5), 1 - math.tanh(0.625), 1.0])


def test_coefficient_jumps_at_one_as_in_the_official_code():
    # relu(rho), not relu(rho - 1): just above 1 the coefficient is already 1 - tanh(alpha)
    coeffs = modulation_coefficients(torch.tensor([1.0001, 1.0]), alpha=0.8)
    assert coeffs[0].item() == pytest.approx(1 - math.tanh(0.8 * 1.0001), rel=1e-5)
    assert coeffs[1].item() == 1.0


def _setup(generalization: bool, params: str = "auto"):
    torch.manual_seed(0)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in ("a", "v")]
    model = build_model(
        ModelConfig(encoder={"hidden": [4], "out_dim": 4, "dropout": 0.0}, fusion="concat"),
        specs,
        2,
    )
    batch = Batch(
        inputs={"a": torch.randn(5, 3), "v": torch.randn(5, 3)},
        label=torch.zeros(5, dtype=torch.long),
        index=torch.arange(5),
    )
    out = model(batch.inputs)
    out.logits.sum().backward()
    # per-modality logits with known true-class probabilities: 0.9 (a) and 0.3 (v)
    p = torch.tensor([[0.9, 0.1]] * 5).log(), torch.tensor([[0.3, 0.7]] * 5).log()
    fake = ModelOutput(out.logits, out.features, {"a": p[0], "v": p[1]})
    method = OGMGE(OGMGEConfig(alpha=0.5, generalization=generalization, params=params), 2)
    before = {n: q.grad.clone() for n, q in model.named_parameters()}
    return model, method, fake, batch, before


def test_gradients_scaled_only_for_the_dominant_encoder():
    model, method, out, batch, before = _setup(generalization=False)
    stats = method.after_backward(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    k_a = 1 - math.tanh(0.5 * 3.0)  # rho_a = (5 * 0.9) / (5 * 0.3) = 3
    assert stats == pytest.approx({"coef_a": k_a, "coef_v": 1.0})
    for name, param in model.named_parameters():
        if name.startswith("encoders.a.") and param.dim() >= 2:
            assert torch.allclose(param.grad, before[name] * k_a)
        else:  # biases, the other encoder and the head are untouched
            assert torch.equal(param.grad, before[name])


def test_generalisation_noise_uses_std_of_unscaled_gradient():
    model, method, out, batch, before = _setup(generalization=True)
    torch.manual_seed(1)
    method.after_backward(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    k_a = 1 - math.tanh(1.5)
    name = "encoders.a.net.1.weight"
    torch.manual_seed(1)
    expected_noise = torch.randn_like(before[name]) * (before[name].std() + 1e-8)
    grad = dict(model.named_parameters())[name].grad
    assert torch.allclose(grad, before[name] * k_a + expected_noise)
    v_name = "encoders.v.net.1.weight"  # coefficient 1, but the noise is still added
    assert not torch.equal(dict(model.named_parameters())[v_name].grad, before[v_name])


def test_outside_the_window_and_conv_only_do_nothing():
    model, method, out, batch, before = _setup(generalization=True)
    method.config.modulation_starts = 2
    method.after_backward(model, out, batch, TrainContext(epoch=1, epochs=5, step=0))
    assert all(torch.equal(q.grad, before[n]) for n, q in model.named_parameters())
    model, method, out, batch, before = _setup(generalization=True, params="conv")
    method.after_backward(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    assert all(torch.equal(q.grad, before[n]) for n, q in model.named_parameters())


def test_concat_head_decomposition_sums_to_fused_logits():
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in ("a", "b", "c")]
    for fusion in ("concat", "sum", "weighted"):
        model = build_model(ModelConfig(fusion=fusion), specs, 4).eval()
        out = model({m: torch.randn(6, 3) for m in "abc"})
        total = sum(out.unimodal_logits.values())
        assert torch.allclose(total, out.logits, atol=1e-5)
