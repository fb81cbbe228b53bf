"""Shapley values: brute-force permutations, the axioms on random models, Monte Carlo."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.models import ModelConfig, build_model
from mmval.valuation.base import Game
from mmval.valuation.config import BenefitName, MaskName, MethodName, ValuationConfig
from mmval.valuation.engine import build_evaluator, subset_masks
from mmval.valuation.registry import build_method
from mmval.valuation.shapley import shapley_matrix


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


def random_model(m: int, seed: int, classes: int = 4):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=f"x{j}", dtype="float32", shape=[5]) for j in range(m)]
    config = ModelConfig.model_validate(
        {"encoder": {"hidden": [16], "out_dim": 8}, "fusion": "concat"}
    )
    model = build_model(config, specs, classes).eval()
    inputs = {s.name: torch.randn(12, 5) for s in specs}
    labels = torch.randint(0, classes, (12,))
    return model, inputs, labels


def game(
    model, inputs, labels, benefit: BenefitName = "correct", mask: MaskName = "feature"
) -> Game:
    names = list(inputs)
    fills = None if mask == "feature" else {n: torch.zeros(5) for n in names}
    evaluator = build_evaluator(model, names, mask, fills, device=torch.device("cpu"))
    return Game(evaluator, Batch(inputs, labels, torch.arange(len(labels))), benefit)


def value(g: Game, method: MethodName = "shapley", **options):
    config = ValuationConfig(method=method, benefit=g.benefit, **options)
    return build_method(config, list(g.evaluator.modalities)).value(g)


def v_empty(g: Game) -> torch.Tensor:
    return g.play(torch.zeros(1, g.m, dtype=torch.bool)).benefit[0]


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_matrix_matches_brute_force_permutations(m):
    gen = torch.Generator().manual_seed(m)
    masks = subset_masks(m)
    benefit = torch.rand(7, 2**m, generator=gen, dtype=torch.float64)  # v(empty) != 0 too
    phi = benefit @ shapley_matrix(m)
    for i in range(7):
        value = {
            frozenset(j for j in range(m) if masks[s, j]): float(benefit[i, s]) for s in range(2**m)
        }
        assert phi[i].tolist() == pytest.approx(brute_force(value, m))
    assert torch.allclose(phi.sum(1), benefit[:, -1] - benefit[:, 0])  # efficiency


def test_two_modalities_closed_form_of_the_paper():
    # phi_a = (v({a}) + v({a,v}) - v({v})) / 2 with v(S) = |S| * correct; bit 0 is modality a
    for correct in itertools.product([0, 1], repeat=3):  # {a}, {v}, {a,v}
        benefit = torch.tensor([[0, correct[0], correct[1], 2 * correct[2]]], dtype=torch.float64)
        phi = (benefit @ shapley_matrix(2))[0]
        assert phi[0].item() == pytest.approx((benefit[0, 1] + benefit[0, 3] - benefit[0, 2]) / 2)
        assert phi.sum().item() == pytest.approx(benefit[0, 3])


@pytest.mark.parametrize("m", [2, 3, 4, 5])
@pytest.mark.parametrize("benefit", ["correct", "prob"])
@torch.no_grad()
def test_exact_on_a_model_matches_brute_force(m, benefit):
    model, inputs, labels = random_model(m, seed=m)
    features = model.encode(inputs)
    masks = subset_masks(m)
    values = []  # v(S) computed subset by subset, independently of the engine
    for s in range(2**m):
        logits = model.fuse(
            {n: f * float(masks[s, j]) for j, (n, f) in enumerate(features.items())}
        )
        if benefit == "prob":
            values.append(torch.softmax(logits.double(), 1)[torch.arange(12), labels])
        else:
            values.append((logits.argmax(1) == labels).double() * int(masks[s].sum()))
    out = value(game(model, inputs, labels, benefit))
    for i in range(12):
        table = {
            frozenset(j for j in range(m) if masks[s, j]): float(values[s][i]) for s in range(2**m)
        }
        # float32 logits: fc(concat) here, per-modality shares summed in the engine
        assert out.contribution[i].tolist() == pytest.approx(brute_force(table, m), abs=1e-6)
        assert out.v_full[i].item() == pytest.approx(float(values[-1][i]))


@pytest.mark.parametrize("method", ["shapley", "shapley-mc"])
@pytest.mark.parametrize("benefit", ["correct", "prob"])
@pytest.mark.parametrize("mask", ["feature", "input"])
def test_efficiency(method, benefit, mask):
    g = game(*random_model(4, seed=1), benefit=benefit, mask=mask)
    options = {"permutations": 5} if method == "shapley-mc" else {}
    out = value(g, method, **options)
    expected = out.v_full - v_empty(g)
    assert torch.allclose(out.contribution.sum(1), expected, atol=1e-12)
    if benefit == "correct":
        assert torch.all(v_empty(g) == 0)


@pytest.mark.parametrize("benefit", ["correct", "prob"])
def test_symmetry_identical_modalities_get_equal_values(benefit):
    model, inputs, labels = random_model(3, seed=2)
    with torch.no_grad():
        model.encoders["x1"].load_state_dict(model.encoders["x0"].state_dict())
        weight = model.fusion.fc.weight  # [C, 3 * 8], modality slices in order
        weight[:, 8:16] = weight[:, 0:8]
    inputs["x1"] = inputs["x0"].clone()
    for method, options in (("shapley", {}), ("cmob", {})):
        out = value(game(model, inputs, labels, benefit), method, **options)
        assert torch.allclose(out.contribution[:, 0], out.contribution[:, 1], atol=1e-12)
        assert not torch.allclose(out.contribution[:, 0], out.contribution[:, 2])


def test_dummy_modality_the_model_ignores_gets_zero():
    model, inputs, labels = random_model(3, seed=3)
    with torch.no_grad():
        model.fusion.fc.weight[:, 16:24] = 0  # modality x2 never reaches the logits
    g = game(model, inputs, labels, "prob")
    exact = value(g)
    sampled = value(g, "shapley-mc", permutations=6)
    assert torch.all(exact.contribution[:, 2].abs() < 1e-12)
    assert torch.all(sampled.contribution[:, 2].abs() < 1e-12)
    assert torch.all(sampled.stderr[:, 2] < 1e-12)
    assert torch.all(exact.contribution[:, :2].abs().sum(1) > 0)


def test_monte_carlo_converges_to_exact():
    g = game(*random_model(5, seed=4), benefit="prob")
    exact = value(g).contribution
    errors, stderrs = [], []
    for n in (8, 64, 512):
        out = value(g, "shapley-mc", permutations=n, seed=1)
        errors.append((out.contribution - exact).abs().mean().item())
        stderrs.append(out.stderr.mean().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < errors[0] / 4  # about 1 / sqrt(N): 8x fewer would give 1/8
    assert stderrs[0] > stderrs[1] > stderrs[2]
    assert errors[2] < 3 * stderrs[2]  # the standard error is of the right size


def test_monte_carlo_depends_on_seed_and_position_only():
    model, inputs, labels = random_model(4, seed=5)
    whole = value(game(model, inputs, labels, "prob"), "shapley-mc", permutations=4, seed=7)
    again = value(game(model, inputs, labels, "prob"), "shapley-mc", permutations=4, seed=7)
    assert torch.equal(whole.contribution, again.contribution)
    half = {n: x[6:] for n, x in inputs.items()}
    g = game(model, half, labels[6:], "prob")
    g.positions = torch.arange(6, 12)  # the same samples, valued in another batch
    part = value(g, "shapley-mc", permutations=4, seed=7)
    assert torch.allclose(part.contribution, whole.contribution[6:], atol=1e-12)
    other = value(game(model, inputs, labels, "prob"), "shapley-mc", permutations=4, seed=8)
    assert not torch.equal(other.contribution, whole.contribution)
