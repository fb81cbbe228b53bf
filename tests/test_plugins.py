"""Plug-ins (C3R, IMML) on any base method: the contract every registered plug-in keeps on a
base with per-modality heads (train, resume, value), the recipe surface, and each plug-in's
formulas against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmval.artifacts.layout import BEST
from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods import METHODS, build_method
from mmval.methods.base import TrainContext
from mmval.methods.plugged import Plugged, with_plugins
from mmval.models import ModelConfig, build_model
from mmval.plugins import PLUGINS
from mmval.plugins.c3r import (
    C3RConfig,
    bounded_steps,
    c3_risk,
    counterfactual_direction,
    necessity_surrogate,
    softmax_kl,
)
from mmval.plugins.imml import IMMLConfig, info_nce
from mmval.plugins.necks import C3RNeck, IMMLNeck
from mmval.recipe import check_against_data, load_recipe
from mmval.settings import SETTING, identity
from mmval.valuation.run import value_checkpoint
from tests.conftest import assert_resume_matches, assert_trained, quick_recipe, trained


def plugged_recipe(base: str, plugin: str, data: Path, output: Path, **changes):
    config = PLUGINS[plugin].Config
    entry = {"name": plugin, **config.quick, **changes}
    return quick_recipe(base, data, output, run=f"{base}+{plugin}", changes={"plugins": [entry]})


@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_plugin_on_qmf_trains_resumes_and_is_valued(plugin, uci_dir, tmp_path):
    recipe = plugged_recipe("qmf", plugin, uci_dir, tmp_path / "runs")
    assert recipe.run_label() == f"qmf+{plugin}"
    result, metrics = trained(recipe)
    assert_trained(result.summary, metrics, 3)
    assert result.summary["method"] == f"qmf+{plugin}"
    assert any(c.startswith(f"method_{plugin}_") for c in metrics.columns)
    assert "method_rank_loss" not in metrics  # qmf's own loss stays qmf's (no renaming)
    assert_resume_matches(recipe.model_copy(update={"name": f"qmf+{plugin}-straight"}))
    valued = value_checkpoint(result.run_dir / BEST)
    assert set(valued.modalities) == set(recipe.data.modalities or [])
    assert valued.table["contribution"].notna().all() and valued.table["correct"].mean() > 0.5


def test_a_plugged_method_keeps_its_evaluation_readouts(uci_dir, tmp_path):
    """mmcosine + c3r still logs the official linear-head accuracy beside the cosine one."""
    recipe = plugged_recipe("mmcosine", "c3r", uci_dir, tmp_path / "runs")
    _, metrics = trained(recipe)
    assert metrics["test_linear_acc"].between(0, 1).all()


def test_plugins_keep_the_base_methods_loss_and_add_their_terms(uci_dir, tmp_path):
    recipe = plugged_recipe("qmf", "imml", uci_dir, tmp_path / "runs", gamma1=0.0, gamma2=0.0)
    method = with_plugins(build_method(recipe.method, 10), recipe.plugins, 10)
    assert isinstance(method, Plugged) and type(method.base) is METHODS["qmf"]
    model = build_model(recipe.model, _specs("ab", 4), 10, recipe.plugins)
    method.build_modules(model)
    batch = _batch("ab", n=8, classes=10)
    ctx = TrainContext(epoch=0, epochs=1, step=0)
    model.train()
    out = method.forward(model, batch, ctx)
    plugged, figures = method.objective(model, out, batch, ctx)
    alone, _ = method.base.objective(model, out, batch, ctx)
    # gamma 0: imml adds nothing to qmf's loss (recording the history twice scales it, and its
    # normalisation undoes that)
    assert plugged.item() == pytest.approx(alone.item(), rel=1e-5)
    assert {"imml_loss_con", "imml_loss_uni"} <= figures.keys()


def test_recipe_surface(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(), ["plugins=[{name: imml, gamma1: 0.5}]"])
    assert recipe.method.name == "concat" and recipe.plugins[0].gamma1 == 0.5
    assert recipe.run_label() == "concat+imml"
    short = load_recipe(recipe_file(method={"name": "c3r", "epsilon": 0.2}))
    assert short.method.name == "concat" and short.plugins[0].epsilon == 0.2
    assert short.run_label() == "concat+c3r"
    both = load_recipe(recipe_file(method={"name": "c3r"}, plugins=["imml"]))
    assert [p.name for p in both.plugins] == ["imml", "c3r"]  # c3r must come last
    with pytest.raises(UserError, match=r"- plugins\[0\]: c3r must be the last plug-in"):
        load_recipe(recipe_file(plugins=["c3r", "imml"]))
    with pytest.raises(UserError, match=r"- plugins\[1\]: imml is listed more than once"):
        load_recipe(recipe_file(plugins=["imml", "imml"]))
    with pytest.raises(UserError, match=r"- plugins: mla runs its own training step"):
        load_recipe(recipe_file(method={"name": "mla"}, plugins=["c3r"]))
    with pytest.raises(UserError, match=r"- plugins\[0\]\.eta: Extra inputs"):
        load_recipe(recipe_file(plugins=[{"name": "c3r", "eta": 0.5}]))
    unchecked = load_recipe(recipe_file(plugins=[{"name": "imml", "predominant": "z"}]))
    with pytest.raises(UserError, match=r"- plugins\[0\]\.predominant: 'z' is not one of"):
        check_against_data(unchecked, ["x", "y"])  # once the data names its modalities
    with pytest.raises(UserError, match=r"- plugins\[0\]: Input should be 'c3r' or 'imml'"):
        load_recipe(recipe_file(plugins=["magic"]))


def test_a_recipe_without_plugins_keeps_its_settings_hash(recipe_file):
    plain = load_recipe(recipe_file())
    assert "plugins" not in identity(plain, SETTING)  # the hash of runs written before plug-ins
    with_one = load_recipe(recipe_file(plugins=["c3r"]))
    assert identity(with_one, SETTING)["plugins"][0]["name"] == "c3r"
    assert with_one.settings_hash() != plain.settings_hash()


# ---------------------------------------------------------------- helpers


def _specs(names: str, width: int) -> list[ModalitySpec]:
    return [ModalitySpec(name=m, dtype="float32", shape=[width]) for m in names]


def _batch(names: str = "abc", n: int = 6, seed: int = 1, classes: int = 3, width: int = 4):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, width, generator=g) for m in names},
        label=torch.arange(n) % classes,
        index=torch.arange(n),
    )


def _model(plugin, fusion: str = "concat", names: str = "abc", classes: int = 3):
    torch.manual_seed(0)
    config = ModelConfig(encoder={"hidden": [5], "out_dim": 4, "dropout": 0.0}, fusion=fusion)
    return build_model(config, _specs(names, 4), classes, [plugin])


def _set(linear: torch.nn.Linear, weight: list, bias: list) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        linear.bias.copy_(torch.tensor(bias))


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------- C3R


def _c3r(fusion: str = "concat", **settings):
    config = C3RConfig(**settings)
    model = _model(config, fusion)
    plugin = PLUGINS["c3r"](config, 3, 0)
    plugin.build_modules(model)
    return model, plugin


def test_c3r_neck_is_the_reweighted_causal_and_other_parts_read_by_the_base_fusion():
    model, _ = _c3r("qmf")
    neck = model.necks[0]
    assert isinstance(neck, C3RNeck) and model.feature_dims == dict.fromkeys("abc", 64)
    batch = _batch()
    with torch.no_grad():
        neck.w_causal.mul_(2.0)
        neck.w_other.zero_()
        raw = {m: model.encoders[m](batch.inputs[m]) for m in "abc"}
        causal, _ = neck.parts(raw)
        z = model.encode(batch.inputs)
    assert torch.allclose(z["b"], 2 * causal[:, 1], atol=1e-6)
    out = model(batch.inputs)
    assert out.unimodal_logits is not None  # qmf's per-modality heads read Z_m


def test_every_counterfactual_meets_the_kl_bound_and_ascent_leaves_the_label():
    model, _ = _c3r()
    neck = model.necks[0]
    model.train()
    batch = _batch(n=32, seed=3)
    model(batch.inputs)
    trace = neck.trace
    for epsilon in (0.001, 0.05, 1.0):
        direction = counterfactual_direction(model, neck, trace, batch.label, "ascent")
        steps = bounded_steps(neck, trace, direction, epsilon)
        moved = neck.combine(trace.causal + steps[:, None, None] * direction, trace.other)
        kl = softmax_kl(moved.flatten(1), trace.z.flatten(1))
        assert bool((kl <= epsilon * (1 + 1e-5)).all())
        assert bool((kl >= 0.99 * epsilon).all())  # the largest step: the bound is met tightly
    with torch.no_grad():
        before = F.cross_entropy(model.fuse(neck.split(trace.z)), batch.label, reduction="none")
        after = F.cross_entropy(model.fuse(neck.split(moved)), batch.label, reduction="none")
    assert bool((after > before).all())  # ascent climbs each sample's cross-entropy
    descent = counterfactual_direction(model, neck, trace, batch.label, "descent")
    assert torch.allclose(descent, -direction)


def test_the_direction_is_each_samples_own_gradient():
    model, _ = _c3r()
    neck = model.necks[0]
    model.train()
    batch = _batch(n=4)
    model(batch.inputs)
    trace = neck.trace
    direction = counterfactual_direction(model, neck, trace, batch.label, "ascent")
    causal = trace.causal.detach()[1:2].clone().requires_grad_(True)
    z = neck.combine(causal, trace.other.detach()[1:2])
    loss = F.cross_entropy(model.fuse(neck.split(z)), batch.label[1:2])
    (grad,) = torch.autograd.grad(loss, causal)
    assert torch.allclose(direction[1], grad[0] / grad.norm(), atol=1e-5)


def test_the_instrument_learns_from_the_label_loss_and_is_a_detached_target():
    grads = {}
    for lambda_v in (0.0, 10.0):
        model, plugin = _c3r(lambda_v=lambda_v)
        model.train()
        batch = _batch(n=8)
        out = model(batch.inputs)
        loss, figures = plugin.objective(model, out, batch)
        loss.backward()
        grads[lambda_v] = [p.grad.clone() for p in plugin.instrument.parameters()]
        assert all(
            p.grad is not None and p.grad.abs().sum() > 0
            for p in plugin.instrument_head.parameters()
        )
        assert model.necks[0].mlps["a"][0].weight.grad.abs().sum() > 0
        assert figures["loss_iv"] > 0 and "loss_v" in figures
    # L_v reads the instrument detached: its weight changes none of the instrument's gradients
    assert all(g.abs().sum() > 0 for g in grads[0.0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0.0], grads[10.0], strict=True))


def test_sufficiency_and_necessity_switch_one_by_one():
    batch = _batch(n=8)
    seen = {}
    for sufficiency, necessity in ((True, True), (True, False), (False, True)):
        model, plugin = _c3r(sufficiency=sufficiency, necessity=necessity)
        model.train()
        out = model(batch.inputs)
        loss, figures = plugin.objective(model, out, batch)
        seen[sufficiency, necessity] = (loss.item(), set(figures))
    assert "loss_fe" not in seen[True, False][1] and "c3_risk" not in seen[True, False][1]
    assert "loss_v" not in seen[False, True][1] and "loss_fe" in seen[False, True][1]
    full = seen[True, True][0]
    assert full > seen[True, False][0] and full > seen[False, True][0]


def test_the_reweighting_matrices_are_learnt():
    model, plugin = _c3r()
    model.train()
    batch = _batch(n=8)
    out = model(batch.inputs)
    (F.cross_entropy(out.logits, batch.label) + plugin.objective(model, out, batch)[0]).backward()
    neck = model.necks[0]
    assert neck.w_causal.grad.abs().sum() > 0 and neck.w_other.grad.abs().sum() > 0


def test_c3_risk_and_its_surrogates_on_hand_made_logits():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    flipped = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    sufficiency, necessity = c3_risk(logits, flipped, labels)
    assert (sufficiency.item(), necessity.item()) == (0.5, 0.5)
    p0 = [_softmax([0.0, 3.0])[0], _softmax([1.0, 0.0])[0]]
    want = -(math.log(1 - p0[0]) + math.log(1 - p0[1])) / 2
    assert necessity_surrogate(flipped, labels).item() == pytest.approx(want, rel=1e-6)


# ---------------------------------------------------------------- IMML


def _bank_neck(adjustment: str = "beta", bank_size: int = 4) -> IMMLNeck:
    """Width 2, modalities a (2 features) and b (1), a predominant: bank rows are [a1, a2, b]."""
    config = IMMLConfig(predominant="a", bank_size=bank_size, width=2, adjustment=adjustment)
    neck = IMMLNeck({"a": 2, "b": 1}, config)
    _set(neck.query, [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    if adjustment == "beta":
        _set(neck.key["all"], [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [0.0, 0.0])
        _set(neck.value["all"], [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [0.5, 0.0])
    else:
        _set(neck.key["a"], [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
        _set(neck.value["a"], [[0.0, 0.0], [1.0, 0.0]], [0.5, 0.0])
    return neck


ROWS = {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[1.0], [-1.0]])}


def test_beta_context_attends_over_pairs_as_computed_by_hand():
    neck = _bank_neck("beta")
    query = torch.tensor([[1.0, 2.0]])
    assert torch.equal(neck.context(query), torch.zeros(1, 2))  # empty bank: no context
    neck.enqueue(ROWS)
    # keys W_k [a1, a2, b]: [1, 0 + 1] and [0, 2 - 1]; values + (0.5, 0): [1.5, 1], [-0.5, 0]
    weights = _softmax([(1 * 1 + 2 * 1) / math.sqrt(2), (1 * 0 + 2 * 1) / math.sqrt(2)])
    want = [weights[0] * 1.5 + weights[1] * -0.5, weights[0] * 1.0 + weights[1] * 0.0]
    assert neck.context(query)[0].tolist() == pytest.approx(want, rel=1e-6)


def test_front_door_context_reads_the_treatment_only():
    neck = _bank_neck("front_door")
    query = torch.tensor([[1.0, 2.0]])
    neck.enqueue(ROWS)
    # keys W_k [a1, a2]: [1, 0] and [0, 2]; values + (0.5, 0): [0.5, 1] and [0.5, 0]
    weights = _softmax([1 / math.sqrt(2), 4 / math.sqrt(2)])
    want = [0.5, weights[0] * 1.0]
    assert neck.context(query)[0].tolist() == pytest.approx(want, rel=1e-6)
    other = _bank_neck("front_door")
    other.enqueue({"a": ROWS["a"], "b": torch.tensor([[7.0], [9.0]])})
    assert torch.equal(other.context(query), neck.context(query))  # b never enters
    beta, beta_other = _bank_neck("beta"), _bank_neck("beta")
    beta.enqueue(ROWS)
    beta_other.enqueue({"a": ROWS["a"], "b": torch.tensor([[7.0], [9.0]])})
    assert not torch.equal(beta.context(query), beta_other.context(query))


def test_the_bank_is_a_fifo_written_only_in_training_and_the_predominant_slot_has_the_context():
    neck = _bank_neck(bank_size=3)

    def rows(*values: float) -> dict[str, torch.Tensor]:
        return {
            "a": torch.tensor([[v, v] for v in values]),
            "b": torch.tensor([[v] for v in values]),
        }

    neck.train()
    first = neck(rows(1.0, 2.0))
    assert torch.equal(first["a"][:, 2:], torch.zeros(2, 2))  # an empty bank: no context yet
    neck(rows(3.0, 4.0))  # slots 2 and 0 (wraps around)
    assert neck.bank[:, 2].tolist() == [4.0, 2.0, 3.0]
    assert (int(neck.bank_count), int(neck.bank_ptr)) == (3, 1)
    neck.eval()
    before = neck.bank.clone()
    out = neck(rows(5.0))
    assert torch.equal(neck.bank, before)  # frozen at evaluation
    assert out["a"][:, 2:].abs().sum() > 0 and torch.equal(out["b"][:, 2:], torch.zeros(1, 2))
    restored = _bank_neck(bank_size=3)
    restored.load_state_dict(neck.state_dict())
    restored.eval()
    assert torch.allclose(restored(rows(5.0))["a"], out["a"])
    neck.train()
    neck(rows(6.0, 7.0, 8.0, 9.0))  # larger than the bank: the last rows stay
    assert sorted(neck.bank[:, 2].tolist()) == [7.0, 8.0, 9.0]


def test_info_nce_matches_an_independent_computation():
    a = [[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]]
    b = [[0.8, 0.6], [1.0, 1.0], [-1.0, 0.5]]
    tau = 0.5

    def unit(v: list[float]) -> list[float]:
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    ua, ub = [unit(v) for v in a], [unit(v) for v in b]
    s = [[sum(x * y for x, y in zip(p, q, strict=True)) / tau for q in ub] for p in ua]
    rows = [-math.log(math.exp(s[i][i]) / sum(math.exp(v) for v in s[i])) for i in range(3)]
    cols = [
        -math.log(math.exp(s[j][j]) / sum(math.exp(s[i][j]) for i in range(3))) for j in range(3)
    ]
    want = (sum(rows) / 3 + sum(cols) / 3) / 2
    assert info_nce(torch.tensor(a), torch.tensor(b), tau).item() == pytest.approx(want, rel=1e-6)


def _imml(predominant: str | None = None, **settings):
    config = IMMLConfig(predominant=predominant, bank_size=16, **settings)
    model = _model(config, "late")
    plugin = PLUGINS["imml"](config, 3, 0)
    plugin.build_modules(model)
    return model, plugin


def test_imml_terms_anchor_the_contrast_on_the_predominant_modality():
    batch = _batch()
    losses = {}
    for g1, g2 in ((1.0, 0.0), (0.0, 1.0)):
        model, plugin = _imml("b", gamma1=g1, gamma2=g2, temperature=0.1)
        model.train()
        out = model(batch.inputs)
        losses[g1, g2] = plugin.objective(model, out, batch)[0].item()
    proj = model.necks[0].project({m: model.encoders[m](batch.inputs[m]) for m in "abc"})
    con = (info_nce(proj["b"], proj["a"], 0.1) + info_nce(proj["b"], proj["c"], 0.1)) / 2
    assert losses[1.0, 0.0] == pytest.approx(con.item(), rel=1e-5)
    uni = sum(F.cross_entropy(plugin.heads[m](proj[m]), batch.label) for m in "abc")
    assert losses[0.0, 1.0] == pytest.approx(uni.item(), rel=1e-5)


def test_imml_picks_the_predominant_modality_by_unimodal_val_accuracy_after_warmup():
    model, plugin = _imml(warmup_epochs=2)
    for m, bias in (("a", [1.0, 0.0, 0.0]), ("b", [0.0, 0.0, 1.0]), ("c", [0.0, 1.0, 0.0])):
        _set(plugin.heads[m], torch.zeros(3, 256).tolist(), bias)
    val = Batch(inputs=_batch(n=4).inputs, label=torch.tensor([2, 2, 2, 1]), index=torch.arange(4))
    model.train()
    ctx = TrainContext(epoch=0, epochs=3, step=0, batches=lambda role: iter([val]))
    assert plugin.on_epoch_end(model, ctx) == {"predominant": 0.0}  # still warming up
    ctx.epoch = 1
    assert plugin.on_epoch_end(model, ctx) == {"predominant": 1.0}  # b: 3 of 4 right
    assert model.training and model.necks[0].predominant_name == "b"
    fixed, fixed_plugin = _imml("c")
    assert fixed_plugin.on_epoch_end(fixed, ctx) == {"predominant": 2.0}  # set by the recipe
    assert model.representation(val.inputs).shape == (4, 512 * 3)


def test_report_rows_name_the_plug_in_setting_that_differs():
    from mmval.report.runs import flatten_recipe

    flat = flatten_recipe({"plugins": [{"name": "imml", "adjustment": "front_door"}], "seeds": [0]})
    assert flat["plugins.0.adjustment"] == "front_door" and flat["plugins.0.name"] == "imml"
