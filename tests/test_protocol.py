"""The published protocol (`train.protocol: published`: train on train and val, best.pt at the
best test epoch) and `mmval report --select test-max`, which reads every run at its best test
epoch and labels the rows so that they are never mistaken for honest numbers."""

from __future__ import annotations

from io import StringIO
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.engine.session import build_session
from mmval.recipe import parse_recipe
from mmval.report import compare, find_runs
from mmval.report.runs import PUBLISHED_LABEL, TEST_MAX_LABEL
from mmval.report.tables import _paired_predictions
from mmval.runner import Trainer

runner = CliRunner()
SEEDS = (0, 1)


def _raw(data: Path, output: Path, protocol: str | None) -> dict:
    raw: dict = {
        "name": f"concat-{protocol or 'default'}",
        "seeds": list(SEEDS),
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "method": {"name": "concat"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 4, "batch_size": 64},
        "output": str(output),
    }
    if protocol is not None:
        raw["train"]["protocol"] = protocol
    return raw


def test_published_protocol_trains_on_every_training_sample(synthetic_dir):
    index = pq.read_table(synthetic_dir / "index.parquet").to_pandas()
    ids = {s: set(index.loc[index["split"] == s, "sample_id"]) for s in ("train", "val", "test")}
    published = parse_recipe(_raw(synthetic_dir, Path("unused"), "published"), "p")
    session = build_session(published, 0, torch.device("cpu"))
    assert set(session.datasets["train"].sample_ids) == ids["train"] | ids["val"]
    assert set(session.datasets["test"].sample_ids) == ids["test"]
    assert len(session.loader.sampler) == len(ids["train"]) + len(ids["val"])
    honest = parse_recipe(_raw(synthetic_dir, Path("unused"), None), "v")
    assert (
        set(build_session(honest, 0, torch.device("cpu")).datasets["train"].sample_ids)
        == (ids["train"])
    )


def test_the_default_protocol_keeps_old_settings_hashes(synthetic_dir):
    implicit = parse_recipe(_raw(synthetic_dir, Path("o"), None), "a")
    explicit = parse_recipe(_raw(synthetic_dir, Path("o"), "validation"), "a")
    published = parse_recipe(_raw(synthetic_dir, Path("o"), "published"), "a")
    assert implicit.settings_hash() == explicit.settings_hash() != published.settings_hash()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    runs = tmp_path_factory.mktemp("protocol") / "runs"
    for protocol in (None, "published"):
        recipe = parse_recipe(_raw(synthetic_dir, runs, protocol), "r")
        for seed in SEEDS:
            Trainer(recipe, seed).run()
    return runs


def _first_max(folder: Path, column: str) -> pd.Series:
    history = pd.read_parquet(folder / "metrics.parquet")
    return history.loc[history[column].idxmax()]


def test_published_runs_keep_best_pt_at_the_best_test_epoch(tree):
    for seed in SEEDS:
        folder = tree / "concat-published" / f"seed{seed}"
        summary = pd.read_json(folder / "summary.json", typ="series")
        assert summary["protocol"] == "published"
        assert summary["best_epoch"] == _first_max(folder, "test_acc")["epoch"]


def test_select_val_leaves_published_runs_out(tree):
    comparison = compare(find_runs(tree), ["acc"])
    assert comparison.rows == ["concat"]
    left = [x for x in comparison.left_out if x.reason.startswith("published protocol")]
    assert sorted(x.run.name for x in left) == ["seed0", "seed1"]


def test_select_test_max_reads_every_run_at_its_best_test_epoch_and_labels_it(tree):
    result = runner.invoke(app, ["report", str(tree), "--format", "csv", "--select", "test-max"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(StringIO(result.stdout)).set_index("selection")
    for folder, label in (
        ("concat-default", TEST_MAX_LABEL),
        ("concat-published", PUBLISHED_LABEL),
    ):
        best = [100 * _first_max(tree / folder / f"seed{s}", "test_acc")["test_acc"] for s in SEEDS]
        row = table.loc[label]
        assert row["dataset"] == "synthetic" and row["acc_mean"] == pytest.approx(
            sum(best) / len(best), abs=1e-6
        )
    assert (
        "chosen on test"
        in runner.invoke(
            app, ["report", str(tree), "--format", "md", "--select", "test-max"]
        ).stdout
    )
    assert runner.invoke(app, ["report", str(tree), "--select", "best"]).exit_code == 2


def test_test_max_bootstraps_only_predictions_of_the_selected_epoch(tree):
    """best.pt of a validation-protocol run may be another epoch than its best test epoch: its
    saved predictions then do not belong to the reported number and stay out of the paired
    bootstrap."""
    runs = find_runs(tree, "test-max")
    published = runs.runs[runs.runs["protocol"] == "published"].set_index("seed")
    assert len(_paired_predictions(runs, published, published, list(SEEDS), {})) == len(SEEDS)
    moved = published.copy()
    moved.loc[0, "checkpoint_epoch"] = moved.loc[0, "best_epoch"] + 1
    assert len(_paired_predictions(runs, moved, published, list(SEEDS), {})) == len(SEEDS) - 1


def test_test_max_reads_runs_written_before_the_protocol_existed():
    """Run folders of older mmval versions (no `train.protocol` in their recipe) trained on
    train alone: they report under both selections, labelled `test-max` under the second."""
    legacy = Path(__file__).parent / "data" / "legacy-runs"
    runs = find_runs(legacy, "test-max").runs
    assert len(runs) and set(runs["protocol"]) == {"validation"}
    assert set(runs["selection"]) == {TEST_MAX_LABEL}
    for run in runs.itertuples():
        history = pd.read_parquet(Path(run.run) / "metrics.parquet")
        assert run.best_epoch == history.loc[history["test_acc"].idxmax(), "epoch"]
    assert len(find_runs(legacy).runs) == len(runs)
