"""MBSD, AMCo and ReconBoost: their arithmetic against independent computations, recipe
errors, resume, and short training runs on uci-mfeat (6 modalities) and synthetic audio-visual
clips (ResNet-18)."""

from __future__ import annotations

import contextlib
import copy
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmval.artifacts.checkpoint import Checkpoint, DataInfo, save_checkpoint
from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.amco import AMCo, AMCoConfig, dependent_shares, mask_ratio
from mmval.methods.base import StepTools, TrainContext
from mmval.methods.mbsd import MBSD, MBSDConfig, mbsd_loss
from mmval.methods.reconboost import (
    ReconBoost,
    ReconBoostConfig,
    boosting_loss,
    consolidation_loss,
)
from mmval.models import ModelConfig, build_model
from mmval.models.fusions.shared import SharedFusionConfig
from mmval.recipe import load_recipe
from mmval.settings import SETTING, identity
from tests.conftest import assert_resume_matches, assert_trained, quick_recipe, trained


def _model(names, num_classes=3, seed=0):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    encoder = {"hidden": [5], "out_dim": 4, "dropout": 0.0}
    return build_model(ModelConfig(encoder=encoder, fusion="concat"), specs, num_classes)


def _batch(names, n=6, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % num_classes,
        index=torch.arange(n),
    )


# ---------------------------------------------------------------- MBSD


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _ce(row, y):
    return -math.log(_softmax(row)[y])


def _pair_by_hand(zi, zj, labels):
    """BalanceBenchmark's per-sample loop on plain floats, with the log its KL misses."""
    total = 0.0
    for a, b, y in zip(zi, zj, labels, strict=True):
        pa, pb = _softmax(a)[y], _softmax(b)[y]
        right = (
            max(range(len(a)), key=a.__getitem__) == y or max(range(len(b)), key=b.__getitem__) == y
        )
        w = max(pa, pb) - min(pa, pb) if right else 0.0
        rs = sum((u - v) ** 2 for u, v in zip(a, b, strict=True)) / len(a)
        kl = min(pa, pb) * (math.log(min(pa, pb)) - math.log(max(pa, pb)))
        total += w * (rs + kl)
    return total / len(labels)


Z1 = [[2.0, 0.0, -1.0], [0.5, 0.3, 0.1], [-1.0, 1.0, 0.0], [0.0, 0.2, 3.0]]
Z2 = [[0.1, 0.4, 0.0], [1.5, -0.5, 0.2], [0.0, 0.0, 2.0], [1.0, 0.5, -0.3]]
Z3 = [[0.0, 2.0, 0.0], [0.2, 0.1, 0.0], [0.3, 0.9, -2.0], [0.5, 0.5, 0.6]]
Y = [0, 1, 2, 2]  # sample 1: both wrong, so its weight is 0


def test_mbsd_two_modality_loss_matches_the_hand_computation():
    fused = [[a + b for a, b in zip(r1, r2, strict=True)] for r1, r2 in zip(Z1, Z2, strict=True)]
    want = (
        sum(_ce(r, y) for r, y in zip(fused, Y, strict=True)) / 4
        + sum(_ce(r, y) for r, y in zip(Z1, Y, strict=True)) / 4
        + sum(_ce(r, y) for r, y in zip(Z2, Y, strict=True)) / 4
        + _pair_by_hand(Z1, Z2, Y)
    )
    z1, z2, label = torch.tensor(Z1), torch.tensor(Z2), torch.tensor(Y)
    got = mbsd_loss(z1 + z2, [z1, z2], label)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_mbsd_averages_the_pair_terms_over_all_pairs_for_three_modalities():
    z = [torch.tensor(t) for t in (Z1, Z2, Z3)]
    label = torch.tensor(Y)
    fused = z[0] + z[1] + z[2]
    ce = F.cross_entropy(fused, label) + sum(F.cross_entropy(t, label) for t in z)
    pairs = (_pair_by_hand(Z1, Z2, Y) + _pair_by_hand(Z1, Z3, Y) + _pair_by_hand(Z2, Z3, Y)) / 3
    assert mbsd_loss(fused, z, label).item() == pytest.approx(ce.item() + pairs, rel=1e-6)


def test_mbsd_stays_finite_when_a_true_class_probability_underflows():
    z1 = torch.tensor([[200.0, -200.0], [0.0, 1.0]])
    z2 = torch.tensor([[-200.0, 200.0], [1.0, 0.0]])
    label = torch.tensor([0, 1])
    assert torch.isfinite(mbsd_loss(z1 + z2, [z1, z2], label))


def test_mbsd_is_plain_cross_entropy_outside_the_window():
    model, batch = _model("ab"), _batch("ab")
    method = MBSD(MBSDConfig(modulation_starts=1, modulation_ends=2), 3)
    out = model(batch.inputs)
    for epoch, full in ((0, False), (1, True), (2, True), (3, False)):
        got = method.loss(model, out, batch, TrainContext(epoch=epoch, epochs=4, step=0))
        plain = F.cross_entropy(out.logits, batch.label)
        assert torch.allclose(got, plain) is not full


# ---------------------------------------------------------------- AMCo


def test_amco_mask_ratio_schedule():
    assert mask_ratio(5, 0, 0.3) == 0.0  # epoch 0: l_t never grows
    assert mask_ratio(1, 1, 0.3) == pytest.approx(math.sin(math.pi / 6))  # l_t = 0.1
    assert mask_ratio(3, 1, 0.3) == pytest.approx(1.0)
    assert mask_ratio(1, 5, 0.3) == pytest.approx(1.0)  # l_t = 0.5, clipped at eps


def test_amco_dependent_shares_match_the_joint_softmax_by_hand():
    za, zb = [[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [1.0, -1.0]]
    want_a = 0.0
    for ra, rb in zip(za, zb, strict=True):
        e = [math.exp(v) for v in ra + rb]
        want_a += sum(e[:2]) / sum(e) / 2
    got = dependent_shares([torch.tensor(za), torch.tensor(zb)])
    assert got.tolist() == pytest.approx([want_a, 1 - want_a])


def test_amco_masks_the_flagged_modality_and_flags_by_shares():
    model, batch = _model("abc", num_classes=4), _batch("abc", n=8, num_classes=4)
    method = AMCo(AMCoConfig(), 4)
    ctx = TrainContext(epoch=1, epochs=3, step=0)
    method.on_epoch_start(model, ctx)
    plain = model(batch.inputs)
    method.forward(model, batch, ctx)  # batch 0 of the epoch: ratio 0, nothing flagged yet
    method.dependent = {"a"}
    torch.manual_seed(7)
    out = method.forward(model, batch, ctx)  # batch 1 of epoch 1: ratio 1/2, 2 of 4 classes
    torch.manual_seed(7)
    zeroed = torch.randperm(4)[:2]
    mask = torch.ones(4)
    mask[zeroed] = 0
    assert method.ratio == pytest.approx(0.5)
    assert torch.allclose(out.unimodal_logits["a"], plain.unimodal_logits["a"] * mask)
    for m in "bc":
        assert torch.allclose(out.unimodal_logits[m], plain.unimodal_logits[m])
    assert torch.allclose(out.logits, sum(out.unimodal_logits.values()), atol=1e-6)
    loss = method.loss(model, out, batch, ctx)
    want = F.cross_entropy(out.logits, batch.label) + sum(
        F.cross_entropy(z, batch.label) for z in out.unimodal_logits.values()
    )
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    method.config.sigma = 0.3
    figures = method.after_backward(model, out, batch, ctx)
    shares = dependent_shares([out.unimodal_logits[m] for m in "abc"])
    assert method.dependent == {m for m, s in zip("abc", shares.tolist(), strict=True) if s > 0.3}
    assert figures == {"mask_ratio": pytest.approx(0.5), "masked_modalities": 1.0}
    outside = TrainContext(epoch=90, epochs=91, step=0)
    method.dependent = {"a", "b", "c"}
    out = method.forward(model, batch, outside)
    assert torch.allclose(out.logits, plain.logits)
    assert method.loss(model, out, batch, outside).item() == pytest.approx(
        F.cross_entropy(plain.logits, batch.label).item(), rel=1e-6
    )


# ---------------------------------------------------------------- ReconBoost


def test_reconboost_boosting_loss_matches_the_hand_computation():
    want = empty = 0.0
    for zo, zr, y in zip(Z1, Z2, Y, strict=True):
        q = _softmax(zr)[y]
        want += (-5.0 + 1.0 * q) * math.log(_softmax(zo)[y]) / 3
        empty += (-5.0 + 1.0) * math.log(_softmax(zo)[y]) / 3  # no ensemble yet: q = 1
    z1, label = torch.tensor(Z1), torch.tensor(Y)
    got = boosting_loss(z1, torch.tensor(Z2), label, 5.0, 1.0)
    assert got.item() == pytest.approx(want / 4, rel=1e-6)
    assert boosting_loss(z1, None, label, 5.0, 1.0).item() == pytest.approx(empty / 4, rel=1e-6)


@pytest.mark.parametrize("grad", [False, True])
def test_reconboost_consolidation_is_detached_as_the_official_code_unless_asked(grad):
    want = 0.0
    for r1, r2 in zip(Z1, Z2, strict=True):
        want += sum((a - b) ** 2 for a, b in zip(_softmax(r1), _softmax(r2), strict=True))
    z1 = torch.tensor(Z1, requires_grad=True)
    z2 = torch.tensor(Z2, requires_grad=True)
    got = consolidation_loss(z1, z2, grad)
    assert got.item() == pytest.approx(want / 12, rel=1e-6)
    assert got.requires_grad == grad
    if grad:
        got.backward()
        assert z1.grad is not None and z1.grad.abs().sum() > 0 and z2.grad is None


def _phases(config, epochs, names="abc"):
    return [
        (p.stage, p.learner, p.previous, p.boosting, "".join(p.ensemble))
        for p in (config.phase(e, list(names)) for e in range(epochs))
    ]


def test_reconboost_schedule_cycles_the_modalities_and_grows_the_ensemble():
    grow = ReconBoostConfig(boost_epochs=2, rectify_epochs=1)
    assert _phases(grow, 12) == [
        (0, "a", None, True, ""),
        (0, "a", None, True, ""),
        (0, "a", None, False, "a"),
        (1, "b", "a", True, "a"),
        (1, "b", "a", True, "a"),
        (1, "b", "a", False, "ab"),
        (2, "c", "b", True, "ab"),
        (2, "c", "b", True, "ab"),
        (2, "c", "b", False, "abc"),
        (3, "a", "c", True, "bc"),  # the newest learner of a replaces the old one
        (3, "a", "c", True, "bc"),
        (3, "a", "c", False, "abc"),
    ]
    full = ReconBoostConfig(boost_epochs=1, rectify_epochs=1, full_ensemble=True)
    assert _phases(full, 4, "ab") == [
        (0, "a", None, True, "b"),
        (0, "a", None, False, "ab"),
        (1, "b", "a", True, "a"),
        (1, "b", "a", False, "ab"),
    ]
    boost_only = ReconBoostConfig(boost_epochs=1, rectify_epochs=0)
    assert _phases(boost_only, 3, "ab") == [
        (0, "a", None, True, ""),
        (1, "b", "a", True, "a"),
        (2, "a", "b", True, "b"),
    ]


def _reconboost_setup(config, names="ab"):
    model, batch = _model(names), _batch(names)
    ref = copy.deepcopy(model)
    method = ReconBoost(config, 3)
    modules = method.build_modules(model)
    params = [*model.parameters(), *modules.parameters()]
    tools = StepTools(torch.optim.SGD(params, lr=0.5), contextlib.nullcontext)
    return model, batch, ref, method, tools


def _concat_logits(ref, batch, trained):
    """Each modality's share of the concat head, h_m W_m^T + b / 2, by hand; encoders outside
    `trained` run without gradient."""
    out = {}
    for k, m in enumerate("ab"):
        h = ref.encoders[m](batch.inputs[m])
        h = h if m in trained else h.detach()
        w = ref.fusion.fc.weight[:, 4 * k : 4 * k + 4]
        out[m] = h @ w.T + ref.fusion.fc.bias / 2
    return out


def _sgd_by_hand(ref, lr=0.5):
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def _same_parameters(model, ref):
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6), name


@pytest.mark.parametrize(
    ("epoch", "grad"), [(0, False), (2, False), (2, True)], ids=["stage0", "stage1", "grad"]
)
def test_reconboost_boosting_step_trains_only_the_learner(epoch, grad):
    config = ReconBoostConfig(boost_epochs=1, rectify_epochs=1, boost_rate=0.5, alpha=0.5)
    config = config.model_copy(update={"consolidation_grad": grad})
    model, batch, ref, method, tools = _reconboost_setup(config)
    result = method.train_step(model, batch, TrainContext(epoch=epoch, epochs=4, step=0), tools)
    # by hand: stage 0 boosts a with an empty ensemble (q = 1); stage 1 boosts b against
    # 0.5 z_a, with the consolidation term towards a (no gradient unless asked)
    learner, other = ("a", "b") if epoch == 0 else ("b", "a")
    z = _concat_logits(ref, batch, learner)
    rows = torch.arange(6)
    log_p = z[learner].log_softmax(1)[rows, batch.label]
    if epoch == 0:
        q = torch.ones(6)
        ensemble = 0.5 * z[learner]
    else:
        q = (0.5 * z[other]).detach().softmax(1)[rows, batch.label]
        ensemble = 0.5 * (z["a"] + z["b"])
    boost = ((-5 + q) * log_p).mean() / 3
    loss = boost
    if epoch > 0:
        mse = ((z["b"].softmax(1) - z["a"].detach().softmax(1)) ** 2).mean()
        loss = boost + 0.5 * (mse if grad else mse.detach())
        assert result.figures["consolidation"] == pytest.approx(mse.item(), rel=1e-6)
    loss.backward()
    _sgd_by_hand(ref)
    assert ref.encoders[other].net[1].weight.grad is None  # the other encoder stays as it was
    _same_parameters(model, ref)
    assert method.boost.rate.item() == 0.5  # b is trained by the rectification only
    assert result.figures["boost_loss"] == pytest.approx(boost.item(), rel=1e-6)
    ce = F.cross_entropy(ensemble, batch.label)
    assert result.loss.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("epoch", [1, 3])
def test_reconboost_rectification_trains_the_ensemble_and_its_scale(epoch):
    config = ReconBoostConfig(boost_epochs=1, rectify_epochs=1, boost_rate=0.5)
    model, batch, ref, method, tools = _reconboost_setup(config)
    result = method.train_step(model, batch, TrainContext(epoch=epoch, epochs=4, step=0), tools)
    # by hand: after stage 0 only a is in the ensemble, after stage 1 both are
    members = "a" if epoch == 1 else "ab"
    z = _concat_logits(ref, batch, members)
    rate = torch.tensor(0.5, requires_grad=True)
    ce = F.cross_entropy(rate * sum(z[m] for m in members), batch.label)
    ce.backward()
    _sgd_by_hand(ref)
    if epoch == 1:
        assert ref.encoders["b"].net[1].weight.grad is None
    _same_parameters(model, ref)
    assert method.boost.rate.item() == pytest.approx(0.5 - 0.5 * rate.grad.item(), rel=1e-6)
    assert result.loss.item() == pytest.approx(ce.item(), rel=1e-6)
    assert result.figures == {}


def _save_unimodal(path, modality, seed):
    """An mmval checkpoint of a unimodal model on `modality` (what a unimodal run's best.pt
    holds for ReconBoost: the weights and the modalities)."""
    model = _model([modality], seed=seed)
    data = DataInfo(path="", dataset="", fingerprint="", classes=[], modalities=[modality])
    save_checkpoint(path, Checkpoint(recipe={}, data=data, model=model.state_dict(), epoch=1))
    return model


def test_reconboost_starts_its_encoders_from_local_unimodal_checkpoints(tmp_path):
    # train.py --use_pretrain: init_pretrain(model_audio, --m1ckpt), (model_visual, --m2ckpt)
    teachers = {m: _save_unimodal(tmp_path / f"{m}.pt", m, seed=7 + i) for i, m in enumerate("ab")}
    pretrained = {m: tmp_path / f"{m}.pt" for m in "ab"}
    model = _model("ab")
    head = {n: p.detach().clone() for n, p in model.fusion.named_parameters()}
    config = ReconBoostConfig(pretrained=pretrained, full_ensemble=True)
    ReconBoost(config, 3).build_modules(model)
    for m, teacher in teachers.items():
        for (n, got), want in zip(
            model.encoders[m].named_parameters(), teacher.encoders[m].parameters(), strict=True
        ):
            assert torch.equal(got, want), f"{m}.{n}"
    # the unimodal heads are not copied: the official shared head replaces them
    assert all(torch.equal(p, head[n]) for n, p in model.fusion.named_parameters())
    # both learners are in the ensemble from stage 0 (DynamicNet.add of both before stage 0)
    assert config.phase(0, ["a", "b"]).ensemble == ("b",)
    assert config.phase(4, ["a", "b"]).ensemble == ("a", "b")  # rectification of stage 0
    with pytest.raises(UserError, match=r"method\.pretrained.*missing: b"):
        ReconBoost(ReconBoostConfig(pretrained={"a": pretrained["a"]}), 3).build_modules(model)


def test_reconboost_pretrained_needs_one_checkpoint_per_modality(recipe_file):
    method = {"name": "reconboost", "pretrained": {"a": "a.pt", "b": "b.pt"}}
    with pytest.raises(UserError, match=r"method\.pretrained"):
        load_recipe(recipe_file(method=method, model__fusion="sum", data__modalities=["a", "c"]))
    ok = recipe_file(method=method, model__fusion="sum", data__modalities=["a", "b"])
    assert load_recipe(ok).method.pretrained == {"a": Path("a.pt"), "b": Path("b.pt")}


def test_reconboost_published_crema_d_recipe_is_the_official_setting():
    recipes = Path(__file__).parents[1] / "recipes"
    recipe = load_recipe(recipes / "reconboost-crema-d.yaml")
    method = recipe.method
    assert isinstance(method, ReconBoostConfig)
    assert method.full_ensemble and method.pretrained is not None
    assert sorted(method.pretrained) == ["audio", "visual"]
    assert method.phase(0, ["audio", "visual"]).ensemble == ("visual",)
    # models/dynamic_net.py Head: Linear(512, 256)-ReLU-Linear(256, C), shared
    fusion = recipe.model.fusion
    assert isinstance(fusion, SharedFusionConfig) and fusion.hidden == 256
    head = fusion.build({"audio": 512, "visual": 512}, 6).fc
    assert [type(layer) for layer in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features) == (512, 256)
    assert (head[2].in_features, head[2].out_features) == (256, 6)
    scratch = load_recipe(recipes / "reconboost-scratch-crema-d.yaml").method
    assert isinstance(scratch, ReconBoostConfig)
    assert not scratch.full_ensemble and scratch.pretrained is None


# ---------------------------------------------------------------- recipes and runs


@pytest.mark.parametrize("method", ["mbsd", "lfm", "amco", "reconboost"])
@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"model__fusion": "film", "data__modalities": ["a", "b"]}, "model.fusion"),
        ({"data__modalities": ["a"]}, "data.modalities"),
    ],
)
def test_recipe_errors(recipe_file, method, changes, field):
    with pytest.raises(UserError, match=field):
        load_recipe(recipe_file(method={"name": method}, **changes))


def test_amco_needs_an_additive_fusion(recipe_file):
    with pytest.raises(UserError, match=r"model\.fusion"):
        load_recipe(recipe_file(method={"name": "amco"}, model__fusion="late"))


def test_reconboost_needs_a_summed_ensemble(recipe_file):
    method = {"name": "reconboost"}
    with pytest.raises(UserError, match=r"model\.fusion"):
        load_recipe(recipe_file(method=method, model__fusion="shared"))  # dynamic weights
    fixed = {"model__fusion": "shared", "model__fusion_inference": "fixed"}
    assert load_recipe(recipe_file(method=method, **fixed)).method.name == "reconboost"
    equal = {"a": 1.0, "b": 1.0, "c": 1.0}  # the official sum of the learners
    assert load_recipe(recipe_file(method=method, model__fusion_weights=equal, **fixed))
    unequal = {"a": 0.5, "b": 0.3, "c": 0.2}
    with pytest.raises(UserError, match=r"model\.fusion"):
        load_recipe(recipe_file(method=method, model__fusion_weights=unequal, **fixed))
    with pytest.raises(UserError, match=r"model\.mmtm"):
        load_recipe(recipe_file(method=method, model__mmtm={"stages": [1]}))


@pytest.mark.parametrize("method", ["mbsd", "amco"])
def test_window_must_be_ordered(recipe_file, method):
    bad = {"name": method, "modulation_starts": 3, "modulation_ends": 1}
    with pytest.raises(UserError, match=r"method\.modulation_ends"):
        load_recipe(recipe_file(method=bad))


def test_reconboost_trains_on_uci_mfeat_through_all_six_stages(tmp_path, uci_dir):
    method = {"boost_epochs": 1, "rectify_epochs": 1}
    changes = {"data": {"modalities": None}, "method": method}
    recipe = quick_recipe(
        "reconboost", uci_dir, tmp_path / "runs", epochs=12, batch_size=256, changes=changes
    )
    result, metrics = trained(recipe)
    assert_trained(result.summary, metrics, 12)
    boosting = metrics["epoch"] % 2 == 1  # 1-based: odd epochs boost, even ones rectify
    assert metrics.loc[boosting, "method_boost_loss"].notna().all()
    assert metrics.loc[~boosting, "method_boost_loss"].isna().all()
    consolidation = metrics["method_consolidation"]
    assert pd.isna(consolidation.iloc[0]) and consolidation.iloc[2] > 0  # from stage 1 on
    assert metrics["method_boost_rate"].nunique() > 1  # b is learned
    assert result.summary["test_acc"] > 0.5  # ten classes


def test_reconboost_resume_matches_an_uninterrupted_run(recipe_file):
    method = {"name": "reconboost", "boost_epochs": 1, "rectify_epochs": 1}
    recipe = load_recipe(recipe_file(method=method, train__epochs=4))
    metrics = assert_resume_matches(recipe, stop=3)
    assert metrics["method_boost_rate"].nunique() > 1  # b moved, so resume had it to restore


def test_reconboosts_added_fields_leave_older_recipes_their_hash(recipe_file):
    """`method.pretrained` and the shared head's `hidden` came later: at their defaults they are
    out of the run identity, so run folders written before them keep their settings hash."""
    shared = {"name": "shared", "inference": "fixed"}
    recipe = load_recipe(recipe_file(method={"name": "reconboost"}, model__fusion=shared))
    kept = identity(recipe, SETTING)
    assert "pretrained" not in kept["method"] and "hidden" not in kept["model"]["fusion"]
    widened = load_recipe(
        recipe_file(method={"name": "reconboost"}, model__fusion=shared | {"hidden": 8})
    )
    assert widened.settings_hash() != recipe.settings_hash()
