"""Training engine: runs, deterministic resume, checkpoints, valuation and report commands."""

from __future__ import annotations

import json
import pickle
from typing import Any

import pandas as pd
import pytest
import torch
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import load_checkpoint, load_payload, save_payload
from mmval.artifacts.layout import BEST, LAST, PREVIOUS, SUMMARY
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after

runner = CliRunner()


@pytest.mark.parametrize("method", [{"name": "concat"}, {"name": "ogm_ge", "alpha": 0.5}])
def test_resume_after_a_crash_matches_an_uninterrupted_run(recipe_file, tmp_path, method):
    straight = load_recipe(
        recipe_file(
            method=method,
            train__epochs=4,
            name="straight",
            optim__scheduler={"name": "step", "step_size": 1},
        )
    )
    broken = straight.model_copy(update={"name": "broken"})
    Trainer(straight, 0).run()
    with pytest.raises(Crash):
        Trainer(broken, 0, callbacks=crash_after(2)).run()
    with pytest.raises(UserError, match="--resume"):
        Trainer(broken, 0).run()
    Trainer(broken, 0, resume=True).run()
    runs = tmp_path / "runs"
    a = pd.read_parquet(runs / "straight/seed0/metrics.parquet").drop(
        columns=["seconds", "data_seconds"]
    )
    b = pd.read_parquet(runs / "broken/seed0/metrics.parquet").drop(
        columns=["seconds", "data_seconds"]
    )
    assert len(a) == 4
    pd.testing.assert_frame_equal(a, b)
    wa = load_checkpoint(runs / "straight/seed0/last.pt").model
    wb = load_checkpoint(runs / "broken/seed0/last.pt").model
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_run_outputs_and_rerun_is_skipped(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(method={"name": "ogm_ge"}, train__epochs=3))
    result = Trainer(recipe, 0).run()
    run = tmp_path / "runs/tiny/seed0"
    for name in (
        "recipe.yaml",
        "metrics.parquet",
        "last.pt",
        "best.pt",
        "summary.json",
        "train.log",
    ):
        assert (run / name).is_file(), name
    metrics = pd.read_parquet(run / "metrics.parquet")
    assert {
        "train_loss",
        "val_acc",
        "val_f1",
        "test_acc",
        "test_f1",
        "val_acc_a",
        "test_acc_c",
        "method_coef_a",
    } <= set(metrics.columns)
    assert result.summary["best_epoch"] == int(metrics["epoch"][metrics["val_acc"].idxmax()])
    again = Trainer(recipe, 0).run()
    assert again.skipped
    best = load_checkpoint(run / "best.pt")
    assert best.data.modalities == ["a", "b", "c"] and len(best.data.fingerprint) == 64


def test_learns_the_strong_modality(recipe_file):
    recipe = load_recipe(
        recipe_file(train__epochs=15, method={"name": "unimodal", "modality": "a"}, name="uni-a")
    )
    summary = Trainer(recipe, 0).run().summary
    assert summary["method"] == "unimodal:a"
    assert summary["test_acc"] > 0.8  # chance is 0.25


def test_checkpoint_that_would_run_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps(Evil(), protocol=2))
    with pytest.raises(UserError, match="not a loadable mmval checkpoint"):
        load_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(UserError, match="not an mmval checkpoint"):
        load_checkpoint(path)
    result = runner.invoke(app, ["value", str(path), "--out", str(tmp_path / "o.parquet")])
    assert result.exit_code == 2


def test_train_value_report_commands(recipe_file, tmp_path):
    path = recipe_file()
    result = runner.invoke(app, ["train", "--recipe", str(path), "--set", "seeds=[0,1]"])
    assert result.exit_code == 0, result.output
    ckpt = tmp_path / "runs/tiny/seed0/best.pt"
    out = tmp_path / "contrib.parquet"
    result = runner.invoke(app, ["value", str(ckpt), "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert list(table.columns) == [
        "sample_id",
        "label",
        "class",
        "modality",
        "contribution",
        "pred",
        "correct",
        "v_full",
    ]
    assert len(table) == 80 * 3
    sums = table.groupby("sample_id").agg(total=("contribution", "sum"), v=("v_full", "first"))
    assert (sums["total"] - sums["v"]).abs().max() < 1e-9
    assert set(table["v_full"]) <= {0.0, 3.0}
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--format", "csv"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("dataset,method,n_seeds,acc_mean,acc_std,f1_mean,f1_std,")
    assert lines[1].startswith("synthetic,concat,2,")
    for fmt in ("md", "latex", "table"):
        assert (
            runner.invoke(app, ["report", str(tmp_path / "runs"), "--format", fmt]).exit_code == 0
        )
    assert runner.invoke(app, ["report", str(tmp_path / "nowhere")]).exit_code == 2


def test_value_refuses_other_data(recipe_file, tmp_path, uci_dir):
    Trainer(load_recipe(recipe_file(train__epochs=1)), 0).run()
    ckpt = tmp_path / "runs/tiny/seed0/best.pt"
    result = runner.invoke(
        app, ["value", str(ckpt), "--out", str(tmp_path / "x.parquet"), "--data", str(uci_dir)]
    )
    assert result.exit_code == 2 and "fingerprints differ" in result.output


def test_missing_modality_and_data_errors(recipe_file):
    result = runner.invoke(
        app, ["train", "--recipe", str(recipe_file(data__modalities=["a", "q"]))]
    )
    assert result.exit_code == 2 and "no modality 'q'" in result.output
    result = runner.invoke(app, ["train", "--recipe", str(recipe_file(data__path="/nonexistent"))])
    assert result.exit_code == 2 and "does not exist" in result.output


@pytest.mark.slow
def test_quickstart_reaches_published_accuracy(tmp_path):
    from mmval.quickstart import run_quickstart

    result = run_quickstart(tmp_path)
    concat = result.report.set_index("method").loc["concat"]
    assert concat["n_seeds"] == 3 and concat["acc_mean"] >= 98.0
    assert len(result.report) == 8
    assert list(result.contributions["modality"]) == ["fou", "fac", "kar", "pix", "zer", "mor"]


def test_two_modality_fusions_train_and_refuse_more(recipe_file):
    for fusion in ("film", "gated", "sum", "weighted"):
        recipe = load_recipe(
            recipe_file(model__fusion=fusion, data__modalities=["a", "b"], name=fusion)
        )
        summary = Trainer(recipe, 0).run().summary
        assert summary["method"] == fusion and summary["test_acc"] > 0.25
    result = runner.invoke(app, ["train", "--recipe", str(recipe_file(model__fusion="film"))])
    assert result.exit_code == 2 and "exactly two modalities" in result.output


def test_workers_and_bf16_give_a_finished_run(recipe_file):
    recipe = load_recipe(recipe_file(train__workers=1, train__precision="bf16"))
    summary = Trainer(recipe, 0).run().summary
    assert summary["finished"] and summary["epochs"] == 2


def test_report_lists_unfinished_runs_apart(recipe_file, tmp_path):
    Trainer(load_recipe(recipe_file(train__epochs=1)), 0).run()
    with pytest.raises(Crash):
        Trainer(load_recipe(recipe_file(name="crashed")), 0, callbacks=crash_after(1)).run()
    result = runner.invoke(app, ["report", str(tmp_path / "runs"), "--format", "csv"])
    assert result.exit_code == 0
    assert "crashed" not in result.stdout and "left out 1 unfinished run" in result.stderr


def test_two_epochs_resumed_for_two_more_equal_four(recipe_file, tmp_path):
    four = load_recipe(recipe_file(train__epochs=4, name="four", method={"name": "ogm_ge"}))
    two = four.model_copy(
        update={"name": "two", "train": four.train.model_copy(update={"epochs": 2})}
    )
    Trainer(four, 0).run()
    Trainer(two, 0).run()
    longer = two.model_copy(update={"train": four.train})
    Trainer(longer, 0, resume=True).run()
    runs = tmp_path / "runs"
    a = pd.read_parquet(runs / "four/seed0/metrics.parquet").drop(
        columns=["seconds", "data_seconds"]
    )
    b = pd.read_parquet(runs / "two/seed0/metrics.parquet").drop(
        columns=["seconds", "data_seconds"]
    )
    pd.testing.assert_frame_equal(a, b)


def test_empty_split_is_a_user_error(recipe_file, tmp_path):
    from mmval.data.prep import prepare

    data = tmp_path / "holes"
    prepare("synthetic", data, overrides=["per_class={train: 10, val: 4, test: 5, extra: 0}"])
    path = recipe_file(data__path=str(data), data__splits={"test": "extra"})
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2 and "no samples in split(s) test (extra)" in result.output


def as_older_mmval_wrote_it(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe dump as mmval stored it before it stored every field: host settings at their
    defaults, train.nonfinite at stop and an unset valuation left out."""
    train = {k: v for k, v in recipe["train"].items() if k not in ("prefetch", "channels_last")}
    for name in ("compile", "tensorboard", "nonfinite"):
        train.pop(name)
    return {k: v for k, v in recipe.items() if k != "valuation"} | {"train": train}


def test_run_folders_of_older_versions_count_as_finished_and_resume(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(train__epochs=2))
    Trainer(recipe, 0).run()
    run = tmp_path / "runs/tiny/seed0"
    summary = json.loads((run / SUMMARY).read_text())
    summary["recipe"] = as_older_mmval_wrote_it(summary["recipe"])
    del summary["settings_version"]
    (run / SUMMARY).write_text(json.dumps(summary))
    for name in (LAST, PREVIOUS, BEST):
        payload = load_payload(run / name)
        payload["recipe"] = as_older_mmval_wrote_it(payload["recipe"])
        save_payload(run / name, {k: v for k, v in payload.items() if k != "format"})
    assert Trainer(recipe, 0).run().skipped
    longer = load_recipe(recipe_file(train__epochs=3, train__workers=1))
    assert not Trainer(longer, 0, resume=True).run().skipped
    assert len(pd.read_parquet(run / "metrics.parquet")) == 3
    changed = load_recipe(recipe_file(train__epochs=4, train__batch_size=16))
    with pytest.raises(UserError) as refused:
        Trainer(changed, 0, resume=True).run()
    message = str(refused.value)
    assert "holds a finished run whose recipe differs in train.batch_size (was 32, now 16)" in (
        message
    )
    assert "not finished" not in message and "--overwrite" in message
