"""TensorBoard events (`train.tensorboard: true`): read back with tensorboard's own reader, one
scalar per metrics.parquet column and epoch, and no step twice after a resume."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from mmval.artifacts.layout import TB_DIR
from mmval.engine.tensorboard import scalar_tag
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows: (step, value) per tag, after its purge of abandoned steps."""
    events = EventAccumulator(str(run / TB_DIR))
    events.Reload()
    return {
        tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]
    }


def raw_steps(run: Path, tag: str) -> list[int]:
    """Every step written for `tag` in every event file, nothing hidden."""
    steps = []
    for path in sorted((run / TB_DIR).glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return steps


def assert_matches_metrics(run: Path, epochs: int) -> None:
    metrics = pd.read_parquet(run / "metrics.parquet")
    shown = scalars(run)
    columns = [c for c in metrics.columns if c != "epoch"]
    assert set(shown) == {scalar_tag(c) for c in columns}
    for column in columns:
        steps, values = zip(*shown[scalar_tag(column)], strict=True)
        assert list(steps) == list(range(1, epochs + 1)), column
        assert values == pytest.approx(metrics[column].tolist(), rel=1e-6), column


def test_tags_group_by_split():
    assert scalar_tag("train_loss") == "train/loss"
    assert scalar_tag("val_acc_audio") == "val/acc_audio"
    assert scalar_tag("test_f1") == "test/f1"
    assert scalar_tag("method_coef_a") == "method/coef_a"
    assert scalar_tag("lr") == "train/lr"
    assert scalar_tag("seconds") == "train/seconds"


def test_events_hold_every_epoch_scalar(recipe_file, tmp_path):
    recipe = load_recipe(
        recipe_file(method={"name": "ogm_ge"}, train__epochs=3, train__tensorboard=True)
    )
    Trainer(recipe, 0).run()
    run = tmp_path / "runs/tiny/seed0"
    shown = scalars(run)
    expected = {"train/loss", "train/acc", "train/lr", "val/acc", "val/f1", "test/acc", "test/f1"}
    assert expected | {"val/acc_a", "test/acc_c", "method/coef_a"} <= set(shown)
    assert_matches_metrics(run, 3)


def test_off_by_default_and_not_a_setting(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(train__epochs=1))
    assert recipe.train.tensorboard is False
    Trainer(recipe, 0).run()
    assert not (tmp_path / "runs/tiny/seed0" / TB_DIR).exists()
    on = load_recipe(recipe_file(train__epochs=1, train__tensorboard=True))
    assert on.settings_hash() == recipe.settings_hash()  # the same experimental setting


def test_resumed_run_appends_without_repeating_steps(recipe_file, tmp_path):
    recipe = load_recipe(recipe_file(train__epochs=4, train__tensorboard=True))
    with pytest.raises(Crash):
        Trainer(recipe, 0, callbacks=crash_after(2)).run()
    Trainer(recipe, 0, resume=True).run()
    run = tmp_path / "runs/tiny/seed0"
    assert_matches_metrics(run, 4)
    assert raw_steps(run, "train/loss") == [1, 2, 3, 4]  # none written twice on disk either


def test_epochs_past_the_last_checkpoint_are_replaced(recipe_file, tmp_path):
    """Killed after epoch 3 with last.pt from epoch 2: epoch 3 is trained again, and TensorBoard
    shows the new epoch 3 only (the first one is purged through purge_step)."""
    recipe = load_recipe(
        recipe_file(train__epochs=4, train__tensorboard=True, train__checkpoint_every=2)
    )
    with pytest.raises(Crash):
        Trainer(recipe, 0, callbacks=crash_after(3)).run()
    first_try = dict(scalars(tmp_path / "runs/tiny/seed0")["train/seconds"])[3]
    Trainer(recipe, 0, resume=True).run()
    run = tmp_path / "runs/tiny/seed0"
    assert_matches_metrics(run, 4)
    assert dict(scalars(run)["train/seconds"])[3] != first_try


def test_turned_on_when_resuming_a_finished_run_writes_its_history(recipe_file, tmp_path):
    Trainer(load_recipe(recipe_file(train__epochs=2)), 0).run()
    Trainer(
        load_recipe(recipe_file(train__epochs=2, train__tensorboard=True)), 0, resume=True
    ).run()
    assert_matches_metrics(tmp_path / "runs/tiny/seed0", 2)
