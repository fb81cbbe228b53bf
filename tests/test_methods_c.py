"""TMC, QMF, MLA and late fusion: their fusions and arithmetic against independent
computations, recipe errors, resume, and short training runs on uci-mfeat (6 modalities) and
synthetic audio-visual clips (ResNet-18)."""

from __future__ import annotations

import contextlib
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.base import StepTools, TrainContext
from mmval.methods.late_fusion import LateFusionMethod, LateFusionMethodConfig
from mmval.methods.mla import MLA, MLAConfig, update_projection
from mmval.methods.qmf import QMF, QMFConfig, normalise_history, rank_loss
from mmval.methods.tmc import TMC, TMCConfig, dirichlet_kl_to_uniform, evidential_loss
from mmval.models import ModelConfig, build_model
from mmval.models.fusions.heads import combine_evidence
from mmval.recipe import Recipe, load_recipe
from mmval.settings import SETTING, identity, normalised, resume_refusal


def _model(names, fusion, num_classes=3, seed=0, **extra):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    encoder = {"hidden": [5], "out_dim": 4, "dropout": 0.0}
    return build_model(ModelConfig(encoder=encoder, fusion=fusion, **extra), specs, num_classes)


def _batch(names, n=6, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % num_classes,
        index=torch.arange(n),
    )


# ---------------------------------------------------------------- TMC


def _ds_by_hand(e1: list[float], e2: list[float]) -> list[float]:
    """TMC's DS_Combin_two written out on plain floats: evidence of the combined opinion."""
    c = len(e1)
    s1, s2 = sum(e1) + c, sum(e2) + c
    b1, b2 = [e / s1 for e in e1], [e / s2 for e in e2]
    u1, u2 = c / s1, c / s2
    conflict = sum(b1[i] * b2[j] for i in range(c) for j in range(c) if i != j)
    b = [(b1[i] * b2[i] + b1[i] * u2 + b2[i] * u1) / (1 - conflict) for i in range(c)]
    u = u1 * u2 / (1 - conflict)
    return [bi * c / u for bi in b]


def test_tmc_combination_of_two_views_matches_the_hand_computation():
    e1, e2 = [2.0, 1.0, 0.0], [1.0, 0.0, 3.0]
    got = combine_evidence(torch.tensor([e1]), torch.tensor([e2]))[0]
    assert got.tolist() == pytest.approx(_ds_by_hand(e1, e2))
    # three views fold as ((1 + 2) + 3)
    e3 = [0.5, 4.0, 0.2]
    folded = _ds_by_hand(_ds_by_hand(e1, e2), e3)
    model = _model("abc", "tmc")
    fused = model.fusion.combine([torch.tensor([e]) for e in (e1, e2, e3)])[0]
    assert fused.tolist() == pytest.approx(folded, rel=1e-5)


def test_tmc_fusion_logits_are_log_alpha_and_softmax_is_the_dirichlet_mean():
    model = _model("ab", "tmc").eval()
    batch = _batch("ab")
    out = model(batch.inputs)
    feats = out.features
    e = {m: F.softplus(model.fusion.heads[m](feats[m])) for m in "ab"}
    alpha = torch.stack(
        [torch.tensor(_ds_by_hand(e["a"][i].tolist(), e["b"][i].tolist())) for i in range(6)]
    )
    alpha = alpha + 1
    assert torch.allclose(out.logits.exp(), alpha, atol=1e-4)
    assert torch.allclose(out.logits.softmax(1), alpha / alpha.sum(1, keepdim=True), atol=1e-5)
    assert torch.allclose(out.unimodal_logits["a"], torch.log1p(e["a"]), atol=1e-6)
    # a removed modality (zeroed features, as the valuation engine does) stays well-defined
    zeroed = model.fuse({"a": torch.zeros(2, 4), "b": feats["b"][:2]})
    assert torch.isfinite(zeroed).all()


def test_tmc_loss_terms_against_independent_computations():
    torch.manual_seed(0)
    alpha = torch.tensor([[3.0, 1.5, 2.0], [1.2, 6.0, 1.0]], dtype=torch.float64)
    label = torch.tensor([0, 2])
    # expected cross-entropy under the Dirichlet, by sampling
    samples = torch.distributions.Dirichlet(alpha).sample((400_000,))
    expected_ce = -samples.gather(2, label[None, :, None].expand(400_000, 2, 1)).log().mean(0)
    plain = evidential_loss(alpha, label, kl_weight=0.0)
    assert plain.tolist() == pytest.approx(expected_ce[:, 0].tolist(), abs=5e-3)
    # KL(Dir(alpha~) || Dir(1)) against torch.distributions, alpha~ without the true class
    tilde = torch.tensor([[1.0, 1.5, 2.0], [1.2, 6.0, 1.0]], dtype=torch.float64)
    kl = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(tilde), torch.distributions.Dirichlet(torch.ones(2, 3))
    )
    assert dirichlet_kl_to_uniform(tilde).tolist() == pytest.approx(kl.tolist())
    full = evidential_loss(alpha, label, kl_weight=0.3)
    assert (full - plain).tolist() == pytest.approx((0.3 * kl).tolist())


def test_tmc_loss_sums_views_and_fusion_with_the_annealed_kl():
    model = _model("abc", "tmc")
    batch = _batch("abc")
    out = model(batch.inputs)
    method = TMC(TMCConfig(lambda_epochs=4), 3)
    ctx = TrainContext(epoch=1, epochs=10, step=0)
    assert method.kl_weight(ctx) == 0.5  # (1 + 1) / 4: the official epoch counts from 1
    assert method.kl_weight(TrainContext(epoch=9, epochs=10, step=0)) == 1.0
    e = [F.softplus(model.fusion.heads[m](out.features[m])) for m in "abc"]
    fused = combine_evidence(combine_evidence(e[0], e[1]), e[2])
    expected = sum(evidential_loss(x + 1, batch.label, 0.5) for x in [*e, fused]).mean()
    assert method.loss(model, out, batch, ctx).item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- QMF


def test_qmf_fusion_weights_by_energy_without_gradient_through_them():
    model = _model("ab", "qmf")
    batch = _batch("ab")
    out = model(batch.inputs)
    z = out.unimodal_logits
    w = {m: torch.log(torch.exp(z[m].detach()).sum(1, keepdim=True)) / 10 for m in "ab"}
    manual = w["a"] * z["a"] + w["b"] * z["b"]
    assert torch.allclose(out.logits, manual, atol=1e-6)
    weight = model.fusion.heads["a"].weight
    (got,) = torch.autograd.grad(out.logits.sum(), weight, retain_graph=True)
    (want,) = torch.autograd.grad(manual.sum(), weight)
    assert torch.allclose(got, want, atol=1e-6)
    confidence = model.fusion.confidence(z["a"])
    assert confidence.requires_grad and torch.allclose(confidence[:, None], w["a"], atol=1e-6)


def test_qmf_history_accumulates_grows_and_normalises():
    method = QMF(QMFConfig(), 3)
    method.record(torch.tensor([0, 2]), torch.tensor([[1.0, 2.0], [0.5, 0.25]]))
    method.record(torch.tensor([2, 4]), torch.tensor([[3.0, 1.0], [1.0, 1.0]]))
    assert method.history.tolist() == [[1.0, 0.0, 5.0, 0.0, 1.0], [0.5, 0.0, 1.25, 0.0, 1.0]]
    history = torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)
    values = torch.tensor([4.0, 6.0], dtype=torch.float64)
    # unvisited samples remain: the minimum is the official array's 0
    assert normalise_history(values, history, complete=False).tolist() == [4 / 6, 1.0]
    assert normalise_history(values, history, complete=True).tolist() == [0.5, 1.0]
    flat = torch.full((3,), 2.0, dtype=torch.float64)
    assert normalise_history(values, flat, complete=True).tolist() == [0.0, 0.0]


def test_qmf_rank_loss_by_hand():
    conf = [0.5, 0.2, 0.9, 0.4]
    past = [1.0, 0.0, 0.5, 0.5]
    terms = []
    for i in range(4):
        j = (i + 1) % 4
        t = (past[i] > past[j]) - (past[i] < past[j])
        partner = conf[j] + abs(past[i] - past[j]) / (t if t != 0 else 1)
        terms.append(max(0.0, t * (conf[i] - partner)))  # MarginRankingLoss, y = -t, margin 0
    got = rank_loss(torch.tensor(conf), torch.tensor(past), torch.tensor(past).roll(-1))
    assert got.item() == pytest.approx(sum(terms) / 4)
    assert sum(terms) > 0  # the example exercises a violated pair


def test_qmf_loss_updates_history_before_the_rank_loss():
    model = _model("abc", "qmf")
    batch = _batch("abc")
    batch.index = torch.tensor([5, 1, 3, 0, 2, 4])
    out = model(batch.inputs)
    method = QMF(QMFConfig(rank_weight=2.0), 3)
    loss = method.loss(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    z = out.unimodal_logits
    ce = {m: F.cross_entropy(z[m], batch.label, reduction="none").detach() for m in "abc"}
    for k, m in enumerate("abc"):
        assert method.history[k, batch.index].tolist() == pytest.approx(ce[m].tolist())
    expected = F.cross_entropy(out.logits, batch.label) + sum(c.mean() for c in ce.values())
    for k, m in enumerate("abc"):
        past = method.history[k, batch.index] / method.history[k].max()  # min 0 (first epoch)
        past = past.float()
        expected = expected + 2.0 * rank_loss(model.fusion.confidence(z[m]), past, past.roll(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------- MLA


def test_mla_projection_update_by_hand():
    p = torch.eye(2, dtype=torch.float64)
    update_projection(p, torch.tensor([1.0, 0.0], dtype=torch.float64), a=0.1)
    first = 1 - 1 / 1.1
    norm = math.sqrt(first**2 + 1)
    assert p.flatten().tolist() == pytest.approx([first / norm, 0.0, 0.0, 1 / norm])
    # a general step against the OWM formula with the scalar denominator
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 3, generator=g, dtype=torch.float64)
    q = q @ q.T
    r = torch.randn(3, generator=g, dtype=torch.float64)
    k = q @ r
    want = q - torch.outer(k, k) / (0.05 + r @ k)
    want = want / want.pow(2).sum().sqrt()
    update_projection(q, r, a=0.05)
    assert torch.allclose(q, want)


def test_shared_fusion_entropy_and_fixed_weights():
    model = _model("ab", "shared").eval()
    feats = {m: torch.randn(4, 4) for m in "ab"}
    z = {m: model.fusion.fc(feats[m]) for m in "ab"}
    out = model.fuse(feats)
    for i in range(4):
        ent = {}
        for m in "ab":
            p = [math.exp(v) for v in z[m][i].tolist()]
            p = [v / sum(p) for v in p]
            ent[m] = -sum(v * math.log(v) for v in p)
        top = max(ent.values())
        gate = {m: math.exp(top - ent[m]) for m in "ab"}
        lam = {m: gate[m] / sum(gate.values()) for m in "ab"}
        want = lam["a"] * z["a"][i] + lam["b"] * z["b"][i]
        assert torch.allclose(out[i], want, atol=1e-6)
    fixed = _model("ab", "shared", fusion_inference="fixed", fusion_weights={"a": 0.7, "b": 0.3})
    fixed.eval()
    zf = {m: fixed.fusion.fc(feats[m]) for m in "ab"}
    assert torch.allclose(fixed.fuse(feats), 0.7 * zf["a"] + 0.3 * zf["b"], atol=1e-6)
    uniform = _model("abc", "shared", fusion_inference="fixed").eval()
    feats3 = {m: torch.randn(4, 4) for m in "abc"}
    z3 = sum(uniform.fusion.fc(feats3[m]) for m in "abc") / 3
    assert torch.allclose(uniform.fuse(feats3), z3, atol=1e-6)


def test_shared_fusion_batch_weights_follow_the_official_pooled_entropy():
    """`dynamic_batch`: main.py's calculate_entropy (softmax over the batch axis, entropy summed
    over samples and classes) and calculate_gating_weights, one weight per modality per batch."""
    model = _model("ab", "shared", fusion_inference="dynamic_batch").eval()
    per_sample = _model("ab", "shared").eval()
    per_sample.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(3)
    feats = {"a": 3 * torch.randn(5, 4, generator=g), "b": torch.randn(5, 4, generator=g)}
    z = {m: model.fusion.fc(feats[m]) for m in "ab"}
    ent = {}
    for m in "ab":
        rows = z[m].tolist()
        total = 0.0
        for c in range(3):
            column = [math.exp(row[c]) for row in rows]
            p = [v / sum(column) for v in column]
            total -= sum(v * math.log(v) for v in p)
        ent[m] = total
    top = max(ent.values())
    gate = {m: math.exp(top - ent[m]) for m in "ab"}
    lam = {m: gate[m] / sum(gate.values()) for m in "ab"}
    want = lam["a"] * z["a"] + lam["b"] * z["b"]
    assert torch.allclose(model.fuse(feats), want, atol=1e-6)
    pooled = model.fusion.lambdas(z)
    assert torch.allclose(pooled, torch.tensor([[lam["a"]], [lam["b"]]]).expand(2, 5))
    # not the batch mean of the per-sample weights
    mean = per_sample.fusion.lambdas(z).mean(1, keepdim=True).expand(2, 5)
    assert not torch.allclose(pooled, mean, atol=1e-3)


def test_shared_fusion_refuses_unequal_sizes_and_stray_weights():
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in "ab"]
    sizes = ModelConfig(encoders={"a": {"out_dim": 4}, "b": {"out_dim": 8}}, fusion="shared")
    with pytest.raises(UserError, match="out_dim"):
        build_model(sizes, specs, 3)
    stray = ModelConfig(fusion="shared", fusion_weights={"a": 1.0, "b": 0.0})
    with pytest.raises(UserError, match=r"model\.fusion\.weights"):
        build_model(stray, specs, 3)  # dynamic inference reads no weights


def _alternating_by_hand(ref, batch, project: bool, lr: float):
    """The official alternating steps written out (plain SGD), optionally with the OWM
    projection of the head's gradient after the run's first update; (P, losses)."""
    p = torch.eye(4)
    losses = []
    for k, m in enumerate("ab"):
        ref.zero_grad()
        h = ref.encoders[m](batch.inputs[m])
        loss = F.cross_entropy(ref.fusion.fc(h), batch.label)
        loss.backward()
        losses.append(loss.item())
        if project and k > 0:
            r = h.detach().mean(0)
            kk = p @ r
            p = p - torch.outer(kk, kk) / (0.1 + r @ kk)
            p = p / p.norm()
            ref.fusion.fc.weight.grad = ref.fusion.fc.weight.grad @ p.T
        with torch.no_grad():
            for q in ref.parameters():
                if q.grad is not None:
                    q -= lr * q.grad
    return p, losses


def test_mla_by_default_steps_each_modality_in_turn_without_projection():
    """The official code as released: the head's gradient is the plain CE gradient."""
    model = _model("ab", "shared")
    batch = _batch("ab")
    ref = copy.deepcopy(model)
    method = MLA(MLAConfig(), 3)
    assert method.config.projection == "none"
    tools = StepTools(torch.optim.SGD(model.parameters(), lr=0.5), contextlib.nullcontext)
    ctx = TrainContext(epoch=0, epochs=1, step=0, steps_per_epoch=4)
    method.on_epoch_start(model, ctx)
    for _ in range(2):  # the second batch too: P would have moved by then
        method.train_step(model, batch, ctx, tools)
        ctx.step += 1
    for _ in range(2):
        _alternating_by_hand(ref, batch, project=False, lr=0.5)
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6), name
    assert method.projection is None
    assert method.updates == 4


def test_mla_steps_each_modality_in_turn_and_projects_after_the_first_update():
    model = _model("ab", "shared")
    batch = _batch("ab")
    ref = copy.deepcopy(model)
    method = MLA(MLAConfig(projection="owm"), 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tools = StepTools(optimizer, contextlib.nullcontext)
    ctx = TrainContext(epoch=0, epochs=1, step=0, steps_per_epoch=4)
    method.on_epoch_start(model, ctx)
    result = method.train_step(model, batch, ctx, tools)
    # by hand: step on a (no projection: first update of the run), then on b, projected
    p, losses = _alternating_by_hand(ref, batch, project=True, lr=0.5)
    for (name, got), want in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(got, want, atol=1e-6), name
    assert torch.allclose(method.projection, p, atol=1e-6)
    assert method.updates == 2
    assert result.loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert result.figures == pytest.approx({"loss_a": losses[0], "loss_b": losses[1]})


def test_mla_runs_written_before_the_projection_field_stay_projected(recipe_file):
    """Old runs projected: their stored recipes (no `projection`) read as `owm`, keep their
    identity (so their settings hash), and are not taken for a run of the new default."""
    new = load_recipe(recipe_file(method={"name": "mla"}, model__fusion="shared"))
    owm = load_recipe(
        recipe_file(method={"name": "mla", "projection": "owm"}, model__fusion="shared")
    )
    old_dump = owm.model_dump(mode="json")
    del old_dump["method"]["projection"]  # what mmval wrote before the field
    old = normalised(Recipe, old_dump)
    assert old is not None and old.method.projection == "owm"
    assert identity(old, SETTING)["method"] == {"name": "mla"}  # as the old runs' hash had it
    assert old.settings_hash() == owm.settings_hash() != new.settings_hash()
    refusal = resume_refusal(old, new)
    assert refusal is not None and "method.projection" in refusal


# ---------------------------------------------------------------- late fusion


def test_late_fusion_loss_adds_the_unimodal_cross_entropies():
    model = _model("abc", "late")
    batch = _batch("abc")
    out = model(batch.inputs)
    z = {m: model.fusion.heads[m](out.features[m]) for m in "abc"}
    fused = (z["a"] + z["b"] + z["c"]) / 3
    assert torch.allclose(out.logits, fused, atol=1e-6)
    ctx = TrainContext(epoch=0, epochs=1, step=0)
    unimodal = sum(F.cross_entropy(z[m], batch.label) for m in "abc")
    for weight in (1.0, 0.0):
        method = LateFusionMethod(LateFusionMethodConfig(unimodal_weight=weight), 3)
        want = F.cross_entropy(fused, batch.label) + weight * unimodal
        assert method.loss(model, out, batch, ctx).item() == pytest.approx(want.item(), rel=1e-6)


# ---------------------------------------------------------------- recipes, resume, training


@pytest.mark.parametrize(
    ("method", "changes", "field"),
    [
        ({"name": "tmc"}, {"model__fusion": "concat"}, "model.fusion"),
        ({"name": "tmc", "lambda_epochs": 0}, {"model__fusion": "tmc"}, "lambda_epochs"),
        ({"name": "tmc"}, {"model__fusion": "tmc", "data__modalities": ["a"]}, "modalities"),
        ({"name": "qmf"}, {"model__fusion": "late"}, "model.fusion"),
        ({"name": "qmf", "rank_weight": -1}, {"model__fusion": "qmf"}, "rank_weight"),
        ({"name": "mla"}, {"model__fusion": "concat"}, "model.fusion"),
        ({"name": "mla"}, {"model__fusion": "shared", "data__modalities": ["b"]}, "modalities"),
        ({"name": "mla"}, {"model__fusion_inference": "mean"}, "fusion_inference"),
        ({"name": "mla", "projection": "gem"}, {"model__fusion": "shared"}, "projection"),
        ({"name": "late_fusion"}, {"model__fusion": "sum"}, "model.fusion"),
        ({"name": "late_fusion", "unimodal_weight": -1}, {"model__fusion": "late"}, "unimodal"),
    ],
)
def test_recipe_errors(recipe_file, method, changes, field):
    with pytest.raises(UserError, match=field):
        load_recipe(recipe_file(method=method, **changes))
