"""IMML and C3R: the front-door context attention and its feature bank, InfoNCE, the C3 risk and
its surrogates, the closed-form counterfactual step, the instrument attention, recipe errors,
and short training runs on uci-mfeat (6 modalities) and synthetic audio-visual clips, whose
checkpoints `mmval value` reads."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.dataset import Batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.base import TrainContext
from mmval.methods.c3r import (
    InstrumentAttention,
    c3_risk,
    calibration_kl,
    ce_gradient,
    counterfactual,
    necessity_surrogate,
)
from mmval.methods.imml import IMML, IMMLConfig, info_nce
from mmval.models import ModelConfig, build_model
from mmval.models.fusions.imml import IMMLFusion
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from tests.conftest import assert_trained, quick_recipe, trained


def _set(linear: torch.nn.Linear, weight: list, bias: list) -> None:
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(weight))
        linear.bias.copy_(torch.tensor(bias))


def _softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


# ---------------------------------------------------------------- IMML


def _bank_fusion(bank_size: int = 4) -> IMMLFusion:
    """Width 2, modalities a (2 features) and b (1): bank rows are [a1, a2, b]."""
    fusion = IMMLFusion({"a": 2, "b": 1}, 2, predominant="a", bank_size=bank_size, width=2)
    _set(fusion.query, [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    _set(fusion.key, [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], [0.0, 0.0])
    _set(fusion.value, [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], [0.5, 0.0])
    return fusion


def test_context_attention_over_the_bank_matches_the_hand_computation():
    fusion = _bank_fusion()
    query = torch.tensor([[1.0, 2.0]])
    assert torch.equal(fusion.context(query), torch.zeros(1, 2))  # empty bank: no context
    fusion.enqueue(
        {"a": torch.tensor([[1.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[1.0], [-1.0]])}
    )
    # keys W_k [a1, a2, b]: [1, 0 + 1] and [0, 2 - 1]
    # values W_v [a1, a2, b] + (0.5, 0): [1.5, 1] and [-0.5, 0]
    weights = _softmax([(1 * 1 + 2 * 1) / math.sqrt(2), (1 * 0 + 2 * 1) / math.sqrt(2)])
    want = [weights[0] * 1.5 + weights[1] * -0.5, weights[0] * 1.0 + weights[1] * 0.0]
    got = fusion.context(query)[0].tolist()
    assert got == pytest.approx(want, rel=1e-6)


def test_bank_is_a_fifo_written_only_in_training_and_kept_in_the_state_dict():
    fusion = _bank_fusion(bank_size=3)

    def rows(*values: float) -> dict[str, torch.Tensor]:
        return {
            "a": torch.tensor([[v, v] for v in values]),
            "b": torch.tensor([[v] for v in values]),
        }

    fusion.train()
    first = fusion(rows(1.0, 2.0))
    # the first batch sees an empty bank: its own rows are enqueued after its context
    proj = fusion.project(rows(1.0, 2.0))
    alone = fusion.classifier(torch.cat([proj["a"], proj["b"], torch.zeros(2, 2)], dim=1))
    assert torch.allclose(first, alone)
    fusion(rows(3.0, 4.0))  # slots 2 and 0 (wraps around)
    assert fusion.bank[:, 2].tolist() == [4.0, 2.0, 3.0]
    assert (int(fusion.bank_count), int(fusion.bank_ptr)) == (3, 1)
    fusion.eval()
    before = fusion.bank.clone()
    logits = fusion(rows(5.0))
    assert torch.equal(fusion.bank, before)  # frozen at evaluation
    restored = _bank_fusion(bank_size=3)
    restored.load_state_dict(fusion.state_dict())
    restored.eval()
    assert torch.allclose(restored(rows(5.0)), logits)
    fusion.train()
    fusion(rows(6.0, 7.0, 8.0, 9.0))  # larger than the bank: the last rows stay
    assert sorted(fusion.bank[:, 2].tolist()) == [7.0, 8.0, 9.0]


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


def _imml_model(predominant: str | None = None):
    torch.manual_seed(0)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in "abc"]
    config = ModelConfig(
        encoder={"hidden": [5], "out_dim": 4, "dropout": 0.0},
        fusion="imml",
        fusion_predominant=predominant,
        fusion_bank_size=16,
    )
    return build_model(config, specs, 3)


def _batch(names: str = "abc", n: int = 6, seed: int = 1) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % 3,
        index=torch.arange(n),
    )


def test_imml_loss_anchors_the_contrast_on_the_predominant_modality():
    model, batch = _imml_model("b"), _batch()
    ctx = TrainContext(epoch=0, epochs=1, step=0)
    losses = {}
    for g1, g2 in ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0)):
        method = IMML(IMMLConfig(gamma1=g1, gamma2=g2, temperature=0.1), 3)
        model.eval()  # the bank stays empty, so every pass sees the same context
        out = method.forward(model, batch, ctx)
        losses[g1, g2] = method.objective(model, out, batch, ctx)[0].item()
    proj = model.fusion.project(model.encode(batch.inputs))
    plain = F.cross_entropy(model(batch.inputs).logits, batch.label).item()
    assert losses[0.0, 0.0] == pytest.approx(plain, rel=1e-6)
    con = (info_nce(proj["b"], proj["a"], 0.1) + info_nce(proj["b"], proj["c"], 0.1)) / 2
    assert losses[1.0, 0.0] - plain == pytest.approx(con.item(), rel=1e-5)
    uni = sum(F.cross_entropy(model.fusion.heads[m](proj[m]), batch.label) for m in "abc")
    assert losses[0.0, 1.0] - plain == pytest.approx(uni.item(), rel=1e-5)


def test_imml_picks_the_predominant_modality_by_unimodal_val_accuracy_after_warmup():
    model = _imml_model()
    for m, bias in (("a", [1.0, 0.0, 0.0]), ("b", [0.0, 0.0, 1.0]), ("c", [0.0, 1.0, 0.0])):
        _set(model.fusion.heads[m], torch.zeros(3, 256).tolist(), bias)
    val = Batch(inputs=_batch(n=4).inputs, label=torch.tensor([2, 2, 2, 1]), index=torch.arange(4))
    method = IMML(IMMLConfig(warmup_epochs=2), 3)
    model.train()
    ctx = TrainContext(epoch=0, epochs=3, step=0, batches=lambda role: iter([val]))
    assert method.on_epoch_end(model, ctx) == {"predominant": 0.0}  # still warming up
    ctx.epoch = 1
    assert method.on_epoch_end(model, ctx) == {"predominant": 1.0}  # b: 3 of 4 right
    assert model.training and model.fusion.predominant_name == "b"
    fixed = _imml_model("c")
    ctx.epoch = 1
    assert method.on_epoch_end(fixed, ctx) == {"predominant": 2.0}  # set by the recipe
    assert model.representation(val.inputs).shape == (4, 256 * 4)


# ---------------------------------------------------------------- C3R


def test_closed_form_gradient_equals_autograd_and_the_step_flips_or_keeps_the_label():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(4, 3).double()
    labels = torch.tensor([0, 1, 2, 1, 0])
    logits = head(z)
    (auto,) = torch.autograd.grad(F.cross_entropy(logits, labels, reduction="sum"), z)
    assert torch.allclose(ce_gradient(logits, labels, head.weight), auto)

    # W = I, b = 0, z = (1, 0), y = 0: p = softmax(1, 0), g = (p0 - 1, p1) = (-p1, p1)
    z1, w, y = torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.tensor([0])
    p1 = 1 / (1 + math.e)
    grad = ce_gradient(z1 @ w.T, y, w)
    assert grad[0].tolist() == pytest.approx([-p1, p1], rel=1e-6)
    up = counterfactual(z1, grad, 1.0, "ascent")
    down = counterfactual(z1, grad, 1.0, "descent")
    r = 1 / math.sqrt(2)
    assert up[0].tolist() == pytest.approx([1 - r, r], rel=1e-5)
    assert down[0].tolist() == pytest.approx([1 + r, -r], rel=1e-5)
    assert (up @ w.T).argmax(1).item() == 1  # ascent flips the correct prediction
    assert (down @ w.T).argmax(1).item() == 0  # the official code's descent keeps it


def test_c3_risk_and_its_surrogates_on_hand_made_logits():
    real = [[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]]
    cf = [[0.0, 1.0], [2.0, 0.0], [0.5, 2.0]]
    labels = [0, 0, 1]
    # sufficiency: real argmax (0, 1, 1) wrong on sample 1; necessity: cf argmax (1, 0, 1)
    # still right on samples 1 and 2
    suff, nec = c3_risk(torch.tensor(real), torch.tensor(cf), torch.tensor(labels))
    assert (suff.item(), nec.item()) == pytest.approx((1 / 3, 2 / 3))
    want = sum(-math.log(1 - _softmax(row)[y]) for row, y in zip(cf, labels, strict=True)) / 3
    got = necessity_surrogate(torch.tensor(cf), torch.tensor(labels)).item()
    assert got == pytest.approx(want, rel=1e-6)
    far = torch.tensor([[80.0, -80.0]])  # p_y = 1 - 1e-70: finite where log(1 - p_y) is not
    assert math.isfinite(necessity_surrogate(far, torch.tensor([0])).item())
    p, q = _softmax(real[0]), _softmax(cf[0])
    kl = sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))
    got_kl = calibration_kl(torch.tensor([real[0]]), torch.tensor([cf[0]])).item()
    assert got_kl == pytest.approx(kl, rel=1e-6)


def test_instrument_attention_with_distance_weights_by_hand():
    iv = InstrumentAttention({"a": 2, "b": 2}, out_dim=2)
    for layer in (iv.w_q, iv.w_k, iv.w_v, iv.out):
        _set(layer, [[1.0, 0.0], [0.0, 1.0]], [0.0, 0.0])
    x1, x2 = [1.0, 0.0], [0.0, 2.0]
    # q = k = v = x; unit vectors (1, 0) and (0, 1) are sqrt(2) apart: omega_12 = exp(-2)
    s = [[1 / math.sqrt(2), 0.0], [0.0, 4 / math.sqrt(2)]]
    omega = [[1.0, math.exp(-2)], [math.exp(-2), 1.0]]
    out = [0.0, 0.0]
    for i in range(2):
        raw = [omega[i][j] * math.exp(s[i][j]) for j in range(2)]
        alpha = [r / sum(raw) for r in raw]
        for d in range(2):
            out[d] += (alpha[0] * x1[d] + alpha[1] * x2[d]) / 2
    got = iv({"a": torch.tensor([x1]), "b": torch.tensor([x2])})[0].tolist()
    assert got == pytest.approx(out, rel=1e-6)
    mixed = InstrumentAttention({"a": 2, "b": 5}, out_dim=3)
    assert mixed({"a": torch.ones(4, 2), "b": torch.ones(4, 5)}).shape == (4, 3)


def test_c3r_model_representation_is_z_of_the_head():
    torch.manual_seed(0)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in "ab"]
    encoder = {"hidden": [5], "out_dim": 4, "dropout": 0.0}
    model = build_model(ModelConfig(encoder=encoder, fusion="c3r"), specs, 3).eval()
    inputs = _batch("ab").inputs
    z = model.representation(inputs)
    assert z.shape == (6, 64)
    assert torch.allclose(model.fusion.head(z), model(inputs).logits)


# ---------------------------------------------------------------- recipes and runs


@pytest.mark.parametrize(
    ("method", "changes", "field"),
    [
        ("c3r", {"model__fusion": "concat"}, "model.fusion"),
        ("imml", {"model__fusion": "concat"}, "model.fusion"),
        ("c3r", {"model__fusion": "c3r", "data__modalities": ["a"]}, "data.modalities"),
        ("imml", {"model__fusion": "imml", "data__modalities": ["a"]}, "data.modalities"),
        (
            "imml",
            {
                "model__fusion": "imml",
                "model__fusion_predominant": "c",
                "data__modalities": ["a", "b"],
            },
            "model.fusion.predominant",
        ),
    ],
)
def test_recipe_errors(recipe_file, method, changes, field):
    with pytest.raises(UserError, match=field):
        load_recipe(recipe_file(method={"name": method}, **changes))


def test_unknown_predominant_modality_is_refused_when_the_model_is_built(recipe_file, tmp_path):
    recipe = load_recipe(
        recipe_file(method={"name": "imml"}, model__fusion="imml", model__fusion_predominant="z")
    )
    with pytest.raises(UserError, match=r"model\.fusion\.predominant"):
        Trainer(recipe, 0).run()


@pytest.mark.parametrize(("method", "figure"), [("c3r", "c3_risk"), ("imml", "predominant")])
def test_trains_on_uci_mfeat_and_the_checkpoint_is_valued(tmp_path, uci_dir, method, figure):
    changes = {"data": {"modalities": None}}  # all six views
    result, metrics = trained(quick_recipe(method, uci_dir, tmp_path / "runs", changes=changes))
    assert_trained(result.summary, metrics, 3)
    assert result.summary["test_acc"] > 0.5  # ten classes
    assert metrics[f"method_{figure}"].notna().all()
    best = result.run_dir / "best.pt"
    if method == "imml":  # the bank travels with the checkpoint
        state = torch.load(best, map_location="cpu", weights_only=True)["model"]
        assert int(state["fusion.bank_count"]) > 0
    out = tmp_path / "contrib.parquet"
    value = CliRunner().invoke(app, ["value", str(best), "--out", str(out), "--split", "test"])
    assert value.exit_code == 0, value.output
    table = pd.read_parquet(out)
    assert table["sample_id"].nunique() == 400 and table["contribution"].notna().all()
