"""Valuation engine: the evaluation paths agree, CMoB's arithmetic, tables and their metadata,
valuation during training."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.data.dataset import Batch, ParquetSamples
from mmval.data.shards import ModalitySpec, check_data_dir
from mmval.errors import UserError
from mmval.models import ModelConfig, build_model
from mmval.recipe import load_recipe, parse_recipe
from mmval.runner import Trainer
from mmval.valuation.base import Game
from mmval.valuation.config import ValuationConfig
from mmval.valuation.engine import SubsetEvaluator, mask_fills
from mmval.valuation.registry import build_method
from mmval.valuation.run import value_checkpoint, value_dataset, write_valuation
from mmval.valuation.shapley import shapley_matrix
from mmval.valuation.summary import contribution_gaps, contribution_summary
from mmval.valuation.table import weights_fingerprint

CPU = torch.device("cpu")


def train(root: Path, synthetic_dir: Path, name: str, **changes: object) -> Path:
    raw: dict = {
        "name": name,
        "seeds": [0],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 3, "batch_size": 32},
        "output": str(root),
        **changes,
    }
    Trainer(parse_recipe(raw, name), 0).run()
    return root / name / "seed0" / "best.pt"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, synthetic_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    gated = {
        "model": {"encoder": {"hidden": [16], "out_dim": 8}, "fusion": "gated"},
        "data": {"path": str(synthetic_dir), "modalities": ["a", "b"]},
    }
    small = {"encoder": {"hidden": [16], "out_dim": 8}}
    return {
        "concat": train(root, synthetic_dir, "concat"),
        "gated": train(root, synthetic_dir, "gated", **gated),
        "late": train(root, synthetic_dir, "late", model={**small, "fusion": "late"}),
        "cosine": train(root, synthetic_dir, "cosine", model={**small, "fusion": "cosine"}),
        "shared": train(root, synthetic_dir, "shared", model={**small, "fusion": "shared"}),
        "qmf": train(root, synthetic_dir, "qmf", model={**small, "fusion": "qmf"}),
        "tmc": train(root, synthetic_dir, "tmc", model={**small, "fusion": "tmc"}),
    }


@pytest.mark.parametrize("fusion", ["concat", "gated", "late", "cosine", "shared", "qmf", "tmc"])
@pytest.mark.parametrize(
    ("method", "mask", "benefit"),
    [
        ("shapley", "feature", "correct"),
        ("shapley", "input", "prob"),
        ("shapley", "mean", "correct"),
        ("shapley-mc", "feature", "prob"),
        ("shapley-mc", "input", "correct"),
        ("cmob", "mean", "prob"),
        ("cmob", "feature", "correct"),
    ],
)
def test_fast_and_naive_paths_give_the_same_table(checkpoints, fusion, method, mask, benefit):
    permutations = 6 if method == "shapley-mc" else None
    config = ValuationConfig(method=method, mask=mask, benefit=benefit, permutations=permutations)
    fast = value_checkpoint(checkpoints[fusion], config=config, batch_size=32)
    naive = value_checkpoint(checkpoints[fusion], config=config, batch_size=32, path="naive")
    assert fast.metadata == naive.metadata
    # Under `correct` every value is a multiple of 1/M!: the tables are equal bit for bit.
    # Probabilities differ in the last float32 bits (shares summed vs one head call).
    exact = benefit == "correct"
    pd.testing.assert_frame_equal(fast.table, naive.table, check_exact=exact, atol=1e-6)
    assert fast.table["correct"].mean() > 0.5  # a trained model: the comparison means something


def _synthetic(synthetic_dir: Path) -> tuple[ParquetSamples, list[ModalitySpec]]:
    dataset = ParquetSamples(synthetic_dir, "test", ["a", "b", "c"])
    return dataset, dataset.specs


@pytest.mark.parametrize("mask", ["input", "mean"])
def test_joint_path_matches_late_fusion(synthetic_dir, mask):
    dataset, specs = _synthetic(synthetic_dir)
    torch.manual_seed(0)
    model = build_model(ModelConfig(fusion="concat"), specs, 4)
    train = ParquetSamples(synthetic_dir, "train", ["a", "b", "c"])
    fills = mask_fills(mask, specs, train)
    config = ValuationConfig(mask=mask, benefit="prob")
    method = build_method(config, ["a", "b", "c"])
    late = value_dataset(model, dataset, method, config, fills=fills, device=CPU)
    joint = value_dataset(model, dataset, method, config, fills=fills, device=CPU, path="joint")
    assert torch.allclose(
        torch.tensor(late.contribution), torch.tensor(joint.contribution), atol=1e-6
    )
    assert (late.pred == joint.pred).all()


def test_input_masking_encodes_each_batch_once_and_the_zero_input_once(synthetic_dir):
    dataset, specs = _synthetic(synthetic_dir)
    model = build_model(ModelConfig(fusion="concat"), specs, 4)
    calls: Counter[str] = Counter()
    for name, encoder in model.encoders.items():
        encoder.register_forward_hook(lambda *_, name=name: calls.update([name]))
    config = ValuationConfig(mask="input")
    method = build_method(config, ["a", "b", "c"])
    fills = mask_fills("input", specs)
    value_dataset(model, dataset, method, config, fills=fills, device=CPU, batch_size=32)
    assert calls == {"a": 3 + 1, "b": 3 + 1, "c": 3 + 1}  # 80 samples in 3 batches, 1 fill
    calls.clear()
    value_dataset(
        model, dataset, method, config, fills=fills, device=CPU, batch_size=32, path="naive"
    )
    assert calls == {"a": 3 * 8, "b": 3 * 8, "c": 3 * 8}


class EarlyFusion(nn.Module):
    """Not a MultimodalModel: one network over all raw inputs, so no feature to zero."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.net(torch.cat([inputs[m] for m in ("a", "b", "c")], 1))


def test_other_models_batch_all_subsets_into_one_forward(synthetic_dir):
    dataset, specs = _synthetic(synthetic_dir)
    torch.manual_seed(1)
    model = EarlyFusion()
    forwards = Counter()
    model.register_forward_hook(lambda *_: forwards.update(["forward"]))
    config = ValuationConfig(mask="input", benefit="prob")
    method = build_method(config, ["a", "b", "c"])
    fills = mask_fills("input", specs)
    joint = value_dataset(model, dataset, method, config, fills=fills, device=CPU, batch_size=40)
    assert forwards["forward"] == 2  # one per batch, all 8 subsets in it
    naive = value_dataset(
        model, dataset, method, config, fills=fills, device=CPU, batch_size=40, path="naive"
    )
    assert torch.allclose(
        torch.tensor(joint.contribution), torch.tensor(naive.contribution), atol=1e-6
    )
    with pytest.raises(UserError, match="--mask feature"):
        value_dataset(model, dataset, method, ValuationConfig(), fills=None, device=CPU)


def test_mean_masking_refuses_token_ids():
    spec = ModalitySpec(name="text", dtype="int32", shape=[16], encoding="tokens", vocab_size=9)
    with pytest.raises(UserError, match="token ids"):
        mask_fills("mean", [spec])
    assert mask_fills("input", [spec.model_copy(update={"pad_id": 3})])["text"].tolist() == [3] * 16


class TableEvaluator(SubsetEvaluator):
    """Logits chosen per subset: a game with known outcomes."""

    def __init__(self, table: torch.Tensor) -> None:  # [2^M, B, C]
        self.table = table
        self.modalities = [f"x{j}" for j in range(table.shape[0].bit_length() - 1)]

    def logits(self, prepared, keep):
        codes = (keep.long() << torch.arange(keep.shape[-1])).sum(-1)  # [K, B]
        return self.table[codes, torch.arange(keep.shape[1])]


def table_game(confidence: dict[int, list[float]]) -> Game:
    """Two classes, label 0: a subset (bit j = modality j) is right iff its confidence > 0.5."""
    samples = len(next(iter(confidence.values())))
    p = torch.full((8, samples), 0.5, dtype=torch.float64)
    for code, values in confidence.items():
        p[code] = torch.tensor(values, dtype=torch.float64)
    table = torch.stack([p.log(), (1 - p).log()], -1)
    labels = torch.zeros(samples, dtype=torch.long)
    return Game(TableEvaluator(table), Batch({}, labels, torch.arange(samples)), "correct")


def test_cmob_by_hand():
    a, b, c = 1, 2, 4
    g = table_game(
        {
            a | b | c: [0.90, 0.99, 0.99],
            b | c: [0.80, 0.80, 0.55],  # sample 2: right, but below {b}: B = 0
            a | c: [0.40, 0.40, 0.40],  # wrong
            a | b: [0.95, 0.95, 0.95],  # sample 0: above the full set, so B(full) = 0
            a: [0.70, 0.70, 0.70],
            b: [0.60, 0.60, 0.60],
            c: [0.30, 0.30, 0.30],
        }
    )
    config = ValuationConfig(method="cmob", confidence="subsets")
    out = build_method(config, ["x0", "x1", "x2"]).value(g)
    assert out.v_full.tolist() == [0, 3, 3]
    assert out.contribution.tolist() == [[-1, 1, -2], [2, 4, 1], [4, 4, 1]]
    assert out.pred.tolist() == [0, 0, 0]


def test_cmob_treatment_reading_by_hand():
    """The same game read with `confidence: treatment`: in ITE_j the full set needs only to be
    as confident as S minus j; S minus j and {j} count unconditioned."""
    a, b, c = 1, 2, 4
    g = table_game(
        {
            a | b | c: [0.90, 0.99, 0.99],
            b | c: [0.80, 0.80, 0.55],
            a | c: [0.40, 0.40, 0.40],
            a | b: [0.95, 0.95, 0.95],
            a: [0.70, 0.70, 0.70],
            b: [0.60, 0.60, 0.60],
            c: [0.30, 0.30, 0.30],
        }
    )
    config = ValuationConfig(method="cmob", confidence="treatment")
    out = build_method(config, ["x0", "x1", "x2"]).value(g)
    # phi_j = 3 [conf(S) >= conf(S - j)] - B(S - j) + B({j}); B(S - j) = 2, 0, 2; B({j}) = 1, 1, 0
    assert out.contribution.tolist() == [[2, 4, -2], [2, 4, 1], [2, 4, 1]]
    assert out.v_full.tolist() == [3, 3, 3]
    assert ValuationConfig(method="cmob").cmob_confidence == "treatment"  # the default
    with pytest.raises(ValueError, match="cmob only"):
        ValuationConfig(confidence="treatment")
    with pytest.raises(ValueError, match="cmob only"):
        ValuationConfig(method="shapley-mc", confidence_score="true_class")
    # stored recipes of earlier versions hold the old default `confidence: subsets` everywhere
    assert ValuationConfig.model_validate({"method": "shapley", "confidence": "subsets"}) == (
        ValuationConfig()
    )


@pytest.mark.parametrize(
    ("confidence", "score", "want"),
    [
        ("subsets", "true_class", [1, 3]),
        ("subsets", "max_softmax", [-1, 1]),  # {a} is wrong but surer than the full set
        ("treatment", "true_class", [1, 3]),
        ("treatment", "max_softmax", [1, 1]),  # only ITE_b compares the full set with {a}
    ],
)
def test_cmob_confidence_score(confidence, score, want):
    """Full set right with 0.8; {a} wrong, the label at 0.1 (so 0.9 on the other class); {b}
    right with 0.6. Only max_softmax sees {a}'s confidence above the full set's."""
    a, b = 1, 2
    g = table_game({a | b: [0.8], a: [0.1], b: [0.6]})
    config = ValuationConfig(method="cmob", confidence=confidence, confidence_score=score)
    assert build_method(config, ["x0", "x1"]).value(g).contribution.tolist() == [want]


@pytest.mark.parametrize("confidence", ["subsets", "treatment"])
def test_cmob_is_twice_shapley_for_two_modalities_when_the_full_set_is_most_confident(confidence):
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(4, 50, generator=gen, dtype=torch.float64) * 0.9
    p[3] = 0.95  # the full set: most confident
    table = torch.stack([p.log(), (1 - p).log()], -1)
    labels = torch.zeros(50, dtype=torch.long)
    g = Game(TableEvaluator(table), Batch({}, labels, torch.arange(50)), "correct")
    config = ValuationConfig(method="cmob", confidence=confidence, confidence_score="true_class")
    cmob = build_method(config, ["x0", "x1"]).value(g).contribution
    exact = build_method(ValuationConfig(), ["x0", "x1"]).value(g).contribution
    assert torch.equal(cmob, 2 * exact)
    benefit = g.play(torch.tensor([[False, False], [True, False], [False, True], [True, True]]))
    assert torch.equal(exact, benefit.benefit.T @ shapley_matrix(2))


def test_table_metadata_and_wide_layout(checkpoints, synthetic_dir, tmp_path):
    config = ValuationConfig(method="shapley-mc", permutations=3, seed=5, mask="input")
    result = value_checkpoint(checkpoints["concat"], config=config)
    table = result.table
    assert list(table.columns) == [
        "sample_id",
        "label",
        "class",
        "modality",
        "contribution",
        "pred",
        "correct",
        "v_full",
        "stderr",
    ]
    assert table["sample_id"].is_monotonic_increasing and len(table) == 80 * 3
    assert list(table["modality"][:3]) == ["a", "b", "c"]
    write_valuation(result, tmp_path / "long.parquet")
    write_valuation(result, tmp_path / "wide.parquet", wide=True)
    meta = pq.read_schema(tmp_path / "wide.parquet").metadata
    weights = load_checkpoint(checkpoints["concat"]).model
    assert meta[b"mmval.method"] == b"shapley-mc" and meta[b"mmval.mask"] == b"input"
    assert meta[b"mmval.benefit"] == b"correct" and meta[b"mmval.layout"] == b"wide"
    assert meta[b"mmval.permutations"] == b"3" and meta[b"mmval.seed"] == b"5"
    assert meta[b"mmval.checkpoint_fingerprint"].decode() == weights_fingerprint(weights)
    assert meta[b"mmval.data_fingerprint"].decode() == check_data_dir(synthetic_dir).fingerprint()
    wide = pd.read_parquet(tmp_path / "wide.parquet")
    assert list(wide.columns) == [
        "sample_id",
        "label",
        "class",
        "pred",
        "correct",
        "v_full",
        "a",
        "b",
        "c",
        "stderr_a",
        "stderr_b",
        "stderr_c",
    ]
    long = pd.read_parquet(tmp_path / "long.parquet")
    pd.testing.assert_frame_equal(long, table)
    back = long.pivot(index="sample_id", columns="modality", values="contribution")
    assert (back[["a", "b", "c"]].to_numpy() == wide[["a", "b", "c"]].to_numpy()).all()
    assert not list(tmp_path.glob(".*.tmp"))


def test_summary_and_gaps():
    table = pd.DataFrame(
        {
            "sample_id": ["s0", "s0", "s0", "s1", "s1", "s1"],
            "modality": ["a", "b", "c"] * 2,
            "contribution": [1.0, 0.5, 0.5, 2.0, 1.0, 0.0],
        }
    )
    summary = contribution_summary(table).set_index("modality")
    assert summary["mean"].tolist() == [1.5, 0.75, 0.25]
    assert summary["weakest_share"].tolist() == [0.0, 0.0, 0.5]  # s0: b and c tie
    assert summary["gap"].tolist() == pytest.approx([-1.0, 0.125, 0.875])
    gaps = contribution_gaps(table).set_index("modality")
    assert gaps.loc["a", "c"] == 1.25 and gaps.loc["c", "a"] == -1.25 and gaps.loc["b", "b"] == 0


def test_valuation_during_training_leaves_training_unchanged(recipe_file, tmp_path):
    valuation = {"every": 2, "subset": 0.5, "method": "shapley-mc", "permutations": 3}
    valuation["mask"] = "mean"  # reads the training split before the first epoch
    plain = load_recipe(recipe_file(train__epochs=4, name="plain"))
    valued = load_recipe(recipe_file(train__epochs=4, name="valued", valuation=valuation))
    assert plain.settings_hash() == valued.settings_hash()
    Trainer(plain, 0).run()
    Trainer(valued, 0).run()
    runs = tmp_path / "runs"
    a = pd.read_parquet(runs / "plain/seed0/metrics.parquet").drop(
        columns=["seconds", "data_seconds"]
    )
    b = pd.read_parquet(runs / "valued/seed0/metrics.parquet").drop(
        columns=["seconds", "data_seconds"]
    )
    pd.testing.assert_frame_equal(a, b)
    run = runs / "valued/seed0"
    assert sorted(p.name for p in run.glob("contrib_*")) == [
        "contrib_epoch2.parquet",
        "contrib_epoch4.parquet",
    ]
    assert not list(run.glob(".*.tmp")) and not list((runs / "plain/seed0").glob("contrib_*"))
    second, fourth = (pd.read_parquet(run / f"contrib_epoch{k}.parquet") for k in (2, 4))
    assert len(second) == 120 * 3 and set(second["sample_id"]) == set(fourth["sample_id"])
    assert second["sample_id"].str.startswith("train-").all()
    assert not second["contribution"].equals(fourth["contribution"])
    meta = pq.read_schema(run / "contrib_epoch4.parquet").metadata
    assert meta[b"mmval.epoch"] == b"4" and meta[b"mmval.split"] == b"train"
    weights = load_checkpoint(run / "last.pt").model  # saved after epoch 4
    assert meta[b"mmval.checkpoint_fingerprint"].decode() == weights_fingerprint(weights)


def test_recipe_valuation_errors(recipe_file):
    with pytest.raises(UserError, match=r"valuation\.subset"):
        load_recipe(recipe_file(valuation={"every": 1, "subset": 0}))
    with pytest.raises(UserError, match="shapley-mc only"):
        load_recipe(recipe_file(valuation={"every": 1, "permutations": 10}))
