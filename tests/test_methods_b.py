"""MMPareto, Relearning, G-Blending, linear probe, UME and UMT: their arithmetic against
independent computations, recipe errors, resume, and short training runs on uci-mfeat
(6 modalities) and synthetic audio-visual clips (ResNet-18)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmval.artifacts.checkpoint import Checkpoint, DataInfo, save_checkpoint
from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.base import StepTools, TrainContext
from mmval.methods.gblending import GBlending, GBlendingConfig, blend_weights
from mmval.methods.linear_probe import LinearProbe, LinearProbeConfig
from mmval.methods.mmpareto import MMPareto, MMParetoConfig, pareto_weights
from mmval.methods.relearning import (
    Relearning,
    RelearningConfig,
    kmeans,
    kmeans_plus_plus,
    lloyd,
    minmax_scale,
    purity,
)
from mmval.methods.ume import UME, UMEConfig
from mmval.methods.umt import UMT, UMTConfig, distillation_loss
from mmval.models import ModelConfig, build_model
from mmval.recipe import load_recipe
from tests.conftest import assert_resume_matches


def _model(names, fusion="concat", num_classes=3, seed=0):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    config = ModelConfig(encoder={"hidden": [5], "out_dim": 4, "dropout": 0.0}, fusion=fusion)
    return build_model(config, specs, num_classes)


def _batch(names, n=6, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % num_classes,
        index=torch.arange(n),
    )


def _tools(params, lr=1.0):
    optimizer = torch.optim.SGD(params, lr=lr)
    return StepTools(optimizer, contextlib.nullcontext)


# ---------------------------------------------------------------- MMPareto


def _brute_min_norm(a, b):
    """argmin over c in [0, 1] of |c a + (1 - c) b| on a fine grid."""
    cs = torch.linspace(0, 1, 100001, dtype=torch.float64)
    norms = ((cs[:, None] * a[None] + (1 - cs[:, None]) * b[None]) ** 2).sum(1)
    return cs[norms.argmin()].item()


def test_pareto_weights_by_hand():
    assert pareto_weights(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == (0.5, 0.5)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])  # cos < 0
    w = pareto_weights(a, b)
    assert w == pytest.approx((0.6, 0.4))  # (2 - (-1)) / (1 + 2 + 2)
    assert w[0] == pytest.approx(_brute_min_norm(a.double(), b.double()), abs=1e-4)
    # clipped ends of MinNormSolver._min_norm_element_from2
    assert pareto_weights(torch.zeros(2), torch.tensor([1.0, 0.0]))[0] == 0.999
    assert pareto_weights(torch.tensor([1.0, 0.0]), torch.zeros(2))[0] == 0.001


@pytest.mark.parametrize("names", [("a", "v"), ("a", "v", "t")])
def test_mmpareto_step_matches_separate_backward_passes(names):
    """The official M + 2 backward passes, redone independently, give the same update."""
    model, batch, gamma = _model(names), _batch(names), 1.5
    method = MMPareto(MMParetoConfig(gamma=gamma), 3)
    heads = method.build_modules(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    heads_before = {n: p.detach().clone() for n, p in heads.named_parameters()}

    out = model(batch.inputs)
    loss_mm = F.cross_entropy(out.logits, batch.label)
    loss_u = {m: F.cross_entropy(method.heads[m](out.features[m]), batch.label) for m in names}
    total = loss_mm + sum(loss_u.values())
    expected, expected_w = {}, {}
    for m in names:
        params = list(model.encoders[m].parameters())
        g_mm = torch.autograd.grad(loss_mm, params, retain_graph=True)
        g_u = torch.autograd.grad(loss_u[m], params, retain_graph=True)
        g_sum = torch.autograd.grad(total, params, retain_graph=True)
        flat_mm, flat_u = (
            torch.cat([g.flatten() for g in g_mm]),
            torch.cat([g.flatten() for g in g_u]),
        )
        agree = (flat_mm @ flat_u) > 0
        w = 0.5 if agree else _brute_min_norm(flat_mm.double(), flat_u.double())
        expected_w[m] = w
        for (name, _), a, b, s in zip(
            model.encoders[m].named_parameters(), g_mm, g_u, g_sum, strict=True
        ):
            n = 2 * (w * a + (1 - w) * b)
            expected[f"encoders.{m}.{name}"] = gamma * n * max(1.0, (s.norm() / n.norm()).item())
    fusion_grads = torch.autograd.grad(total, list(model.fusion.parameters()), retain_graph=True)
    head_grads = torch.autograd.grad(total, list(heads.parameters()))
    for (name, _), g in zip(model.fusion.named_parameters(), fusion_grads, strict=True):
        expected[f"fusion.{name}"] = g

    tools = _tools([*model.parameters(), *heads.parameters()])
    result = method.train_step(model, batch, TrainContext(epoch=0, epochs=1, step=0), tools)
    assert result.loss.item() == pytest.approx(total.item(), rel=1e-6)
    for m in names:
        assert result.figures[f"w_mm_{m}"] == pytest.approx(expected_w[m], abs=1e-4)
    for name, p in model.named_parameters():  # SGD, lr 1: new = old - grad
        assert torch.allclose(before[name] - p.detach(), expected[name], atol=1e-4), name
    for (name, p), g in zip(heads.named_parameters(), head_grads, strict=True):
        assert torch.allclose(heads_before[name] - p.detach(), g, atol=1e-6)


# ---------------------------------------------------------------- Relearning


def test_minmax_scale_and_purity_by_hand():
    x = np.array([[0.0, 5.0], [2.0, 5.0], [1.0, 5.0]])
    assert minmax_scale(x).tolist() == [[-1.0, -1.0], [1.0, -1.0], [0.0, -1.0]]
    labels = np.array([0, 0, 1, 1, 1, 2])
    clusters = np.array([0, 0, 0, 1, 1, 1])  # majorities 0 (2 of 3) and 1 (2 of 3)
    assert purity(labels, clusters) == pytest.approx(4 / 6)
    assert purity(labels, np.zeros(6, dtype=int)) == pytest.approx(3 / 6)


def test_kmeans_finds_separated_blobs_deterministically():
    rng = np.random.default_rng(3)
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    labels = np.repeat(np.arange(4), 25)
    x = centers[labels] + rng.normal(scale=0.5, size=(100, 2))
    clusters = kmeans(x, 4, iters=100)
    assert purity(labels, clusters) == 1.0
    assert len(np.unique(clusters)) == 4
    assert np.array_equal(clusters, kmeans(x, 4, iters=100))
    # Lloyd's fixed point: every point is nearest to the mean of its own cluster
    means = np.stack([x[clusters == c].mean(0) for c in range(4)])
    assert np.array_equal(((x[:, None] - means[None]) ** 2).sum(-1).argmin(1), clusters)


def _eight_blobs(seed):
    """Eight overlapping blobs in the plane: k-means++ starts end in different local optima."""
    rng = np.random.RandomState(seed)
    centers = rng.randn(8, 2) * 3
    return np.concatenate([c + rng.randn(20, 2) for c in centers])


def test_kmeans_keeps_the_best_of_ten_starts_as_sklearn_kmeans_random_state_0():
    # ours.py reinit_score: KMeans(n_clusters=C, random_state=0), n_init 10 (scikit-learn < 1.4)
    assert RelearningConfig().kmeans_inits == 10
    x = _eight_blobs(1)
    tol = 1e-4 * x.var(0).mean()
    stream = np.random.RandomState(0)  # every start draws from the one RandomState, in turn
    runs = [lloyd(x, kmeans_plus_plus(x, 8, stream), 300, tol) for _ in range(10)]
    inertias = [inertia for _, inertia in runs]
    best = int(np.argmin(inertias))
    assert inertias[0] > inertias[best] + 1  # one start alone would stop in a worse optimum
    clusters = kmeans(x, 8, iters=300)
    assert np.array_equal(clusters, runs[best][0])
    assert np.array_equal(kmeans(x, 8, iters=300, inits=1), runs[0][0])
    assert np.array_equal(clusters, kmeans(x, 8, iters=300, seed=0))  # deterministic per seed
    centers = np.stack([x[clusters == c].mean(0) for c in range(8)])
    assert ((x - centers[clusters]) ** 2).sum() == pytest.approx(inertias[best])


def test_kmeans_relocates_an_emptied_cluster_to_the_farthest_point():
    x = np.array([[0.0], [1.0], [10.0]])
    start = np.array([[0.0], [100.0]])  # the second centre wins no point
    labels, inertia = lloyd(x, start, iters=10, tol=0.0)
    assert labels.tolist() == [0, 0, 1] and inertia == pytest.approx(0.5)


def test_relearning_soft_reinit_schedule_and_formula():
    names = ("a", "v", "t")
    model = _model(names)
    method = Relearning(RelearningConfig(move_lambda=3.0, reinit_epoch=2, reinit_num=2), 3)
    method.build_modules(model)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    train, val = _batch(names, n=12, seed=1), _batch(names, n=9, seed=2)

    def ctx(epoch):
        return TrainContext(
            epoch=epoch,
            epochs=9,
            step=0,
            batches=lambda role: iter([train if role == "train" else val]),
        )

    def move():
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.5)

    move()
    for epoch in (0, 1, 2):  # re-inits only after 0-based epoch 2, i.e. at the start of epoch 3
        method.on_epoch_start(model, ctx(epoch))
        assert method.on_epoch_end(model, ctx(epoch)) == {}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.on_epoch_start(model, ctx(3))
    figures = method.on_epoch_end(model, ctx(3))
    assert model.training
    for m in names:
        gap = abs(figures[f"purity_train_{m}"] - figures[f"purity_val_{m}"])
        w = figures[f"reinit_w_{m}"]
        assert w == pytest.approx(math.tanh(3.0 * gap))
    for name, p in model.named_parameters():
        if name.startswith("encoders."):
            w = figures[f"reinit_w_{name.split('.')[1]}"]
            assert torch.allclose(p, w * initial[name] + (1 - w) * before[name], atol=1e-6)
        else:  # the fusion head is left alone
            assert torch.equal(p, before[name])
    method.on_epoch_start(model, ctx(5))
    assert method.reinits == 2
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    method.on_epoch_start(model, ctx(7))  # N = 2 reached: nothing more
    assert all(torch.equal(p, snapshot[n]) for n, p in model.named_parameters())
    fresh = Relearning(method.config, 3)
    fresh.load_state_dict(method.state_dict())
    assert fresh.reinits == 2


# ---------------------------------------------------------------- G-Blending


def test_blend_weights_by_hand():
    before = {"a": (1.0, 1.2), "mm": (1.0, 1.1)}
    after = {"a": (0.5, 1.0), "mm": (0.4, 0.9)}
    raw_a = 0.2 / ((1.0 - 0.5) - (1.2 - 1.0)) ** 2  # dG / dO^2 = 0.2 / 0.3^2
    raw_mm = 0.2 / ((0.9 - 0.4) - (1.1 - 1.0)) ** 2  # 0.2 / 0.4^2
    w = blend_weights(before, after)
    assert w == pytest.approx({"a": raw_a / (raw_a + raw_mm), "mm": raw_mm / (raw_a + raw_mm)})
    # no change in overfitting: dO clamped at 1e-4
    w = blend_weights({"a": (1.0, 1.0), "mm": (1.0, 1.0)}, {"a": (0.9, 0.9), "mm": (1.0, 1.1)})
    assert w["a"] == pytest.approx((0.1 / 1e-8) / (0.1 / 1e-8 + 0.1 / 0.01))
    flat = blend_weights({"a": (1.0, 1.0), "mm": (1.0, 1.0)}, {"a": (0.5, 1.0), "mm": (0.4, 1.0)})
    assert flat == {"a": 0.5, "mm": 0.5}


def test_gblending_estimate_splits_train_and_leaves_the_model_alone(monkeypatch):
    names = ("a", "v", "t")
    model = _model(names)
    method = GBlending(GBlendingConfig(super_epoch=1, v_rate=0.25), 3)
    heads = method.build_modules(model)
    train = _batch(names, n=12, seed=1)
    ctx = TrainContext(epoch=0, epochs=2, step=0, batches=lambda role: iter([train]))
    assert method.train_positions(ctx).tolist() == list(range(3, 12))  # V: positions 0..2
    seen = {}
    real = blend_weights

    def spy(before, after):
        seen.update(before=before, after=after)
        return real(before, after)

    monkeypatch.setattr("mmval.methods.gblending.blend_weights", spy)
    snapshot = {
        n: p.detach().clone() for n, p in [*model.named_parameters(), *heads.named_parameters()]
    }
    tools = _tools([*model.parameters(), *heads.parameters()], lr=0.1)
    weights = method.estimate(model, ctx, tools, batch_size=4)
    assert set(weights) == {"a", "v", "t", "mm"} and sum(weights.values()) == pytest.approx(1.0)
    after_estimate = dict([*model.named_parameters(), *heads.named_parameters()])
    assert all(torch.equal(after_estimate[n], p) for n, p in snapshot.items())
    # the "before" losses are those of the untouched model on T (rows 3..) and V (rows 0..2)
    model.eval()
    with torch.no_grad():
        out = model(train.inputs)
        t, v = slice(3, 12), slice(0, 3)
        expect_mm = (
            F.cross_entropy(out.logits[t], train.label[t]).item(),
            F.cross_entropy(out.logits[v], train.label[v]).item(),
        )
        za = method.heads["a"](out.features["a"])
        expect_a = (
            F.cross_entropy(za[t], train.label[t]).item(),
            F.cross_entropy(za[v], train.label[v]).item(),
        )
    assert seen["before"]["mm"] == pytest.approx(expect_mm, rel=1e-5)
    assert seen["before"]["a"] == pytest.approx(expect_a, rel=1e-5)
    assert seen["after"]["mm"][0] < seen["before"]["mm"][0]  # the copy trained on T


def test_gblending_loss_is_the_weighted_sum():
    names = ("a", "v")
    model, batch = _model(names), _batch(names)
    method = GBlending(GBlendingConfig(), 3)
    heads = method.build_modules(model)
    method.weights, method.estimated_at = {"a": 0.2, "v": 0.3, "mm": 0.5}, 0
    with torch.no_grad():
        out = model(batch.inputs)
        expected = 0.5 * F.cross_entropy(out.logits, batch.label)
        expected += 0.2 * F.cross_entropy(method.heads["a"](out.features["a"]), batch.label)
        expected += 0.3 * F.cross_entropy(method.heads["v"](out.features["v"]), batch.label)
    tools = _tools([*model.parameters(), *heads.parameters()])
    result = method.train_step(model, batch, TrainContext(epoch=1, epochs=2, step=0), tools)
    assert result.loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- linear probe, UME, UMT


def _save_weights(path, model, modalities):
    """A checkpoint of `model` with only what linear probe and UMT read (weights, modalities)."""
    data = DataInfo(path="", dataset="", fingerprint="", classes=[], modalities=list(modalities))
    save_checkpoint(path, Checkpoint(recipe={}, data=data, model=model.state_dict(), epoch=0))


def _save_model(path, names, seed, shape=(3,)):
    """An mmval checkpoint of a freshly built model on `names`."""
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=list(shape)) for m in names]
    config = ModelConfig(encoder={"hidden": [5], "out_dim": 4, "dropout": 0.5}, fusion="concat")
    model = build_model(config, specs, 3)
    _save_weights(path, model, names)
    return model


def test_linear_probe_loads_and_freezes_the_encoders(tmp_path):
    names = ("a", "v")
    probed = _save_model(tmp_path / "probed.pt", names, seed=5)
    model = _model(names)
    model.encoders["a"].net[2].p = 0.5  # dropout must be off in the probe's forward
    method = LinearProbe(LinearProbeConfig(checkpoint=tmp_path / "probed.pt"), 3)
    method.build_modules(model)
    for n, p in probed.encoders.named_parameters():
        assert torch.equal(dict(model.encoders.named_parameters())[n], p)
    fusion_before = {n: p.detach().clone() for n, p in model.fusion.named_parameters()}
    encoders_before = {n: p.detach().clone() for n, p in model.encoders.named_parameters()}
    batch = _batch(names)
    tools = _tools(list(model.parameters()), lr=0.5)
    model.train()
    result = method.train_step(model, batch, TrainContext(epoch=0, epochs=1, step=0), tools)
    assert all(torch.equal(p, encoders_before[n]) for n, p in model.encoders.named_parameters())
    assert any(not torch.equal(p, fusion_before[n]) for n, p in model.fusion.named_parameters())
    with torch.no_grad():  # the logits came from eval-mode encoders and the pre-step head
        feats = {m: probed.encoders[m].eval()(batch.inputs[m]) for m in names}
        model.fusion.load_state_dict(fusion_before)
        assert torch.allclose(result.logits, model.fuse(feats), atol=1e-6)


def test_linear_probe_and_umt_refuse_unfitting_checkpoints(tmp_path):
    _save_model(tmp_path / "a.pt", ("a",), seed=0)
    _save_model(tmp_path / "wide.pt", ("a", "v"), seed=0, shape=(5,))
    model = _model(("a", "v"))
    with pytest.raises(UserError, match="no encoder for modality 'v'"):
        LinearProbe(LinearProbeConfig(checkpoint=tmp_path / "a.pt"), 3).build_modules(model)
    with pytest.raises(UserError, match="does not fit"):
        LinearProbe(LinearProbeConfig(checkpoint=tmp_path / "wide.pt"), 3).build_modules(model)
    with pytest.raises(UserError, match="missing: v, not in the model: -"):
        UMT(UMTConfig(teachers={"a": tmp_path / "a.pt"}), 3).build_modules(model)
    with pytest.raises(UserError, match="does not exist"):
        LinearProbe(LinearProbeConfig(checkpoint=tmp_path / "none.pt"), 3).build_modules(model)


def test_ume_loss_is_the_sum_of_unimodal_cross_entropies():
    names = ("a", "v", "t")
    model, batch = _model(names, fusion="late"), _batch(names)
    out = model(batch.inputs)
    loss = UME(UMEConfig(), 3).loss(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    expected = sum(
        F.cross_entropy(model.fusion.heads[m](model.encoders[m](batch.inputs[m])), batch.label)
        for m in names
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()  # no gradient crosses modalities: head a's gradient is CE(z_a)'s alone
    za = model.fusion.heads["a"](model.encoders["a"](batch.inputs["a"]))
    (g,) = torch.autograd.grad(F.cross_entropy(za, batch.label), [model.fusion.heads["a"].weight])
    assert torch.allclose(model.fusion.heads["a"].weight.grad, g, atol=1e-7)


def test_distillation_loss_by_hand():
    h = {"a": torch.tensor([[1.0, 2.0]]), "v": torch.tensor([[0.0, 0.0], [1.0, 1.0]])}
    t = {"a": torch.tensor([[0.0, 0.0]]), "v": torch.tensor([[1.0, 0.0], [1.0, 3.0]])}
    assert distillation_loss(h, t).item() == pytest.approx((1 + 4) / 2 + (1 + 0 + 0 + 4) / 4)


def test_umt_distils_frozen_teachers(tmp_path):
    names = ("a", "v")
    teachers = {m: _save_model(tmp_path / f"{m}.pt", (m,), seed=i) for i, m in enumerate(names)}
    model, batch = _model(names), _batch(names)
    method = UMT(UMTConfig(teachers={m: tmp_path / f"{m}.pt" for m in names}, scaling=10.0), 3)
    assert len(method.build_modules(model)) == 0  # teachers are not trained or checkpointed
    out = model(batch.inputs)
    loss = method.loss(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    with torch.no_grad():
        targets = {m: teachers[m].encoders[m].eval()(batch.inputs[m]) for m in names}
    mse = sum(((out.features[m] - targets[m]) ** 2).mean() for m in names)
    expected = F.cross_entropy(out.logits, batch.label) + 10.0 * mse
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert all(p.grad is None for t in method.teachers.values() for p in t.parameters())


# ---------------------------------------------------------------- recipes, resume, training


@pytest.mark.parametrize(
    ("method", "changes", "field"),
    [
        ({"name": "mmpareto"}, {"data__modalities": ["a"]}, "data.modalities"),
        ({"name": "mmpareto", "gamma": 0}, {}, "gamma"),
        ({"name": "relearning"}, {"data__modalities": ["a"]}, "data.modalities"),
        ({"name": "relearning", "reinit_epoch": 0}, {}, "reinit_epoch"),
        ({"name": "relearning", "move_lambda": -1}, {}, "move_lambda"),
        ({"name": "gblending"}, {"data__modalities": ["a"]}, "data.modalities"),
        ({"name": "gblending", "v_rate": 1.0}, {}, "v_rate"),
        ({"name": "gblending", "schedule": "sometimes"}, {}, "schedule"),
        ({"name": "linear_probe"}, {}, "checkpoint"),
        ({"name": "ume"}, {"model__fusion": "concat"}, "model.fusion"),
        ({"name": "ume"}, {"model__fusion": "late", "data__modalities": ["a"]}, "data.modalities"),
        ({"name": "umt", "teachers": {"a": "a.pt"}}, {"data__modalities": ["a", "b"]}, "teachers"),
        ({"name": "umt", "teachers": {}, "scaling": -1}, {}, "scaling"),
    ],
)
def test_recipe_errors(recipe_file, method, changes, field):
    with pytest.raises(UserError, match=field):
        load_recipe(recipe_file(method=method, **changes))


@pytest.mark.parametrize(
    "method",
    [
        {"name": "relearning", "reinit_epoch": 1, "reinit_num": 1},
        {"name": "gblending", "super_epoch": 3},  # resumes on the weights of epoch 0
    ],
)
def test_resume_matches_an_uninterrupted_run(recipe_file, method):
    assert_resume_matches(
        load_recipe(recipe_file(method=method, train__epochs=3, data__modalities=["a", "b"]))
    )
