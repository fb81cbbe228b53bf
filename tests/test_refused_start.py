"""A refused start or resume leaves the run folder as it was, byte for byte, and says which
field differs (dotted name, old and new value) and whether the run had finished."""

from __future__ import annotations

from pathlib import Path

import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.errors import UserError
from mmval.locks import LOCK_FILE
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after

runner = CliRunner()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (the lock file aside) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def test_a_refused_resume_of_an_unfinished_run_changes_no_file(recipe_file, tmp_path):
    path = recipe_file(train__epochs=3, train__batch_size=32)
    with pytest.raises(Crash):
        Trainer(load_recipe(path), 0, callbacks=crash_after(1)).run()
    run = tmp_path / "runs/tiny/seed0"
    before = snapshot(run)
    assert "recipe.yaml" in before and "last.pt" in before
    changed = load_recipe(path, ["train.batch_size=16", "optim.lr=0.5"])
    with pytest.raises(UserError) as refused:
        Trainer(changed, 0, resume=True).run()
    message = str(refused.value)
    assert "train.batch_size (was 32, now 16)" in message
    assert "optim.lr (was 0.01, now 0.5)" in message
    assert "finished" not in message and "--overwrite" in message
    assert snapshot(run) == before
    # the CLI says the same, and still changes nothing
    result = runner.invoke(
        app, ["train", "--recipe", str(path), "--set", "train.batch_size=16", "--resume"]
    )
    assert result.exit_code == 2 and "train.batch_size (was 32, now 16)" in result.output
    assert snapshot(run) == before


def test_a_refused_resume_of_a_finished_run_says_it_finished(recipe_file, tmp_path):
    path = recipe_file(train__epochs=1)
    Trainer(load_recipe(path), 0).run()
    run = tmp_path / "runs/tiny/seed0"
    before = snapshot(run)
    for resume in (True, False):
        with pytest.raises(UserError) as refused:
            Trainer(load_recipe(path, ["method.name=ogm_ge"]), 0, resume=resume).run()
        message = str(refused.value)
        assert "holds a finished run" in message and "not finished" not in message
        assert 'method.name (was "concat", now "ogm_ge")' in message
        assert "--set name=" in message and "--overwrite" in message
        assert snapshot(run) == before
    args = ["train", "--recipe", str(path), "--set", "optim.lr=0.5"]
    for extra in ([], ["--resume"]):
        result = runner.invoke(app, [*args, *extra])
        assert result.exit_code == 2, result.output
        output = " ".join(result.output.split())
        assert "holds a finished run" in output and "not finished" not in output
        assert "optim.lr (was 0.01, now 0.5)" in output
        assert snapshot(run) == before
    # what --resume may change (train.epochs) is named, and --resume then continues the run
    result = runner.invoke(app, ["train", "--recipe", str(path), "--set", "train.epochs=2"])
    output = " ".join(result.output.split())
    assert result.exit_code == 2 and "train.epochs (was 1, now 2)" in output, output
    assert "pass --resume" in output and snapshot(run) == before
    longer = load_recipe(path, ["train.epochs=2"])
    assert Trainer(longer, 0, resume=True).run().summary["epochs"] == 2


def test_a_run_refused_before_training_leaves_no_folder(recipe_file, tmp_path):
    """The data set has no modality `z`: found when the session is built, after the folder
    was locked; nothing of the run may stay behind (not even its parent folders)."""
    recipe = load_recipe(recipe_file(data__modalities=["a", "z"]))
    with pytest.raises(UserError, match="'z'"):
        Trainer(recipe, 0).run()
    assert not (tmp_path / "runs").exists()


def test_a_refused_overwrite_keeps_the_old_run(recipe_file, tmp_path):
    """--overwrite clears the old run only once the new one can start."""
    path = recipe_file(train__epochs=1)
    Trainer(load_recipe(path), 0).run()
    run = tmp_path / "runs/tiny/seed0"
    before = snapshot(run)
    broken = load_recipe(path, ["data.modalities=[a,z]"])
    with pytest.raises(UserError, match="'z'"):
        Trainer(broken, 0, overwrite=True).run()
    assert snapshot(run) == before
