"""Greedy and MMTM mid-fusion: the gates and running means by hand, the staged ResNet trunk, the
conditional-utilisation state machine, recipe errors, valuation paths, resume and short runs."""

from __future__ import annotations

import math

import pytest
import torch

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.base import TrainContext
from mmval.methods.greedy import Greedy, GreedyConfig, utilisation_gap
from mmval.models import ModelConfig, build_model
from mmval.models.encoders import ResNet18Encoder, ResNet18EncoderConfig
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from mmval.valuation.engine import JointEvaluator, LateFusionEvaluator, build_evaluator
from tests.conftest import assert_trained, quick_recipe, trained

CPU = torch.device("cpu")


def _model(mmtm=None, fusion="late", seed=0):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in ("a", "b")]
    config = ModelConfig(
        encoder={"hidden": [4], "out_dim": 2, "dropout": 0.0},
        fusion=fusion,
        mmtm={"stages": [1]} if mmtm is None else mmtm,
    )
    return build_model(config, specs, 3)


def _inputs(n=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, 3, generator=g) for m in ("a", "b")}


def test_mmtm_gates_match_a_hand_computation():
    model = _model().eval()
    x = _inputs()
    block = model.mid_fusion.blocks["1"]
    h = {m: torch.relu(model.encoders[m].net[1](x[m])) for m in ("a", "b")}  # stage 1 of the MLP
    joint = torch.relu(torch.cat([h["a"], h["b"]], 1) @ block.squeeze.weight.T + block.squeeze.bias)
    gated = {
        m: h[m] * torch.sigmoid(joint @ block.excite[m].weight.T + block.excite[m].bias)
        for m in ("a", "b")
    }
    expected = {m: torch.relu(model.encoders[m].net[4](gated[m])) for m in ("a", "b")}
    got = model.encode(x)
    for m in ("a", "b"):
        torch.testing.assert_close(got[m], expected[m])
    # the squeeze width is int(2 * (4 + 4) / 4) = 4, as MMTM_mitigate's dim_out
    assert block.squeeze.out_features == 4


def test_running_gate_is_the_mean_over_training_steps_and_replaces_the_caring_gate():
    model = _model().train()
    block = model.mid_fusion.blocks["1"]
    seen = []
    for seed in (1, 2, 3):
        x = _inputs(seed=seed)
        h = {m: torch.relu(model.encoders[m].net[1](x[m])) for m in ("a", "b")}
        with torch.no_grad():
            joint = torch.relu(block.squeeze(torch.cat([h["a"], h["b"]], 1)))
            seen.append(torch.sigmoid(block.excite["b"](joint)).mean(0))
        model.encode(x)
    torch.testing.assert_close(block.running_gate("b"), torch.stack(seen).mean(0))
    assert int(block.steps) == 3
    # while caring for b, b's gates are the running mean for every sample; a's are its own
    model.mid_fusion.caring = "b"
    squeezed = {m: torch.rand(4, 4) for m in ("a", "b")}
    before = block.running_gate("b").clone()
    gates = block(squeezed, "b")
    n = 3
    fresh = torch.sigmoid(
        block.excite["b"](torch.relu(block.squeeze(torch.cat([squeezed["a"], squeezed["b"]], 1))))
    ).mean(0)
    updated = (fresh + before * n) / (n + 1)
    torch.testing.assert_close(gates["b"], updated.expand(4, -1))
    assert not torch.allclose(gates["a"][0], gates["a"][1])
    # evaluation never re-balances and never moves the running means
    block.eval()
    kept = block.running_gate("b").clone()
    gates = block(squeezed, "b")
    assert not torch.allclose(gates["b"][0], gates["b"][1])
    torch.testing.assert_close(block.running_gate("b"), kept)


@pytest.mark.parametrize("shape", [[2, 32, 32, 3], [64, 32]])
def test_resnet_stages_compose_to_the_plain_trunk(shape):
    torch.manual_seed(0)
    enc = ResNet18Encoder(shape, ResNet18EncoderConfig()).eval()
    x = torch.randint(0, 255, (3, *shape)).to(torch.uint8 if len(shape) == 4 else torch.float32)
    t = enc.stem(x)
    for i in range(4):
        t = enc.run_stage(i, t)
    torch.testing.assert_close(enc.pool(t, 3), enc(x))
    ones = torch.ones(3, 512)
    torch.testing.assert_close(enc.excite(t, ones), t)
    # squeeze of frames averages over frames and space per sample
    assert enc.squeeze(t, 3).shape == (3, 512)


def test_utilisation_gap():
    assert utilisation_gap([1.0, 2.0], [10.0, 2.0]) == pytest.approx(math.log10(10) - 0.0)


def _set_grads(model, scale_a, scale_b):
    for m, s in (("a", scale_a), ("b", scale_b)):
        for p in [*model.encoders[m].parameters(), *model.fusion.heads[m].parameters()]:
            p.grad = torch.full_like(p, s)
    for block in model.mid_fusion.blocks.values():
        for p in block.parameters():
            p.grad = torch.full_like(p, 1.0)


def _speed(params):
    g = sum(float(p.grad.square().sum()) for p in params)
    w = sum(float(p.detach().square().sum()) for p in params)
    return g / w


def test_state_machine_follows_the_official_rule():
    model = _model()
    method = Greedy(GreedyConfig(epsilon=0.01, window=2, starting_epoch=1), 3)
    batch = Batch(inputs=_inputs(), label=torch.tensor([0, 1, 2, 0, 1]), index=torch.arange(5))
    out = model(batch.inputs)
    block = model.mid_fusion.blocks["1"]
    main = [[*model.encoders[m].parameters(), *model.fusion.heads[m].parameters()] for m in "ab"]
    bypass = [[*block.excite[m].parameters(), *block.squeeze.parameters()] for m in "ab"]
    # epoch 0: accumulate, never re-balance
    _set_grads(model, 0.1, 0.3)
    figures = method.after_backward(model, out, batch, TrainContext(epoch=0, epochs=3, step=0))
    m0 = [_speed(main[0]), _speed(main[1])]
    b0 = [_speed(bypass[0]), _speed(bypass[1])]
    assert method.main == pytest.approx(m0) and method.bypass == pytest.approx(b0)
    gap = math.log10(b0[0] / m0[0]) - math.log10(b0[1] / m0[1])
    assert figures["d_bdr"] == pytest.approx(gap) and gap > 0.01
    assert method.caring is None and model.mid_fusion.caring is None
    # epoch 1: the same gradients again; d > 0 makes modality 0 ("a") the caring one
    ctx = TrainContext(epoch=1, epochs=3, step=1)
    method.after_backward(model, out, batch, ctx)
    assert method.main == pytest.approx([2 * v for v in m0])
    assert method.caring == 0 and model.mid_fusion.caring == "a"
    # two re-balancing steps (window 2) leave the accumulators alone, then re-balancing ends
    _set_grads(model, 5.0, 0.01)
    for expected in ("a", None):
        figures = method.after_backward(model, out, batch, ctx)
        assert figures["rebalancing"] == 1.0 and model.mid_fusion.caring == expected
    assert method.main == pytest.approx([2 * v for v in m0])
    # a state round trip restores it
    clone = Greedy(method.config, 3)
    clone.load_state_dict(method.state_dict())
    assert clone.state_dict() == method.state_dict()


def test_recipe_errors(recipe_file):
    good = {"fusion": "late", "mmtm": {}}
    three = {"data__modalities": ["a", "b", "c"], "method": {"name": "greedy"}}
    with pytest.raises(UserError, match=r"data\.modalities"):
        load_recipe(recipe_file(model=good, **three))
    # without data.modalities the data set's three are checked when training starts
    unnamed = load_recipe(recipe_file(model=good, method={"name": "greedy"}))
    with pytest.raises(UserError, match="exactly two modalities"):
        Trainer(unnamed, 0).run()
    two = {"data__modalities": ["a", "b"], "method": {"name": "greedy"}}
    with pytest.raises(UserError, match=r"model\.mmtm"):
        load_recipe(recipe_file(model={"fusion": "late"}, **two))
    with pytest.raises(UserError, match=r"model\.fusion"):
        load_recipe(recipe_file(model={"fusion": "film", "mmtm": {}}, **two))
    assert load_recipe(recipe_file(model=good, **two)).method.name == "greedy"


def test_mmtm_needs_staged_encoders_and_valid_stages():
    with pytest.raises(UserError, match="stages"):
        _model(mmtm={"stages": [3]})  # an mlp with one hidden layer has stages 1 and 2
    specs = [
        ModalitySpec(name="t", dtype="int32", shape=[6], encoding="tokens", vocab_size=9),
        ModalitySpec(name="v", dtype="float32", shape=[3]),
    ]
    config = ModelConfig(encoders={"t": {"kind": "embedding_bag"}}, mmtm={"stages": [1]})
    with pytest.raises(UserError, match="resnet18, resnet or mlp"):
        build_model(config, specs, 2)


def test_valuation_of_a_mid_fusion_model_masks_inputs_through_all_encoders():
    model = _model().eval()
    fills = {m: torch.zeros(3) for m in ("a", "b")}
    evaluator = build_evaluator(model, ["a", "b"], "input", fills, device=CPU)
    assert isinstance(evaluator, JointEvaluator)
    assert isinstance(
        build_evaluator(model, ["a", "b"], "feature", None, device=CPU), LateFusionEvaluator
    )
    with pytest.raises(UserError, match="joint"):
        build_evaluator(model, ["a", "b"], "input", fills, device=CPU, path="late")


def test_trains_on_uci_mfeat_and_rebalances(tmp_path, uci_dir):
    changes = {"data": {"modalities": ["kar", "fou"]}, "model": {"mmtm": {"stages": [1, 2]}}}
    recipe = quick_recipe("greedy", uci_dir, tmp_path / "runs", changes=changes)
    result, metrics = trained(recipe)
    assert_trained(result.summary, metrics, 3)
    assert metrics["method_rebalancing"].max() > 0  # the rule fired
    assert result.summary["test_acc"] > 0.5


def test_greedy_recipes_validate():
    for path in ("recipes/greedy-uci-mfeat.yaml", "recipes/greedy-synthetic-av.yaml"):
        assert load_recipe(path).method.name == "greedy"
