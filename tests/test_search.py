"""Optuna search (mmval.search): validation that names the field, and a search of 4 trials
stopped in its third trial and continued: 4 trials, the first two not trained again, the same
trials as an uninterrupted search, best-recipe.yaml the best trial's recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.engine.loop import Callback, Fit
from mmval.errors import UserError
from mmval.search import BEST_RECIPE, JOURNAL, load_search, run_search, search_from_raw, trial_rows
from tests.conftest import Crash

pytest.importorskip("optuna", reason="the search extra (pip install 'mmval[search]')")

pytestmark = pytest.mark.usefixtures("one_thread")
RECIPES = Path(__file__).parents[1] / "recipes"
runner = CliRunner()


def search_raw(tmp_path: Path, data: Path, **search: object) -> dict:
    return {
        "name": "se",
        "seeds": [0, 1],
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "method": {"name": "ogm_ge"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 32},
        "output": str(tmp_path / "runs"),
        "search": {
            "sampler": "tpe",
            "trials": 4,
            "space": {
                "optim.lr": {"log_uniform": [1e-3, 3e-2]},
                "method.alpha": {"uniform": [0.1, 1]},
                "train.batch_size": {"choice": [32, 64]},
                "model": {"encoder": {"out_dim": {"int": [4, 16]}}},
            },
            **search,
        },
    }


def error_of(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        search_from_raw(raw, "search.yaml")
    return str(info.value)


def test_a_bad_space_names_the_field(tmp_path):
    raw = search_raw(tmp_path, tmp_path)
    raw["search"]["space"]["optim.lr"] = {"log_uniform": [0, 1e-2]}
    assert "search.space.optim.lr" in error_of(raw) and "above 0" in error_of(raw)
    raw["search"]["space"]["optim.lr"] = {"normal": [0, 1]}
    assert "search.space.optim.lr: give one of log_uniform" in error_of(raw)
    raw["search"]["space"]["optim.lr"] = {"uniform": [0.1, 0.3], "step": 0.07}
    assert "whole number of steps" in error_of(raw)
    raw = search_raw(tmp_path, tmp_path)
    raw["search"]["space"]["optim.lrr"] = {"uniform": [0.1, 0.3]}
    assert "search.space.optim.lrr: names no field of the recipe" in error_of(raw)
    raw = search_raw(tmp_path, tmp_path)
    raw["search"]["space"]["optim.lr"] = {"uniform": [0.0, 0.1]}  # lr must be > 0
    assert "search.space.optim.lr reaches 0.0" in error_of(raw)
    raw = search_raw(tmp_path, tmp_path, metric="test_acc")
    assert "search.metric" in error_of(raw)
    raw = search_raw(tmp_path, tmp_path, methods=["concat"])
    raw["methods"] = raw["search"].pop("methods")
    assert "leave out methods" in error_of(raw)


def test_an_unknown_path_exits_2(tmp_path, synthetic_dir):
    raw = search_raw(tmp_path, synthetic_dir)
    raw["search"]["space"] = {"train.epoch": {"int": [1, 3]}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", "--recipe", str(path), "--dry-run"])
    assert result.exit_code == 2
    assert "search.space.train.epoch: names no field" in " ".join(result.output.split())


class CrashInRun(Callback):
    """Raises `Crash` after the first epoch of the `n`-th run trained (counted from 1)."""

    def __init__(self, n: int) -> None:
        self.n, self.started = n, 0

    def on_train_start(self, fit: Fit) -> None:
        self.started += 1

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        if self.started == self.n and row["epoch"] == 1:
            raise Crash


class Trained(Callback):
    """Records the run folder of every run that trains."""

    def __init__(self) -> None:
        self.dirs: list[Path] = []

    def on_train_start(self, fit: Fit) -> None:
        self.dirs.append(fit.run_dir)


def test_an_interrupted_search_continues_where_it_stopped(tmp_path, synthetic_dir):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_raw(tmp_path, synthetic_dir)))
    search = load_search(path)
    assert search is not None
    # two trials of two seeds, then the first seed of the third stops after its first epoch
    with pytest.raises(Crash):
        run_search(search, callbacks=[CrashInRun(5)])
    before = trial_rows(search)
    assert [r.state for r in before] == ["finished", "finished", "interrupted"]
    first = {
        r.folder: (search.folder / r.folder / "seed0" / "best.pt").stat().st_mtime_ns
        for r in before[:2]
    }
    with open(search.folder / JOURNAL, "ab") as fh:  # a record torn by a kill
        fh.write(b'{"op_code": 5, "worker_id": "x", "trial_id": 2')
    trained = Trained()
    rows = run_search(search, resume=True, callbacks=[trained])
    done = [r for r in rows if r.state == "finished"]
    assert [r.folder for r in done] == ["trial-0000", "trial-0001", "trial-0002", "trial-0004"]
    # the first two trials were not trained again; the third continued in its own folder
    assert {d.parent.name for d in trained.dirs} == {"trial-0002", "trial-0004"}
    for folder, mtime in first.items():
        assert (search.folder / folder / "seed0" / "best.pt").stat().st_mtime_ns == mtime
    # the same trials as a search that was never interrupted
    raw = search_raw(tmp_path, synthetic_dir)
    straight = search_from_raw({**raw, "name": "straight"}, "straight.yaml")
    rows_straight = [r for r in run_search(straight) if r.state == "finished"]
    assert [r.params for r in rows_straight] == [r.params for r in done]
    assert [r.value for r in rows_straight] == pytest.approx([r.value for r in done])
    # a trial's value is the mean over its seeds of val_acc at the epoch best.pt was kept at
    best = max(done, key=lambda r: r.value)
    values = []
    for seed in (0, 1):
        summary = yaml.safe_load(
            (search.folder / best.folder / f"seed{seed}" / "summary.json").read_text()
        )
        values.append(summary["val_acc"])
    assert best.value == pytest.approx(sum(values) / 2)
    # best-recipe.yaml: the best trial's recipe, with all its seeds
    written = yaml.safe_load((search.folder / BEST_RECIPE).read_text())
    run_recipe = yaml.safe_load((search.folder / best.folder / "seed0" / "recipe.yaml").read_text())
    assert written == {**run_recipe, "seeds": [0, 1]}
    assert written["optim"]["lr"] == best.params["optim.lr"]
    # running it again trains nothing; a search with another space is refused
    again = Trained()
    assert len(run_search(search, callbacks=[again])) == 5 and again.dirs == []
    raw["search"]["space"]["optim.lr"] = {"log_uniform": [1e-3, 1e-2]}
    with pytest.raises(UserError, match=r"other settings \(search.space.optim.lr"):
        run_search(search_from_raw(raw, "search.yaml"))


def test_dry_run_lists_the_space_and_the_trials(tmp_path, synthetic_dir):
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search_raw(tmp_path, synthetic_dir, trials=1)))
    result = runner.invoke(app, ["train", "--recipe", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "model.encoder.out_dim" in text and '{"int": [4, 16]}' in text
    assert "trial-0000" not in text
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["train", "--recipe", str(path), "--dry-run"])
    assert "trials in" in result.output and "finished" in result.output
    search = load_search(path)
    assert search is not None and [r.state for r in trial_rows(search)] == ["finished"]


def test_the_shipped_c3r_search_validates():
    search = load_search(RECIPES / "search-c3r-uci-mfeat.yaml")
    assert search is not None
    assert set(search.config.space) == {"plugins.0.lambda_v", "plugins.0.lambda_fe"}
    assert search.base.plugins[0].name == "c3r"
