"""AGM, PMR, MMCosine, OPM and CML: their arithmetic against independent computations, recipe
errors, resume, and short training runs on uci-mfeat (6 modalities) and synthetic audio-visual
clips (ResNet-18)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mmval.data.dataset import Batch, ParquetSamples, collate_batch
from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods.agm import (
    AGM,
    AGMConfig,
    agm_scores,
    coefficients,
    unimodal_outputs,
)
from mmval.methods.base import TrainContext
from mmval.methods.cml import CML, CMLConfig, cml_loss
from mmval.methods.opm import OPM, OPMConfig, drop_features, drop_probabilities
from mmval.methods.pmr import PMR, PMRConfig, prototype_weights
from mmval.models import ModelConfig, build_model
from mmval.recipe import load_recipe
from mmval.valuation.run import load_with_data
from tests.conftest import quick_recipe, trained


def _model(names, fusion="concat", dropout=0.0, num_classes=3, seed=0):
    torch.manual_seed(seed)
    specs = [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]
    config = ModelConfig(encoder={"hidden": [5], "out_dim": 4, "dropout": dropout}, fusion=fusion)
    return build_model(config, specs, num_classes)


def _batch(names, n=6, num_classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(
        inputs={m: torch.randn(n, 3, generator=g) for m in names},
        label=torch.arange(n) % num_classes,
        index=torch.arange(n),
    )


# ---------------------------------------------------------------- AGM


def test_agm_unimodal_outputs_match_the_official_and_balancemm_formulas():
    z = torch.randn(4, 2, 3)  # subsets {}, {a}, {v}, {a, v}
    phi = unimodal_outputs(z)
    full, only_a, only_v = z[3], z[1], z[2]
    # official CREMAD_net.py: m_a = (total - pad_audio + pad_visual) / 2, pad_audio = z(0, v)
    assert torch.allclose(phi[0], 0.5 * (full - only_v + only_a), atol=1e-6)
    assert torch.allclose(phi[1], 0.5 * (full - only_a + only_v), atol=1e-6)
    z3 = torch.randn(8, 2, 3)  # bit j of the row index: modality j present (a=0, v=1, t=2)
    A, V, AV, T, AT, VT, AVT = (z3[i] for i in range(1, 8))
    phi3 = unimodal_outputs(z3)
    # BalanceBenchmark AGM_trainer.py Modality_Audio / Modality_Text
    assert torch.allclose(phi3[0], (AVT - VT) / 3 + (AV - V + AT - T) / 6 + A / 3, atol=1e-6)
    assert torch.allclose(phi3[2], (AVT - AV) / 3 + (VT - V + AT - A) / 6 + T / 3, atol=1e-6)
    assert torch.allclose(phi3.sum(0), AVT, atol=1e-5)  # z(empty) counts as 0


def test_agm_scores_ratios_and_coefficients_by_hand():
    phi = torch.tensor([[[2.0, 0.0]], [[0.0, 1e6]]])  # [M=2, B=1, C=2], label 0
    scores = agm_scores(phi, torch.tensor([0]))
    assert scores[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-2))), rel=1e-5)
    assert scores[1].item() == pytest.approx(-math.log(1e-8), rel=1e-5)  # clamped
    s, running = torch.tensor([0.5, 1.5], dtype=torch.float64), torch.tensor([1.0, 0.8])
    k = coefficients(s, running.double(), alpha=0.7, cap=10.0)
    k_a = math.exp(0.7 * (math.exp(0.8 - 1.0) - math.exp(1.5 - 0.5)))
    k_v = math.exp(0.7 * min(math.exp(1.0 - 0.8) - math.exp(0.5 - 1.5), 10))
    assert k.tolist() == pytest.approx([k_a, k_v])
    big = coefficients(torch.tensor([0.0, 0.0]).double(), torch.tensor([9.0, 0.0]).double(), 1, 2)
    assert big[1].item() == pytest.approx(math.exp(2.0))  # exp(9) - 1 capped at 2
    # M = 3: r_m = exp(3/2 (mean s - s_m))
    s3 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    k3 = coefficients(s3, torch.full((3,), 2.0, dtype=torch.float64), 1.0, 10.0)
    expected = [math.exp(1 - math.exp(1.5 * (2.0 - x))) for x in (1.0, 2.0, 3.0)]
    assert k3.tolist() == pytest.approx(expected)


def test_agm_masked_forwards_are_eval_mode_zeroed_inputs():
    names = ["a", "b", "c"]
    model = _model(names, dropout=0.5).train()
    batch = _batch(names)
    method = AGM(AGMConfig(), 3)
    full = torch.randn(6, 3)
    got = method.subset_logits(model, batch.inputs, full)
    assert model.training
    model.eval()
    with torch.no_grad():
        for s in range(7):
            inputs = {
                m: x if s >> j & 1 else torch.zeros_like(x)
                for j, (m, x) in enumerate(batch.inputs.items())
            }
            assert torch.allclose(got[s], model(inputs).logits, atol=1e-5)
    assert torch.equal(got[7], full)


def test_agm_after_backward_scales_encoders_updates_running_scores_and_clips():
    names = ["a", "v"]
    model, batch = _model(names), _batch(names)
    method = AGM(AGMConfig(alpha=0.5, clip_threshold=1e9), 3)
    method.running = torch.tensor([0.4, 1.1], dtype=torch.float64)
    out = model(batch.inputs)
    F.cross_entropy(out.logits, batch.label).backward()
    before = {n: p.grad.clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        phi = unimodal_outputs(method.subset_logits(model, batch.inputs, out.logits))
        scores = agm_scores(phi, batch.label).double()
    figures = method.after_backward(model, out, batch, TrainContext(epoch=0, epochs=1, step=2))
    k = coefficients(scores, torch.tensor([0.4, 1.1], dtype=torch.float64), 0.5, 10.0)
    assert [figures["coef_a"], figures["coef_v"]] == pytest.approx(k.tolist())
    for name, param in model.named_parameters():
        if name.startswith("encoders."):
            factor = k[0] if name.startswith("encoders.a.") else k[1]
            assert torch.allclose(param.grad, before[name] * float(factor), atol=1e-7)
    # the head: W[:, a] by k_a, W[:, v] by k_v (out_dim 4 each), the bias by their mean
    grad, was = model.fusion.fc.weight.grad, before["fusion.fc.weight"]
    assert torch.allclose(grad[:, :4], was[:, :4] * float(k[0]), atol=1e-7)
    assert torch.allclose(grad[:, 4:], was[:, 4:] * float(k[1]), atol=1e-7)
    bias = before["fusion.fc.bias"] * float(k.mean())
    assert torch.allclose(model.fusion.fc.bias.grad, bias, atol=1e-7)
    running = torch.tensor([0.4, 1.1], dtype=torch.float64) * 2 / 3 + scores / 3  # t = 3
    assert torch.allclose(method.running, running)
    assert figures["clipped"] == 0.0
    # a low threshold clips the whole model to clip_norm
    method.config.clip_threshold, method.config.clip_norm = 1e-6, 0.01
    method.after_backward(model, out, batch, TrainContext(epoch=5, epochs=6, step=3))
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert norm.item() == pytest.approx(0.01, rel=1e-4)


# ---------------------------------------------------------------- PMR


def test_pmr_weights_only_the_weaker_modalities():
    assert prototype_weights(torch.tensor([3.0, 1.0]), 2.0).tolist() == [0.0, 2.0]
    assert prototype_weights(torch.tensor([1.0, 3.0]), 2.0).tolist() == [2.0, 0.0]
    assert prototype_weights(torch.tensor([2.0, 2.0]), 2.0).tolist() == [0.0, 0.0]
    assert prototype_weights(torch.tensor([1.0, 3.0, 2.0]), 0.5).tolist() == [0.5, 0.0, 0.5]


def test_pmr_loss_by_hand():
    names = ["a", "v"]
    model, batch = _model(names), _batch(names, n=4)
    method = PMR(PMRConfig(alpha=0.7), 3)
    method.prototypes = {m: torch.randn(3, 4) for m in names}
    out = model(batch.inputs)
    loss = method.loss(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    expected = F.cross_entropy(out.logits, batch.label)
    q, score = {}, {}
    for m in names:
        h, c = out.features[m], method.prototypes[m]
        dist = torch.stack([torch.stack([(hi - ck).norm() for ck in c]) for hi in h])
        q[m] = -dist
        score[m] = sum(q[m].softmax(1)[i, y] for i, y in enumerate(batch.label.tolist()))
    weaker = "v" if score["a"] > score["v"] else "a"
    expected = expected + 0.7 * F.cross_entropy(q[weaker], batch.label)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    method.config.modulation_starts = 1
    plain = method.loss(model, out, batch, TrainContext(epoch=0, epochs=2, step=0))
    assert plain.item() == pytest.approx(F.cross_entropy(out.logits, batch.label).item())


def test_pmr_prototypes_tenth_ema_and_absent_classes():
    names = ["a", "v"]
    model = _model(names, dropout=0.5).train()
    batches = [_batch(names, n=10, seed=s) for s in range(3)]  # labels 0,1,2,0,1,...
    ctx = TrainContext(epoch=0, epochs=3, step=0, batches=lambda role: iter(batches))
    method = PMR(PMRConfig(momentum=0.25), 3)
    method.compute_prototypes(model, ctx)  # before epoch 0: size unknown, every sample
    assert model.training
    model.eval()
    with torch.no_grad():
        feats = [model.encode(b.inputs) for b in batches]
    h_all = torch.cat([f["a"] for f in feats])
    y_all = torch.cat([b.label for b in batches])
    first = torch.stack([h_all[y_all == k].mean(0) for k in range(3)])
    assert torch.allclose(method.prototypes["a"], first, atol=1e-6)
    # the first tenth of 50 samples: 5 samples, labels 0,1,2,0,1 (class 2 from one sample)
    method.train_size = 50
    old = {m: c.clone() for m, c in method.prototypes.items()}
    method.compute_prototypes(model, TrainContext(epoch=1, epochs=3, step=0, batches=ctx.batches))
    h5, y5 = h_all[:5], y_all[:5]
    new = torch.stack([h5[y5 == k].mean(0) for k in range(3)])
    assert torch.allclose(method.prototypes["a"], 0.75 * new + 0.25 * old["a"], atol=1e-6)
    # a class missing from the samples read keeps its previous prototype
    method.train_size = 20  # 2 samples: classes 0 and 1
    old = {m: c.clone() for m, c in method.prototypes.items()}
    method.compute_prototypes(model, TrainContext(epoch=0, epochs=3, step=0, batches=ctx.batches))
    assert torch.allclose(method.prototypes["v"][2], old["v"][2])
    assert torch.allclose(method.prototypes["v"][0], feats[0]["v"][0], atol=1e-6)


# ---------------------------------------------------------------- MMCosine


def test_mmcosine_logits_match_the_official_formula():
    names = ["a", "v", "t"]
    model = _model(names, fusion="cosine").eval()
    batch = _batch(names)
    out = model(batch.inputs)
    weight = model.fusion.fc.weight
    expected = 0
    for j, m in enumerate(names):  # main_CD.py: mm(normalize(h), normalize(W_slice.T, dim=0)) * s
        w = weight[:, 4 * j : 4 * (j + 1)]
        expected = expected + 10 * F.normalize(out.features[m], dim=1) @ F.normalize(w.T, dim=0)
    assert torch.allclose(out.logits, expected, atol=1e-5)


def test_mmcosine_logs_the_official_linear_head_accuracy(uci_dir, tmp_path):
    """`acc` is the cosine prediction; `<split>_linear_acc` is main_CD.py's `valid`, the plain
    concat head over the raw features, scored on the same model."""
    recipe = quick_recipe("mmcosine", uci_dir, tmp_path / "runs", epochs=2)
    result, metrics = trained(recipe)
    loaded = load_with_data(result.run_dir / "best.pt")
    model = loaded.model.eval()
    data = ParquetSamples(uci_dir, "test", model.modalities)
    feats, labels = {m: [] for m in model.modalities}, []
    for batch in DataLoader(data, batch_size=256, collate_fn=collate_batch):
        with torch.no_grad():
            out = model(batch.inputs)
        for m in model.modalities:
            feats[m].append(out.features[m])
        labels.append(batch.label)
    h = torch.cat([torch.cat(feats[m]) for m in model.modalities], dim=1)
    weight = model.fusion.fc.weight  # [C, sum of dims]: main_CD.py's fc_out over cat(a, v)
    linear = (h @ weight.T).argmax(1)
    label = torch.cat(labels)
    best = metrics[metrics["epoch"] == loaded.ckpt.epoch].iloc[0]
    assert best["test_linear_acc"] == pytest.approx((linear == label).float().mean().item())
    assert "val_linear_acc" in metrics.columns
    cosine = model.fuse({m: torch.cat(feats[m]) for m in model.modalities}).argmax(1)
    assert best["test_acc"] == pytest.approx((cosine == label).float().mean().item())


# ---------------------------------------------------------------- OPM


def test_opm_drop_probabilities_and_feature_scaling():
    # calcu_q and Modality_drop (BML_TPAMI2024 code/models/Classifier.py): no epsilon anywhere
    q = drop_probabilities(torch.tensor([3.0, 1.0]), q_base=0.5, alpha=0.5)
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(3 / 1 - 1)), 0.0], rel=1e-6)
    q3 = drop_probabilities(torch.tensor([6.0, 1.0, 2.0]), q_base=0.8, alpha=1.0)
    assert q3.tolist() == pytest.approx([1.0, 0.0, 0.0])  # 0.8 (1 + tanh(1)) clipped at 1
    assert drop_probabilities(torch.tensor([2.0, 2.0, 1.0]), 0.4, 0.5).tolist() == [0, 0, 0]
    assert drop_probabilities(torch.tensor([0.0, 0.0]), 0.5, 0.5).tolist() == [0, 0]  # 0/0
    feats = {"a": torch.ones(2, 3), "v": torch.ones(2, 1)}
    keep = {"a": torch.tensor([1.0, 0.0]), "v": torch.tensor([1.0, 1.0])}
    out = drop_features(feats, torch.tensor([0.5, 0.0]), keep)
    scale = 1 / (1 - 3 * 0.5 / 4)
    assert torch.allclose(out["a"], torch.tensor([[scale] * 3, [0.0] * 3]))
    assert torch.allclose(out["v"], torch.full((2, 1), scale))


def test_opm_defaults_are_the_official_script():
    # train_opm.sh: --q_base 0.5 --lam 0.5 --p_exe 0.7; main.py: warm_up while epoch <= 5
    cfg = OPMConfig()
    assert (cfg.q_base, cfg.alpha, cfg.p_exe) == (0.5, 0.5, 0.7)
    assert [cfg.modulates(e) for e in range(8)] == [False] * 6 + [True] * 2
    assert cfg.modulates(10_000)  # no end: the official code drops to the last epoch
    old = OPMConfig(modulation_starts=0, modulation_ends=80)  # old recipes still load
    assert old.modulates(0) and not old.modulates(81)


def test_opm_drops_nothing_in_epochs_0_to_5():
    names = ["a", "v"]
    model, batch = _model(names).eval(), _batch(names)
    plain = model(batch.inputs).logits
    method = OPM(OPMConfig(p_exe=1.0), 3)  # every batch in the window is modulated
    for epoch in range(6):
        out = method.forward(model, batch, TrainContext(epoch=epoch, epochs=10, step=0))
        assert torch.equal(out.logits, plain)
    dropped = method.forward(model, batch, TrainContext(epoch=6, epochs=10, step=0))
    assert not torch.allclose(dropped.logits, plain)  # the 1 / (1 - theta) scale at least


def test_opm_forward_drops_the_dominant_modality():
    names = ["a", "v"]
    model, batch = _model(names).eval(), _batch(names)
    ctx = TrainContext(epoch=6, epochs=7, step=0)
    plain = model(batch.inputs).logits
    never = OPM(OPMConfig(p_exe=0.0), 3).forward(model, batch, ctx)
    assert torch.allclose(never.logits, plain)
    with torch.no_grad():
        out = model(batch.inputs)
        scores = torch.stack(
            [out.unimodal_logits[m].softmax(1)[torch.arange(6), batch.label].sum() for m in names]
        )
    strong = names[int(scores.argmax())]
    always = OPM(OPMConfig(p_exe=1.0, q_base=1.0), 3).forward(model, batch, ctx)
    theta = 1.0 * 4 / 8  # the strong modality drops with q = 1; equal feature sizes
    feats = {
        m: torch.zeros_like(h) if m == strong else h / (1 - theta) for m, h in out.features.items()
    }
    assert torch.allclose(always.logits, model.fuse(feats), atol=1e-5)


# ---------------------------------------------------------------- CML


def test_cml_loss_by_hand():
    label = torch.tensor([0, 1])
    z0 = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    z1 = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    z2 = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    conf = [torch.softmax(z, 1).max(1).values for z in (z0, z1, z2)]
    ce = sum(F.cross_entropy(z, label) for z in (z0, z1, z2)) / 3
    penalty = max(0.0, float((conf[1] - conf[0]).sum())) + max(
        0.0, float((conf[2] - conf[1]).sum())
    )
    got = cml_loss([z0, z1, z2], label, lam=0.3)
    assert got.item() == pytest.approx(ce.item() + 0.3 * penalty, rel=1e-6)


def test_cml_removes_modalities_in_the_epoch_order():
    names = ["a", "v", "t"]
    model, batch = _model(names), _batch(names)
    method = CML(CMLConfig(lam=0.2), 3)
    method.order = [2, 0, 1]  # t first, then a
    out = model(batch.inputs)
    loss = method.loss(model, out, batch, TrainContext(epoch=0, epochs=1, step=0))
    z = out.unimodal_logits
    bias = model.fusion.fc.bias / 3
    # BalanceBenchmark's concat form: drop z_m and add back its bias share
    nested = [out.logits, out.logits - z["t"] + bias, out.logits - z["t"] - z["a"] + 2 * bias]
    assert loss.item() == pytest.approx(cml_loss(nested, batch.label, 0.2).item(), rel=1e-5)
    method.config.modulation_starts = 1
    plain = method.loss(model, out, batch, TrainContext(epoch=0, epochs=2, step=0))
    assert plain.item() == pytest.approx(F.cross_entropy(out.logits, batch.label).item())


# ---------------------------------------------------------------- recipes, resume, training


@pytest.mark.parametrize(
    ("method", "changes", "field"),
    [
        ({"name": "agm"}, {"model__fusion": "film"}, "model.fusion"),
        ({"name": "agm", "modulation_starts": 3, "modulation_ends": 1}, {}, "modulation_ends"),
        ({"name": "agm"}, {"data__modalities": ["a"]}, "data.modalities"),
        ({"name": "pmr", "modulation_starts": 3, "modulation_ends": 1}, {}, "modulation_ends"),
        ({"name": "pmr"}, {"data__modalities": ["a"]}, "data.modalities"),
        ({"name": "mmcosine"}, {"model__fusion": "concat"}, "model.fusion"),
        ({"name": "opm"}, {"model__fusion": "gated"}, "model.fusion"),
        ({"name": "opm", "p_exe": 1.5}, {}, "p_exe"),
        ({"name": "cml"}, {"data__modalities": ["b"]}, "data.modalities"),
        ({"name": "cml", "lam": -1}, {}, "lam"),
    ],
)
def test_recipe_errors(recipe_file, method, changes, field):
    with pytest.raises(UserError, match=field):
        load_recipe(recipe_file(method=method, **changes))
