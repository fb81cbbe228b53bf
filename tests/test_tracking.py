"""MLflow tracking (`train.tracking: mlflow`): a 2-epoch run read back through MLflow's client
from its local store (params, per-epoch metrics, artifacts); the field leaves the settings hash
alone; `mmval report` does not take the store's copies of run files for runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mmval.artifacts.layout import MLFLOW_DB
from mmval.recipe import load_recipe
from mmval.report.runs import find_runs
from mmval.runner import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_field_does_not_change_the_settings_hash(recipe_file):
    plain = load_recipe(recipe_file())
    tracked = load_recipe(recipe_file(train__tracking="mlflow", train__tracking_uri="store"))
    assert tracked.settings_hash() == plain.settings_hash()


def test_a_server_uri_is_refused(recipe_file):
    from mmval.errors import UserError

    with pytest.raises(UserError, match=r"train.tracking_uri: .*local folder"):
        load_recipe(recipe_file(train__tracking="mlflow", train__tracking_uri="http://host:5000"))


def test_a_run_logs_params_metrics_and_artifacts(recipe_file, tmp_path):
    pytest.importorskip("mlflow", reason="the tracking extra (pip install 'mmval[tracking]')")
    from mlflow.tracking import MlflowClient

    recipe = load_recipe(recipe_file(train__tracking="mlflow"))
    run_dir = Trainer(recipe, 0).run().run_dir
    store = tmp_path / "runs" / "mlruns"
    assert (store / MLFLOW_DB).is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store / MLFLOW_DB}")
    experiment = client.get_experiment_by_name("runs")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny/seed0"
    assert run.data.tags["mmval.run_dir"] == str(run_dir.resolve())
    params = run.data.params
    assert params["optim.lr"] == "0.01" and params["train.epochs"] == "2"
    assert params["model.encoder.hidden"] == "[16]" and params["train.tracking"] == "mlflow"
    metrics = pd.read_parquet(run_dir / "metrics.parquet")
    for column in ("val_acc", "train_loss", "test_f1"):
        history = client.get_metric_history(run.info.run_id, column)
        assert [(m.step, m.value) for m in history] == list(
            zip(metrics["epoch"], metrics[column], strict=True)
        )
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert names == {"recipe.yaml", "summary.json"}
    copy = client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert json.loads(Path(copy).read_text()) == summary
    assert yaml.safe_load((run_dir / "recipe.yaml").read_text())["train"]["tracking"] == "mlflow"
    # the store's copies of recipe.yaml and summary.json are not runs of the report
    tree = find_runs(tmp_path / "runs")
    assert list(tree.runs["run"]) == [str(run_dir)] and tree.left_out == []


def test_without_mlflow_the_run_stops_before_training(recipe_file, monkeypatch):
    import sys

    from mmval.errors import UserError

    monkeypatch.setitem(sys.modules, "mlflow.tracking", None)  # import fails as if missing
    recipe = load_recipe(recipe_file(train__tracking="mlflow"))
    with pytest.raises(UserError, match=r"pip install 'mmval\[tracking\]'"):
        Trainer(recipe, 0).run()
