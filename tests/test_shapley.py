"""Exact Shapley values: brute-force permutations, efficiency, the paper's two-modality form."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmval.data.shards import ModalitySpec
from mmval.models import ModelConfig, build_model
from mmval.valuation.shapley import (
    correctness_benefit,
    exact_shapley,
    subset_logits,
    subset_masks,
)


def brute_force(value: dict[frozenset, float], m: int) -> list[float]:
    """Average marginal contribution over all m! orders."""
    phi = [0.0] * m
    for order in itertools.permutations(range(m)):
        members: set[int] = set()
        for j in order:
            before = value[frozenset(members)]
            members.add(j)
            phi[j] += value[frozenset(members)] - before
    return [p / math.factorial(m) for p in phi]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_matches_brute_force_permutations(m):
    gen = torch.Generator().manual_seed(m)
    masks = subset_masks(m)
    benefit = torch.rand(7, 2**m, generator=gen, dtype=torch.float64)
    benefit[:, 0] = 0
    phi = exact_shapley(benefit, m)
    for i in range(7):
        value = {
            frozenset(j for j in range(m) if masks[s, j]): float(benefit[i, s]) for s in range(2**m)
        }
        assert phi[i].tolist() == pytest.approx(brute_force(value, m))
    assert torch.allclose(phi.sum(1), benefit[:, -1])  # efficiency


def test_two_modalities_closed_form_of_the_paper():
    # phi_a = (v({a}) + v({a,v}) - v({v})) / 2 with v(S) = |S| * correct
    masks = subset_masks(2)
    for correct in itertools.product([0, 1], repeat=3):  # {a}, {v}, {a,v}
        benefit = torch.tensor(
            [[0, correct[0] * 1, correct[1] * 1, correct[2] * 2]], dtype=torch.float64
        )
        phi = exact_shapley(benefit, 2)[0]
        assert phi[0].item() == pytest.approx((benefit[0, 1] + benefit[0, 3] - benefit[0, 2]) / 2)
        assert masks[1].tolist() == [True, False]


def test_subset_logits_zero_the_missing_features():
    specs = [ModalitySpec(name=m, dtype="float32", shape=[4]) for m in ("x", "y", "z")]
    model = build_model(ModelConfig(), specs, 5).eval()
    inputs = {m: torch.randn(6, 4) for m in ("x", "y", "z")}
    feats = model.encode(inputs)
    masks = subset_masks(3)
    logits = subset_logits(model, feats, masks)
    for s in range(8):
        manual = {m: f * float(masks[s, j]) for j, (m, f) in enumerate(feats.items())}
        assert torch.allclose(logits[s], model.fuse(manual), atol=1e-6)
    labels = logits[-1].argmax(1)
    benefit = correctness_benefit(logits, labels, masks)
    assert torch.all(benefit[:, -1] == 3) and torch.all(benefit[:, 0] == 0)
