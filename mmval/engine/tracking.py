"""Experiment tracking with MLflow (`train.tracking: mlflow`), in a local store: no server.

The store is a folder (`train.tracking_uri`, default `<output>/mlruns`) holding MLflow's SQLite
backend (`mlflow.db`) and its artifacts (`artifacts/`): MLflow 3 refuses its plain-file backend
unless an environment variable opts in, and names SQLite as the local replacement. One MLflow
experiment per output folder (named after it: the sweep's or search's name for their runs), one
MLflow run per training of a run folder (`<name>/seed<k>`, tagged with the folder), holding the
flattened resolved recipe as params, every metrics.parquet column per epoch (step = epoch, as in
metrics.parquet), and recipe.yaml and summary.json as artifacts. A resumed run opens a new
MLflow run that first logs the epochs it already has. MLflow is imported only when a recipe asks
for it (`pip install 'mmval[tracking]'`). View it with `mlflow ui --backend-store-uri
sqlite:///<store>/mlflow.db`.
"""

from __future__ import annotations

import json
import time
from contextlib import suppress
from pathlib import Path
from typing import Any

from mmval import distributed
from mmval.artifacts.layout import MLFLOW_DB, RECIPE_FILE, SUMMARY
from mmval.engine.loop import Callback, Fit
from mmval.errors import UserError
from mmval.recipe import Recipe

STORE_ARTIFACTS = "artifacts"
_PARAM_CHARS = 6000  # MLflow's limit on a param value
_BATCH = 100  # MLflow's limit on params per log_batch


def tracking_store(recipe: Recipe) -> Path:
    """The local folder of a recipe's MLflow store."""
    uri = recipe.train.tracking_uri
    return Path(uri) if uri is not None else Path(recipe.output) / "mlruns"


def flat_params(value: Any, prefix: str = "") -> dict[str, str]:
    """`{optim: {lr: 0.01}}` -> `{"optim.lr": "0.01"}`; lists as JSON, cut to MLflow's limit."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, child in value.items():
            out.update(flat_params(child, f"{prefix}{key}."))
        return out
    text = value if isinstance(value, str) else json.dumps(value)
    return {prefix.rstrip("."): text[:_PARAM_CHARS]}


def _client(store: Path) -> Any:
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise UserError(
            "train.tracking: mlflow needs MLflow, which is not installed: "
            "pip install 'mmval[tracking]' (or set train.tracking: none)."
        ) from None
    store.mkdir(parents=True, exist_ok=True)
    return MlflowClient(tracking_uri=f"sqlite:///{store.resolve() / MLFLOW_DB}")


class MLflowTracking(Callback):
    """Logs a run to MLflow (rank 0, when `train.tracking` is mlflow); the MLflow client is
    made here, so that a missing MLflow stops the run before it trains."""

    def __init__(self, recipe: Recipe) -> None:
        self.client: Any = None
        self.run_id: str | None = None
        if recipe.train.tracking == "mlflow" and distributed.is_main():
            self.store = tracking_store(recipe)
            self.client = _client(self.store)

    def on_train_start(self, fit: Fit) -> None:
        if self.client is None:
            return
        from mlflow.entities import Param

        client, recipe = self.client, fit.recipe
        experiment = Path(recipe.output).resolve().name
        found = client.get_experiment_by_name(experiment)
        experiment_id = (
            found.experiment_id
            if found is not None
            else client.create_experiment(
                experiment, artifact_location=(self.store.resolve() / STORE_ARTIFACTS).as_uri()
            )
        )
        tags = {
            "mmval.run_dir": str(fit.run_dir.resolve()),
            "mmval.method": recipe.run_label(),
            "mmval.seed": str(fit.seed),
            "mmval.settings_hash": recipe.settings_hash(),
            "mmval.resumed": str(bool(fit.state.rows)).lower(),
        }
        run = client.create_run(experiment_id, run_name=f"{recipe.name}/seed{fit.seed}", tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v) for k, v in flat_params(recipe.model_dump(mode="json")).items()]
        for start in range(0, len(params), _BATCH):
            client.log_batch(self.run_id, params=params[start : start + _BATCH])
        for row in fit.state.rows:  # a resumed run's epochs so far
            self._log(row)

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        if self.run_id is not None:
            self._log(row)

    def on_fit_end(self, fit: Fit) -> None:
        if self.run_id is None:
            return
        for name in (RECIPE_FILE, SUMMARY):
            self.client.log_artifact(self.run_id, str(fit.run_dir / name))
        self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def teardown(self, fit: Fit) -> None:
        if self.run_id is not None:  # stopped by an error or Ctrl-C
            with suppress(Exception):
                self.client.set_terminated(self.run_id, "FAILED")
            self.run_id = None

    def _log(self, row: dict[str, float]) -> None:
        from mlflow.entities import Metric

        step, stamp = int(row["epoch"]), int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step) for k, v in row.items() if k != "epoch"]
        for start in range(0, len(metrics), _BATCH * 10):  # MLflow takes 1000 per batch
            self.client.log_batch(self.run_id, metrics=metrics[start : start + _BATCH * 10])
