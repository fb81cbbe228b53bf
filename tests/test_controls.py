"""Training controls: learning-rate schedules, gradient clipping, early stopping, the selection
metric, `train.workers: auto` and `--set` on a tagged mapping's tag."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from mmval.cli.main import app
from torch.optim.optimizer import register_optimizer_step_pre_hook
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.artifacts.layout import LAST, SUMMARY
from mmval.engine import session as session_module
from mmval.engine.session import Selection, build_scheduler, loader_workers
from mmval.errors import UserError
from mmval.recipe import OptimConfig, load_recipe, parse_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after

runner = CliRunner()
LR = 0.01  # the recipe_file fixture's optim.lr


def _run(recipe_file, **changes) -> tuple[Path, pd.DataFrame]:
    recipe = load_recipe(recipe_file(**changes))
    result = Trainer(recipe, 0).run()
    return result.run_dir, pd.read_parquet(result.run_dir / "metrics.parquet")


def _steps_per_epoch(run_dir: Path) -> int:
    training = load_checkpoint(run_dir / LAST).training
    assert training is not None
    return training.run_state["step"] // training.run_state["epoch"]


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR, momentum=0.9)


def _epoch_curve(scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int) -> list[float]:
    """The rate each epoch trains with, the scheduler stepped after each epoch."""
    rates = []
    for _ in range(epochs):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def _last_step_curve(
    scheduler: torch.optim.lr_scheduler.LRScheduler, epochs: int, steps: int
) -> list[float]:
    """The rate of each epoch's last step, the scheduler stepped after each step."""
    rates = []
    for _ in range(epochs):
        for _ in range(steps):
            rate = scheduler.optimizer.param_groups[0]["lr"]
            scheduler.optimizer.step()
            scheduler.step()
        rates.append(rate)
    return rates


@pytest.mark.parametrize(
    "schedule",
    [
        {"name": "multistep", "milestones": [1, 3], "gamma": 0.5},
        {"name": "warmup_cosine", "warmup": 2, "start_factor": 0.1, "min_lr": 1e-4},
        {"name": "onecycle", "pct_start": 0.25},
    ],
)
def test_each_schedules_rates_are_torchs(recipe_file, schedule):
    epochs = 5
    run_dir, metrics = _run(recipe_file, train__epochs=epochs, optim__scheduler=schedule)
    optimizer = _optimizer()
    lr = torch.optim.lr_scheduler
    if schedule["name"] == "multistep":
        expected = _epoch_curve(lr.MultiStepLR(optimizer, [1, 3], 0.5), epochs)
        assert len(set(expected)) == 3
    elif schedule["name"] == "warmup_cosine":
        warm = lr.LinearLR(optimizer, 0.1, 1.0, 2)
        cosine = lr.CosineAnnealingLR(optimizer, epochs - 2, 1e-4)
        expected = _epoch_curve(lr.SequentialLR(optimizer, [warm, cosine], [2]), epochs)
        # and the formula: linear from 0.1 x lr over 2 epochs, then a cosine to 1e-4 over 3
        formula = [LR * (0.1 + 0.9 * t / 2) for t in range(2)] + [
            1e-4 + (LR - 1e-4) * (1 + math.cos(math.pi * t / 3)) / 2 for t in range(3)
        ]
        assert expected == pytest.approx(formula, rel=1e-9)
    else:
        steps = _steps_per_epoch(run_dir)
        assert steps > 1
        cycle = lr.OneCycleLR(optimizer, LR, total_steps=epochs * steps, pct_start=0.25)
        expected = _last_step_curve(cycle, epochs, steps)
    assert metrics["lr"].tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_warmup_in_steps_steps_per_step():
    optimizer = _optimizer()
    config = OptimConfig(
        scheduler={"name": "warmup_cosine", "warmup": 5, "unit": "steps", "start_factor": 0.2}
    )
    built = build_scheduler(config, optimizer, 3, 4, Selection("val", "acc", True))
    assert built is not None and built.every == "step"
    rates = []
    for _ in range(3):
        for _ in range(4):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            built.after_step()
        built.after_epoch()  # a per-step schedule ignores epochs
        built.after_evaluation(0.5)
    formula = [LR * (0.2 + 0.8 * t / 5) for t in range(5)] + [
        LR * (1 + math.cos(math.pi * t / 7)) / 2 for t in range(7)
    ]
    assert rates == pytest.approx(formula, rel=1e-9)
    built.after_step()  # past its length the schedule holds its last rate
    assert built.scheduler.last_epoch == 12


def test_plateau_follows_the_selection_metric_and_its_direction(recipe_file):
    schedule = {"name": "plateau", "patience": 0, "factor": 0.5}
    run_dir, metrics = _run(
        recipe_file, train__epochs=6, train__select_on="val_loss", optim__scheduler=schedule
    )
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        _optimizer(), mode="min", factor=0.5, patience=0
    )
    expected = []
    for value in metrics["val_loss"]:
        expected.append(plateau.optimizer.param_groups[0]["lr"])
        plateau.step(value)
    assert metrics["lr"].tolist() == expected
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["selected_on"] == "loss" and summary["higher_is_better"] is False
    assert summary["best_epoch"] == int(metrics.loc[metrics["val_loss"].idxmin(), "epoch"])


def test_onecycle_resumes_exactly(recipe_file, tmp_path):
    schedule = {"name": "onecycle"}
    straight = load_recipe(recipe_file(name="straight", train__epochs=4, optim__scheduler=schedule))
    broken = straight.model_copy(update={"name": "broken"})
    Trainer(straight, 0).run()
    with pytest.raises(Crash):
        Trainer(broken, 0, callbacks=crash_after(2)).run()
    Trainer(broken, 0, resume=True).run()
    drop = ["seconds", "data_seconds"]
    a = pd.read_parquet(tmp_path / "runs/straight/seed0/metrics.parquet").drop(columns=drop)
    b = pd.read_parquet(tmp_path / "runs/broken/seed0/metrics.parquet").drop(columns=drop)
    pd.testing.assert_frame_equal(a, b)


def test_clipping_bounds_every_step_and_a_loose_bound_changes_nothing(recipe_file):
    norms: list[float] = []

    def record(optimizer: torch.optim.Optimizer, args: object, kwargs: object) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        norms.append(float(torch.nn.utils.get_total_norm(grads)))

    handle = register_optimizer_step_pre_hook(record)
    try:
        _, plain = _run(recipe_file, name="plain", train__epochs=1)
        unclipped = list(norms)
        norms.clear()
        _, clipped = _run(recipe_file, name="clipped", train__epochs=1, train__clip_grad_norm=1e-3)
    finally:
        handle.remove()
    assert min(unclipped) > 1e-3  # the bound is binding
    assert len(norms) == len(unclipped) and max(norms) <= 1e-3 * (1 + 1e-5)
    assert not plain["train_loss"].equals(clipped["train_loss"])
    _, loose = _run(recipe_file, name="loose", train__epochs=1, train__clip_grad_norm=1e9)
    drop = ["seconds", "data_seconds"]
    pd.testing.assert_frame_equal(plain.drop(columns=drop), loose.drop(columns=drop))


def test_new_fields_at_their_defaults_keep_the_settings_hash(recipe_file):
    recipe = load_recipe(recipe_file())
    dump = recipe.model_dump(mode="json")
    for name in ("clip_grad_norm", "early_stopping", "select_on", "select_mode"):
        del dump["train"][name]
    older = parse_recipe(dump, "older")
    assert older.settings_hash() == recipe.settings_hash()
    changed = load_recipe(recipe_file(train__clip_grad_norm=1.0))
    assert changed.settings_hash() != recipe.settings_hash()


def test_early_stopping_finishes_the_run_and_a_resume_trains_no_further(recipe_file, tmp_path):
    # no validation accuracy can rise by more than 0.5 after the first evaluation: the run
    # stops after its second epoch
    stop = {"patience": 1, "min_delta": 0.5}
    recipe = load_recipe(recipe_file(train__epochs=6, train__early_stopping=stop))
    Trainer(recipe, 0).run()
    run = tmp_path / "runs/tiny/seed0"
    summary = json.loads((run / SUMMARY).read_text())
    assert summary["finished"] and summary["stopped_early"] and summary["epochs_trained"] == 2
    assert len(pd.read_parquet(run / "metrics.parquet")) == 2
    assert Trainer(recipe, 0).run().skipped
    longer = load_recipe(recipe_file(train__epochs=9, train__early_stopping=stop))
    result = Trainer(longer, 0, resume=True).run()
    assert not result.skipped and result.summary["epochs_trained"] == 2
    assert len(pd.read_parquet(run / "metrics.parquet")) == 2


def test_early_stopping_that_never_triggers_trains_every_epoch(recipe_file):
    stop = {"patience": 50}
    run_dir, metrics = _run(recipe_file, train__epochs=3, train__early_stopping=stop)
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert len(metrics) == 3 and summary["stopped_early"] is False


def test_select_on_a_metric_and_a_given_direction(recipe_file):
    run_dir, metrics = _run(
        recipe_file, train__epochs=4, train__select_on="val_f1", train__select_mode="min"
    )
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert summary["selected_on"] == "f1" and summary["higher_is_better"] is False
    assert summary["best_epoch"] == int(metrics.loc[metrics["val_f1"].idxmin(), "epoch"])
    assert (metrics["val_loss"] > 0).all() and (metrics["test_loss"] > 0).all()
    assert load_checkpoint(run_dir / "best.pt").epoch == summary["best_epoch"]


def test_default_selection_is_the_tasks_and_is_not_recorded(recipe_file):
    run_dir, metrics = _run(recipe_file, train__epochs=3)
    summary = json.loads((run_dir / SUMMARY).read_text())
    assert "selected_on" not in summary  # as before: classification on val_acc
    assert summary["best_epoch"] == int(metrics.loc[metrics["val_acc"].idxmax(), "epoch"])


def test_a_metric_evaluation_does_not_log_is_refused_before_training(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(train__select_on="val_mae"))
    with pytest.raises(UserError, match=r"logs no such metric; it logs .*val_acc.*val_loss"):
        Trainer(recipe, 0).run()
    assert not (tmp_path / "runs/tiny/seed0/metrics.parquet").exists()


def test_warmup_longer_than_the_run_is_refused(recipe_file):
    schedule = {"name": "warmup_cosine", "warmup": 2}
    with pytest.raises(UserError, match=r"optim\.scheduler\.warmup"):
        load_recipe(recipe_file(train__epochs=2, optim__scheduler=schedule))


@pytest.mark.parametrize(
    ("cores", "processes", "workers", "gpu_workers"),
    [
        (1, 1, 0, 0),
        (2, 1, 0, 1),
        (3, 1, 2, 2),
        (16, 1, 4, 15),
        (64, 1, 4, 16),
        (8, 2, 3, 3),
        (4, 2, 0, 1),
    ],
)
def test_auto_workers(monkeypatch, cores, processes, workers, gpu_workers):
    monkeypatch.setattr(session_module.os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert loader_workers("auto", processes) == workers
    assert loader_workers("auto", processes, gpu=True) == gpu_workers
    assert loader_workers(3, processes) == 3


def test_auto_is_the_default_and_recipes_ask_for_no_fixed_count(recipe_file):
    raw = yaml.safe_load(recipe_file().read_text())
    assert "workers" not in raw["train"]
    assert load_recipe(recipe_file()).train.workers == "auto"
    listed = Path(__file__).parents[1] / "recipes"
    for path in listed.rglob("*.yaml"):
        train = (yaml.safe_load(path.read_text()) or {}).get("train") or {}
        assert train.get("workers", "auto") == "auto", path


def test_set_on_a_tag_switches_the_type(recipe_file):
    path = recipe_file(optim__scheduler={"name": "step", "step_size": 3, "gamma": 0.5})
    cosine = load_recipe(path, ["optim.scheduler.name=cosine"]).optim.scheduler
    assert cosine.name == "cosine" and cosine.min_lr == 0.0
    multistep = load_recipe(
        path, ["optim.scheduler.name=multistep", "optim.scheduler.milestones=[2]"]
    ).optim.scheduler
    assert multistep.name == "multistep" and multistep.gamma == 0.5  # a key both types have
    encoder = load_recipe(path, ["model.encoder.kind=resnet18"]).model.encoder
    assert encoder.kind == "resnet18"


def test_set_on_a_tag_names_a_left_over_key_that_does_not_fit(recipe_file):
    path = recipe_file(method={"name": "pmr", "alpha": 0.0})
    result = runner.invoke(app, ["train", "--recipe", str(path), "--set", "method.name=ogm_ge"])
    assert result.exit_code == 2
    assert "method.alpha: kept from the mapping before --set changed its type" in result.output
    # a value given anew is the user's, not a left-over
    result = runner.invoke(
        app,
        ["train", "--recipe", str(path), "--set", "method.name=ogm_ge", "--set", "method.alpha=0"],
    )
    assert result.exit_code == 2 and "kept from the mapping" not in result.output
