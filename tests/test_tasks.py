"""Tasks beyond clip classification: regression (CMU-MOSI scores), event localisation (AVE
features) and volumetric segmentation (BraTS volumes), each trained, valued and reported on
tiny synthetic data in the official layouts."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.layout import BEST, PREDICTIONS, SUMMARY
from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.errors import UserError
from mmval.metrics import regression_metrics
from mmval.recipe import load_recipe
from mmval.report import compare, find_runs
from mmval.report.robustness import robustness
from mmval.runner import Trainer
from mmval.valuation.config import ValuationConfig
from mmval.valuation.run import value_checkpoint
from mmval.valuation.subsets import subsets_checkpoint, write_subsets

# ---------------------------------------------------------------------------------------------
# regression


def _weighted_f1_by_counting(pred: np.ndarray, truth: np.ndarray) -> float:
    """scikit-learn's weighted F1 from a confusion table, written independently."""
    table = pd.crosstab(pd.Series(truth, name="t"), pd.Series(pred, name="p"))
    score = 0.0
    for cls in table.index:
        tp = table.loc[cls, cls] if cls in table.columns else 0
        predicted = table[cls].sum() if cls in table.columns else 0
        actual = table.loc[cls].sum()
        f1 = 2 * tp / (predicted + actual) if predicted + actual else 0.0
        score += actual / len(truth) * f1
    return score


def test_regression_metrics_follow_mmsa():
    rng = np.random.default_rng(3)
    truth = np.round(rng.uniform(-3, 3, 400) * 3) / 3
    truth[:40] = 0.0
    truth[40:50] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.5, 1.5, -2.5, 3.0]
    pred = truth + rng.normal(0, 0.8, 400)
    pred[50:60] = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, 3.7, -3.6, 0.0]
    got = regression_metrics(pred, truth)
    assert got["mae"] == pytest.approx(np.abs(pred - truth).mean())
    assert got["corr"] == pytest.approx(np.corrcoef(pred, truth)[0, 1])
    # np.round is half to even on the clipped values: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    pairs = list(zip(pred.tolist(), truth.tolist(), strict=True))
    # python's round is half to even too
    seven = [round(min(max(p, -3), 3)) == round(min(max(t, -3), 3)) for p, t in pairs]
    assert got["acc7"] == pytest.approx(np.mean(seven))
    five = [round(min(max(p, -2), 2)) == round(min(max(t, -2), 2)) for p, t in pairs]
    assert got["acc5"] == pytest.approx(np.mean(five))
    assert got["acc2_has0"] == pytest.approx(np.mean((pred >= 0) == (truth >= 0)))
    assert got["f1_has0"] == pytest.approx(_weighted_f1_by_counting(pred >= 0, truth >= 0))
    kept = truth != 0
    assert got["acc2_non0"] == pytest.approx(np.mean((pred[kept] > 0) == (truth[kept] > 0)))
    assert got["f1_non0"] == pytest.approx(
        _weighted_f1_by_counting(pred[kept] > 0, truth[kept] > 0)
    )


DIMS = {"text": 300, "audio": 5, "visual": 20}
STEPS = 6


def learnable_mosi(sizes: dict[str, int], seed: int = 0) -> dict:
    """A MulT-style pickle whose score is a linear function of the mean of a few text
    dimensions and of the audio features (the visual stream carries nothing), in steps of 1/3
    with exact zeros."""
    rng = np.random.default_rng(seed)
    w_text, w_audio = np.zeros(DIMS["text"]), rng.normal(0, 1, DIMS["audio"])
    w_text[:6] = rng.normal(0, 1, 6)  # a few informative text dimensions
    data = {}
    for split, n in sizes.items():
        text = rng.normal(0, 1, (n, STEPS, DIMS["text"])).astype(np.float32)
        text[..., 6:] *= 0.05  # the uninformative dimensions are quiet
        audio = rng.normal(0, 1, (n, STEPS, DIMS["audio"])).astype(np.float32)
        vision = rng.normal(0, 1, (n, STEPS, DIMS["visual"])).astype(np.float32)
        raw = text.mean(1) @ w_text * 1.5 + audio.mean(1) @ w_audio * 0.6
        scores = np.clip(np.round(raw * 3) / 3, -3, 3)
        scores[::9] = 0.0
        ids = [[f"{split}{row}", "0.0", "1.0"] for row in range(n)]
        data[split] = {
            "text": text,
            "audio": audio,
            "vision": vision,
            "labels": scores.astype(np.float32).reshape(n, 1, 1),
            "id": np.array(ids, dtype="U"),
        }
    return data


@pytest.fixture(scope="module")
def mosi_scores(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mosi")
    (root / "raw").mkdir()
    data = learnable_mosi({"train": 240, "valid": 60, "test": 90})
    (root / "raw" / "mosi_data_noalign.pkl").write_bytes(pickle.dumps(data, protocol=4))
    prepare("cmu-mosi", root / "data", raw=root / "raw", overrides=["labels=score"])
    return root


def _recipe(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _train(recipe: Path, seed: int = 0) -> Path:
    result = Trainer(load_recipe(recipe), seed).run()
    return result.run_dir


def test_score_prep_keeps_the_score_as_target(mosi_scores):
    data = pickle.loads((mosi_scores / "raw" / "mosi_data_noalign.pkl").read_bytes())
    ds = ParquetSamples(mosi_scores / "data", "test", ["text"])
    assert ds.manifest.task == "regression"
    assert ds.manifest.classes == ["negative", "positive"]
    batch = ds.__getitems__(list(range(len(ds))))
    rows = [int(i.removeprefix("test").split("_")[0]) for i in ds.sample_ids]
    scores = data["test"]["labels"][rows, 0, 0]
    np.testing.assert_array_equal(batch.target.numpy()[:, 0], scores)
    np.testing.assert_array_equal(batch.label.numpy(), (scores >= 0).astype(int))


def test_regression_trains_values_and_reports(mosi_scores, tmp_path):
    base = {
        "seeds": [0],
        "data": {"path": str(mosi_scores / "data")},
        "model": {"encoder": {"hidden": [32], "out_dim": 16, "dropout": 0.0}},
        "optim": {"name": "adam", "lr": 0.003},
        "train": {"epochs": 20, "batch_size": 16},
        "output": str(tmp_path / "runs"),
    }
    concat = _recipe(tmp_path / "concat.yaml", {**base, "name": "concat"})
    late = _recipe(
        tmp_path / "late.yaml", {**base, "name": "late", "method": {"name": "late_fusion"}}
    )
    run = _train(concat)
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["task"] == "regression"
    mean_guess = np.abs(
        pd.read_parquet(run / PREDICTIONS)["target"]
        - pd.read_parquet(run / PREDICTIONS)["target"].mean()
    ).mean()
    assert summary["test_mae"] < 0.8 * mean_guess  # well below predicting the mean score
    assert summary["test_corr"] > 0.5
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert {"train_mae", "val_mae", "val_acc7", "test_f1_non0"} <= set(metrics.columns)
    best = metrics.loc[metrics["epoch"] == summary["best_epoch"], "val_mae"].item()
    assert best == metrics["val_mae"].min()  # selected on the lowest validation error
    preds = pd.read_parquet(run / PREDICTIONS)
    assert list(preds.columns) == ["sample_id", "label", "target", "pred"]
    got = regression_metrics(preds["pred"].to_numpy(), preds["target"].to_numpy())
    assert got["mae"] == pytest.approx(summary["test_mae"], rel=1e-5)

    valued = value_checkpoint(run / BEST)  # default benefit of regression: abs_error
    assert valued.metadata["mmval.benefit"] == "abs_error"
    assert valued.metadata["mmval.task"] == "regression"
    wide = valued.table.pivot(index="sample_id", columns="modality", values="contribution")
    first = valued.table.groupby("sample_id").first()
    # efficiency: v(all) - sum of the contributions is v(empty) = -|c - y|, with c the one
    # prediction the model makes from no modality at all
    error_without = (wide.sum(axis=1) - first["v_full"]).to_numpy()
    truth = preds.set_index("sample_id").loc[wide.index, "target"].to_numpy()
    assert np.all(error_without >= -1e-9)
    c = next(
        c
        for c in (truth[0] - error_without[0], truth[0] + error_without[0])
        if np.allclose(np.abs(c - truth), error_without, atol=1e-4)
    )
    assert np.isfinite(c)
    signs = value_checkpoint(run / BEST, config=ValuationConfig(benefit="acc2"))
    assert set(signs.table["v_full"].unique()) <= {0.0, 3.0}
    with pytest.raises(UserError, match="not defined for the regression task"):
        value_checkpoint(run / BEST, config=ValuationConfig(benefit="prob"))
    contrib = wide.mean()
    assert contrib["visual"] < contrib["text"]  # the visual stream carries no signal

    _train(late)
    comparison = compare(find_runs(tmp_path / "runs"))
    assert [m.key for m in comparison.metrics][:2] == ["mae", "corr"]
    mae = next(m for m in comparison.metrics if m.key == "mae")
    assert not mae.higher_is_better
    # the published protocol's test-max picks the epoch of the lowest test MAE
    picked = find_runs(tmp_path / "runs", select="test-max").runs.set_index("recipe_name")
    assert picked.loc["concat", "test_mae"] == metrics["test_mae"].min()
    subsets = subsets_checkpoint(run / BEST)
    assert {"abs_error", "pred"} <= set(subsets.table.columns)


def test_regression_task_needs_scores(recipe_file):
    recipe = load_recipe(recipe_file(task="regression"))
    with pytest.raises(UserError, match="labelled for classification"):
        Trainer(recipe, 0).run()


def test_a_method_not_defined_for_the_task_is_refused(recipe_file):
    with pytest.raises(UserError, match="cmob is defined for classification, not regression"):
        load_recipe(recipe_file(task="regression", method={"name": "cmob"}))


# ---------------------------------------------------------------------------------------------
# event localisation


def test_localisation_trains_values_and_reports(ave_data, tmp_path):
    base = {
        "seeds": [0],
        "data": {"path": str(ave_data)},
        "model": {"encoder": {"kind": "segment_lstm", "hidden": 16}},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 8, "batch_size": 16},
        "output": str(tmp_path / "runs"),
    }
    run = _train(_recipe(tmp_path / "concat.yaml", {**base, "name": "concat"}))
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["task"] == "localisation"
    preds = pd.read_parquet(run / PREDICTIONS)
    target = np.stack(preds["target"].to_list())
    background = (target == target.max()).mean()  # the most frequent segment class
    assert summary["test_seg_acc"] > max(background, 0.6) + 0.15
    pred = np.stack(preds["pred"].to_list())
    assert (pred == target).mean() == pytest.approx(summary["test_seg_acc"])
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert {"train_seg_acc", "val_seg_acc", "test_seg_acc_audio", "test_seg_acc_visual"} <= set(
        metrics.columns
    )

    valued = value_checkpoint(run / BEST)
    assert valued.metadata["mmval.benefit"] == "correct"
    first = valued.table.groupby("sample_id").first()
    wide = valued.table.pivot(index="sample_id", columns="modality", values="contribution")
    # efficiency per clip: v(all) = mean over segments of |S| * right, v(empty) = 0 when the
    # empty set predicts nothing right; the Shapley values add up to v(all) - v(empty)
    assert np.all(first["v_full"] <= 2 + 1e-9)
    assert np.allclose(first["pred"] * 2, first["v_full"])
    assert "correct" not in valued.table
    assert np.all(np.isfinite(wide.to_numpy()))
    # per segment: the clip's value is the mean of its segments' (Shapley is linear in v)
    segments = value_checkpoint(run / BEST, per_segment=True)
    assert segments.metadata["mmval.units"] == "segment"
    assert len(segments.table) == len(valued.table) * 10
    per_clip = segments.table.groupby(["sample_id", "modality"])["contribution"].mean()
    np.testing.assert_allclose(per_clip.unstack()[wide.columns], wide, atol=1e-9)
    labels = segments.table[segments.table["modality"] == "audio"].set_index("sample_id")
    np.testing.assert_array_equal(
        labels.loc[preds["sample_id"], "label"].to_numpy(), target.reshape(-1)
    )
    assert labels["correct"].mean() == pytest.approx(summary["test_seg_acc"])

    ogm = _recipe(
        tmp_path / "ogm.yaml",
        {
            **base,
            "name": "ogm",
            "method": {"name": "ogm_ge"},
            "train": {**base["train"], "epochs": 3},
        },
    )
    coop = _recipe(
        tmp_path / "coop.yaml",
        {
            **base,
            "name": "coop",
            "method": {"name": "mmcooperation_sample", "warmup": 1},
            "train": {**base["train"], "epochs": 3},
        },
    )
    _train(ogm)
    coop_run = _train(coop)
    copies = pd.read_parquet(coop_run / "metrics.parquet")["method_copies"]
    assert copies.iloc[-1] > 0  # the re-sampling drew copies from per-segment values
    comparison = compare(find_runs(tmp_path / "runs"))
    assert [m.key for m in comparison.metrics] == ["seg_acc"]
    assert len(comparison.rows) == 3


def test_localisation_official_loss_is_tians():
    import torch

    from mmval.data.dataset import Batch
    from mmval.tasks import TASKS

    task = TASKS["localisation"](TASKS["localisation"].Config(loss="official"), 5)
    logits = torch.randn(2, 10, 5)
    target = torch.randint(0, 5, (2, 10))
    batch = Batch({}, torch.zeros(2, dtype=torch.long), torch.arange(2), target=target)
    prob = logits.softmax(-1)
    onehot = torch.nn.functional.one_hot(target, 5).float()
    # MultiLabelSoftMarginLoss of the probabilities: the mean BCE over every element
    by_hand = -(onehot * torch.nn.functional.logsigmoid(prob)) - (1 - onehot) * (
        torch.nn.functional.logsigmoid(-prob)
    )
    assert task.loss(logits, batch).item() == pytest.approx(by_hand.mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# segmentation


def test_segmentation_trains_values_and_renders_the_15_combinations(brats_data, tmp_path):
    raw = {
        "name": "unet",
        "seeds": [0],
        "data": {"path": str(brats_data)},
        "model": {"unet": {"base": 4, "levels": 3}},
        "task": {"name": "segmentation", "missing": "mmformer", "missing_from": 4},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 14, "batch_size": 4},
        "output": str(tmp_path / "runs"),
    }
    run = _train(_recipe(tmp_path / "unet.yaml", raw))
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["task"] == "segmentation"
    assert summary["test_dice_wt"] > 0.6  # an empty prediction scores about 0
    preds = pd.read_parquet(run / PREDICTIONS)
    assert preds["dice_wt"].mean() == pytest.approx(summary["test_dice_wt"])

    valued = value_checkpoint(run / BEST)  # feature masking: absent sequences' features
    assert valued.metadata["mmval.benefit"] == "dice"
    wide = valued.table.pivot(index="sample_id", columns="modality", values="contribution")
    assert list(wide.columns) == sorted(["flair", "t1ce", "t1", "t2"])

    subsets = subsets_checkpoint(run / BEST)
    assert subsets.table["subset"].nunique() == 15
    per_subset = subsets.table.groupby("subset")["dice_wt"].mean()
    assert per_subset["flair"] > per_subset["t1"] + 0.1  # flair shows the whole tumour
    everything = subsets.table[subsets.table["size"] == 4].set_index("sample_id")
    first = valued.table.groupby("sample_id").first()
    np.testing.assert_allclose(first["v_full"], everything.loc[first.index, "dice_mean"])
    assert {"dice_wt", "dice_tc", "dice_et", "dice_et_post", "dice_mean"} <= set(
        subsets.table.columns
    )
    write_subsets(subsets, run / "evaluate" / "subsets.parquet")
    robust = robustness(find_runs(tmp_path / "runs"))
    titles = [c.title for c in robust.missing]
    assert titles == [
        f"brats2018: Dice {region} with missing modalities, test split"
        for region in ("ET", "TC", "WT")
    ]
    wt = robust.missing[-1]
    assert len(wt.metrics) == 16  # the 15 combinations and their mean
    md = CliRunner().invoke(
        app, ["report", str(tmp_path / "runs"), "--robustness", "--format", "md"]
    )
    assert md.exit_code == 0, md.output
    assert "Dice WT with missing modalities" in md.output
    assert "flair+t1ce+t1+t2" in md.output or "flair+t1+t1ce+t2" in md.output


def test_tians_model_refuses_methods_that_read_per_modality_logits(tmp_path):
    raw = {
        "name": "x",
        "seeds": [0],
        "data": {"dataset": "ave-localisation"},
        "model": {"ave_att": {}},
        "method": {"name": "ogm_ge"},
        "train": {"epochs": 1},
    }
    with pytest.raises(UserError, match="no per-modality features or logits for ogm_ge"):
        load_recipe(_recipe(tmp_path / "r.yaml", raw))
    raw["method"] = {"name": "concat"}
    raw["plugins"] = ["c3r"]
    with pytest.raises(UserError, match="plug-ins act on per-modality feature vectors"):
        load_recipe(_recipe(tmp_path / "r.yaml", raw))
