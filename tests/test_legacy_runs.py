"""Run folders written by mmval before the architecture step (commit 4fa0c79: flat `fusion_*`
model fields, settings hash v1, checkpoints of engine/checkpoint.py) still report, value and
resume. `tests/data/legacy-runs/` holds two such folders, trained by that commit on uci-mfeat
(2 epochs, tiny MLPs; mmcosine with `fusion_scale: 5.0`), and the metrics that commit gave for
the same concat run trained 3 epochs without interruption."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.models.fusions.cosine import CosineFusionConfig
from mmval.recipe import Recipe, parse_recipe
from mmval.report import collect_runs
from mmval.runner import Trainer
from mmval.valuation.run import value_checkpoint

LEGACY = Path(__file__).parent / "data" / "legacy-runs"


@pytest.fixture
def legacy_runs(tmp_path: Path) -> Path:
    runs = tmp_path / "runs"
    shutil.copytree(LEGACY, runs, ignore=shutil.ignore_patterns("*.csv"))
    return runs


def _recipe(runs: Path, name: str, data_root: Path, **train: int) -> Recipe:
    stored = yaml.safe_load((runs / name / "seed0" / "recipe.yaml").read_text(encoding="utf-8"))
    assert "fusion_scale" in stored["model"]  # the old flat layout
    stored["data"]["root"] = str(data_root)
    stored["output"] = str(runs)
    stored["train"] |= train
    return parse_recipe(stored, name)


def test_old_checkpoints_load_in_the_new_layout():
    ckpt = load_checkpoint(LEGACY / "mmcosine-legacy/seed0/best.pt")
    recipe = Recipe.model_validate(ckpt.recipe)
    assert recipe.model.fusion == CosineFusionConfig(scale=5.0)


def test_old_run_folders_report(legacy_runs):
    runs = collect_runs(legacy_runs)
    assert sorted(runs["method"]) == ["concat", "mmcosine"]
    assert runs.set_index("method").loc["concat", "test_acc"] == pytest.approx(0.8875)


def test_old_checkpoints_are_valued(legacy_runs, uci_dir):
    checkpoint = legacy_runs / "mmcosine-legacy/seed0/best.pt"
    table = value_checkpoint(checkpoint, split="test", data_dir=uci_dir).table
    assert set(table["modality"]) == {"fou", "kar"}
    assert table["sample_id"].nunique() == 400  # the uci-mfeat test split


def test_an_old_run_resumes_exactly(legacy_runs, uci_dir):
    """Its data prepared elsewhere (data.root does not bear on results), 2 -> 3 epochs."""
    longer = _recipe(legacy_runs, "concat-legacy", uci_dir.parent, epochs=3)
    resumed = Trainer(longer, 0, resume=True).run()
    assert not resumed.skipped and resumed.summary["epochs"] == 3
    metrics = pd.read_parquet(resumed.run_dir / "metrics.parquet")
    expected = pd.read_csv(LEGACY / "concat-legacy-3-epochs-uninterrupted.csv")
    pd.testing.assert_frame_equal(
        metrics[expected.columns].reset_index(drop=True), expected, rtol=0, atol=1e-6
    )
