"""LFM against the official code (njustkmg/NeurIPS24-LFM, Crema_epoch_learnable.py): the starting
weights 0.05 / 0.95, classification by the mean of the heads' logits (late fusion), the weight
step as a Hessian-vector product checked by hand, the held-out samples and the
model's mode for it, old recipes, the CREMA-D recipe, and resume."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.base import TrainContext
from mmval.methods.lfm import LFM, LFMConfig, alignment_loss, alpha_gradient, js_divergence
from mmval.models import ModelConfig, build_model
from mmval.recipe import load_recipe
from tests.conftest import assert_resume_matches

RECIPES = Path(__file__).parents[1] / "recipes"


def _model(names="ab", fusion="late", num_classes=3, seed=0):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    encoder = {"hidden": [5], "out_dim": 4, "dropout": 0.0}
    return build_model(ModelConfig(encoder=encoder, fusion=fusion), specs, num_classes)


def _batch(names="ab", n=10, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % num_classes,
        index=torch.arange(n),
    )


def _ctx(batch, epoch, seen=None):
    """A context whose validation split is `batch`, read in two loader batches; the positions
    asked for are recorded in `seen`."""

    def batches(role, positions=None):
        assert role == "val"
        if seen is not None:
            seen.append(positions.tolist())
        half = len(positions) // 2
        for part in (positions[:half], positions[half:]):
            inputs = {m: x[part] for m, x in batch.inputs.items()}
            yield Batch(inputs, batch.label[part], batch.index[part])

    size = {"val": len(batch.label)}
    return TrainContext(epoch=epoch, epochs=50, step=0, batches=batches, sizes=size)


def _losses(model, batch):
    """CE on the mean of the heads' logits and the JS alignment, from the heads themselves."""
    out = model(batch.inputs)
    heads = [out.unimodal_logits[m] for m in model.modalities]
    return F.cross_entropy(torch.stack(heads).mean(0), batch.label), alignment_loss(heads)


# ---------------------------------------------------------------- the official loss


def test_the_first_step_weighs_the_cross_entropy_005_and_the_alignment_095():
    model, batch = _model(), _batch()
    method = LFM(LFMConfig(lr_alpha=0.0), 3)  # no step: the weights the official cls_k starts at
    assert method.alpha == 0.95
    method.on_epoch_start(model, _ctx(batch, 0))
    out = model(batch.inputs)
    loss, parts = method.objective(model, out, batch, _ctx(batch, 0))
    cls, align = _losses(model, batch)
    assert loss.item() == pytest.approx(2 * (0.05 * cls.item() + 0.95 * align.item()), rel=1e-6)
    assert parts == pytest.approx({"cls_loss": cls.item(), "align_loss": align.item()})


def test_lfm_classifies_with_the_mean_of_the_two_heads_logits(recipe_file):
    recipe = load_recipe(recipe_file(method={"name": "lfm"}))  # no model.fusion: the method's
    assert recipe.model.fusion is not None and recipe.model.fusion.name == "late"
    assert recipe.run_label() == "lfm"
    for data in ("crema-d", "kinetics-sounds", "uci-mfeat", "synthetic-av"):
        assert load_recipe(RECIPES / f"lfm-{data}.yaml").model.fusion.name == "late"
    model, batch = _model(fusion=recipe.model.fusion), _batch()
    out = model(batch.inputs)
    mean = 0.5 * out.unimodal_logits["a"] + 0.5 * out.unimodal_logits["b"]
    torch.testing.assert_close(out.logits, mean)  # what evaluation predicts with
    method = LFM(LFMConfig(alpha_init=0.3), 3)
    cls, align = _losses(model, batch)
    want = 2 * (0.7 * cls.item() + 0.3 * align.item())
    loss = method.objective(model, out, batch, _ctx(batch, 0))[0]
    assert loss.item() == pytest.approx(want, rel=1e-6)


def test_js_divergence_matches_the_hand_formula_and_averages_the_pairs():
    z1 = [[2.0, 0.0, -1.0], [0.5, 0.3, 0.1]]
    z2 = [[0.1, 0.4, 0.0], [1.5, -0.5, 0.2]]
    z3 = [[0.0, 2.0, 0.0], [0.2, 0.1, 0.0]]

    def softmax(row):
        e = [math.exp(v) for v in row]
        return [v / sum(e) for v in e]

    want = 0.0
    for a, b in zip(z1, z2, strict=True):
        p, q = softmax(a), softmax(b)
        m = [(u + v) / 2 for u, v in zip(p, q, strict=True)]
        kl_pm = sum(mi * math.log(mi / pi) for mi, pi in zip(m, p, strict=True))
        kl_qm = sum(mi * math.log(mi / qi) for mi, qi in zip(m, q, strict=True))
        want += 0.5 * (kl_pm + kl_qm)
    got = js_divergence(torch.tensor(z1), torch.tensor(z2)).item()
    assert got == pytest.approx(want / len(z1), rel=1e-6)
    t1, t2, t3 = (torch.tensor(z) for z in (z1, z2, z3))
    three = alignment_loss([t1, t2, t3]).item()
    pairs = js_divergence(t1, t2) + js_divergence(t1, t3) + js_divergence(t2, t3)
    assert three == pytest.approx(pairs.item() / 3, rel=1e-6)


# ---------------------------------------------------------------- the weight step


def test_the_step_direction_is_the_official_hessian_vector_product_by_hand():
    """Quadratic stand-ins for the two losses, whose Hessians are known: L_cls = 1/2 t'At + b't
    over the two tensors t = (w, u) together, L_align = 1/2 t'Bt. The direction is the mean over
    the first tensor (w) of ((1 - alpha) A + alpha B)(A t + b)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_(True)
    u = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)
    a, c = (torch.randn(10, 10, generator=g, dtype=torch.float64) for _ in range(2))
    big_a, big_b = a @ a.T, c + c.T
    b = torch.randn(10, generator=g, dtype=torch.float64)
    t = torch.cat([w.reshape(-1), u])
    cls = 0.5 * t @ big_a @ t + b @ t
    align = 0.5 * t @ big_b @ t
    alpha = 0.3
    hvp = ((1 - alpha) * big_a + alpha * big_b) @ (big_a @ t.detach() + b)
    want = hvp[:6].mean().item()  # w's six entries
    assert alpha_gradient([w, u], w, cls, align, alpha) == pytest.approx(want, rel=1e-12)
    # not the one-step hypergradient mmval used before, -grad L_cls . (grad L_align - grad
    # L_cls) averaged over all entries
    grad_cls = big_a @ t.detach() + b
    one_step = -(grad_cls @ (big_b @ t.detach() - grad_cls)).item() / 10
    assert want != pytest.approx(one_step, rel=1e-3)


@pytest.mark.parametrize("chosen", [None, "b"])
def test_the_weight_step_takes_the_first_eight_samples_and_the_chosen_encoder(chosen):
    model, batch = _model(), _batch()
    first = next(model.encoders[chosen or "a"].parameters())
    eight = Batch({m: x[:8] for m, x in batch.inputs.items()}, batch.label[:8], batch.index[:8])
    model.eval()
    g = alpha_gradient(list(model.parameters()), first, *_losses(model, eight), 0.5)
    assert abs(g) > 1e-6  # a step the check can see
    config = LFMConfig(alpha_init=0.5, lr_alpha=0.5, hypergradient_modality=chosen)
    for epoch, halvings in ((1, 0), (20, 1), (45, 2)):
        method = LFM(config, 3)
        method.on_epoch_start(model, _ctx(batch, epoch))
        assert method.alpha == pytest.approx(0.5 - 0.5 / 2**halvings * g, rel=1e-6)
    method = LFM(LFMConfig(alpha_init=0.5, lr_alpha=1e6, hypergradient_modality=chosen), 3)
    method.on_epoch_start(model, _ctx(batch, 1))
    assert method.alpha == (0.05 if g > 0 else 0.95)  # clipped


def test_the_step_reads_the_first_eight_validation_samples_every_epoch():
    model, batch = _model(), _batch(n=10)
    seen: list[list[int]] = []
    method = LFM(LFMConfig(), 3)
    for epoch in (0, 1, 2):
        method.on_epoch_start(model, _ctx(batch, epoch, seen))
    assert seen == [list(range(8))] * 3
    small = _batch(n=5)
    method.on_epoch_start(model, _ctx(small, 3, seen))
    assert seen[-1] == list(range(5))


def test_the_step_runs_in_training_mode_before_epoch_0_then_in_evaluation_mode():
    model, batch = _model(), _batch()
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    method = LFM(LFMConfig(), 3)
    for epoch in (0, 1, 2):
        model.train()
        method.on_epoch_start(model, _ctx(batch, epoch))
        assert model.training  # left ready for the epoch's steps
    assert modes == [True, False, False]


# ---------------------------------------------------------------- recipes


def test_old_recipes_and_checkpoints_still_load(recipe_file):
    old = {"name": "lfm", "alpha_init": 0.05, "val_fraction": 0.25}  # an old dump's fields
    recipe = load_recipe(recipe_file(method=old, model__fusion="concat"))
    assert recipe.method.val_samples == 8 and recipe.method.alpha_init == 0.05
    assert recipe.run_label() == "lfm+concat"
    with pytest.raises(UserError, match="val_samples"):
        load_recipe(recipe_file(method={"name": "lfm", "val_fraction": 0.5}))
    with pytest.raises(UserError, match=r"method\.hypergradient_modality"):
        wrong = {"name": "lfm", "hypergradient_modality": "audio"}
        load_recipe(recipe_file(method=wrong, data__modalities=["a", "b"]))


def test_crema_d_recipe_is_the_official_setting():
    path = RECIPES / "lfm-crema-d.yaml"
    recipe = load_recipe(path)
    optim, train = recipe.optim, recipe.train
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.01, 0.9, 1e-4)
    assert (optim.scheduler.step_size, optim.scheduler.gamma) == (70, 0.1)
    assert (train.batch_size, train.epochs, recipe.seeds) == (64, 200, [0])
    assert recipe.model.fusion.name == "late"
    assert recipe.method.alpha_init == 0.95 and recipe.method.val_samples == 8
    assert recipe.method.hypergradient_modality == "audio"
    header = path.read_text()
    for source in ("Crema_epoch_learnable.py", "data/crema.json", "ad44fa09fee4"):
        assert source in header


def test_lfm_resume_matches_an_uninterrupted_run(recipe_file):
    method = {"name": "lfm", "lr_alpha": 0.5, "alpha_init": 0.5}
    metrics = assert_resume_matches(load_recipe(recipe_file(method=method, train__epochs=3)))
    assert metrics["method_alpha_align"].nunique() > 1  # alpha moved: resume had state to restore
