"""Freezing schedules (`train.freeze`) and optimizer parameter groups (`optim.groups`)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest
import torch
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.engine.loop import Callback, Fit
from mmval.engine.session import Selection, build_scheduler
from mmval.errors import UserError
from mmval.recipe import OptimConfig, Recipe, load_recipe, parse_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after, timeless_metrics
from tests.test_distributed import run_ranks

pytestmark = pytest.mark.usefixtures("one_thread")

runner = CliRunner()


class Snapshots(Callback):
    """The model's state (parameters and buffers) before training and after every epoch."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self.model = torch.nn.Module()
        self.optimizer: torch.optim.Optimizer | None = None

    def _keep(self, fit: Fit) -> None:
        state = fit.session.model.state_dict()
        self.states.append({k: v.detach().clone() for k, v in state.items()})

    def on_train_start(self, fit: Fit) -> None:
        self.model, self.optimizer = fit.session.model, fit.session.optimizer
        self._keep(fit)

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        self._keep(fit)

    def moved(self, prefix: str, epoch: int) -> bool:
        """Whether a parameter under `prefix` changed (bit for bit) in 0-based `epoch`."""
        names = [n for n, _ in self.model.named_parameters() if n.startswith(prefix)]
        assert names, prefix
        before, after = self.states[epoch], self.states[epoch + 1]
        return any(not torch.equal(before[n], after[n]) for n in names)


def _train(recipe_file, **changes: Any) -> tuple[Snapshots, pd.DataFrame]:
    snap = Snapshots()
    result = Trainer(load_recipe(recipe_file(**changes)), 0, callbacks=[snap]).run()
    return snap, pd.read_parquet(result.run_dir / "metrics.parquet")


def test_a_frozen_encoder_is_left_for_n_epochs_and_trains_after(recipe_file):
    freeze = {"encoders.a": 2, "encoders.b": "always"}
    snap, _ = _train(recipe_file, train__epochs=3, train__freeze=freeze)
    moved = {
        prefix: [snap.moved(prefix, e) for e in range(3)]
        for prefix in ("encoders.a.", "encoders.b.", "encoders.c.", "fusion.")
    }
    assert moved == {
        "encoders.a.": [False, False, True],  # epochs 0 and 1 frozen, trained from epoch 2
        "encoders.b.": [False, False, False],
        "encoders.c.": [True, True, True],
        "fusion.": [True, True, True],
    }


def test_without_freeze_every_encoder_trains_in_epoch_0(recipe_file):
    snap, _ = _train(recipe_file, train__epochs=1)
    assert all(snap.moved(f"encoders.{m}.", 0) for m in "abc")


def test_a_frozen_resnet_keeps_updating_its_batchnorm_statistics(tmp_path, synthetic_av_dir):
    raw = {
        "name": "frozen-resnet",
        "seeds": [0],
        "data": {"path": str(synthetic_av_dir)},
        "model": {"encoder": {"kind": "resnet18"}, "fusion": "concat"},
        "method": {"name": "concat"},
        "optim": {"name": "adam", "lr": 1e-3},
        "train": {"epochs": 1, "batch_size": 8, "freeze": {"encoders.visual": "always"}},
        "output": str(tmp_path / "runs"),
    }
    snap = Snapshots()
    Trainer(parse_recipe(raw, "test"), 0, callbacks=[snap]).run()
    assert not snap.moved("encoders.visual.", 0)
    assert snap.moved("encoders.audio.", 0)
    # train mode, as QMF: the frozen trunk's running statistics follow the batches
    for stat in ("running_mean", "running_var"):
        keys = [k for k in snap.states[0] if k.startswith("encoders.visual.") and stat in k]
        assert keys and all(not torch.equal(snap.states[0][k], snap.states[1][k]) for k in keys)


def test_an_unknown_module_path_exits_2_naming_the_model_modules(recipe_file):
    path = recipe_file(train__freeze={"encoders.d": 1})
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2, result.output
    said = " ".join(result.output.split())
    assert "train.freeze" in said and "no module encoders.d" in said
    assert "encoders.a" in said and "fusion" in said
    grouped = recipe_file(optim__groups=[{"params": "head", "lr": 0.1}])
    result = runner.invoke(app, ["train", "--recipe", str(grouped)])
    assert result.exit_code == 2 and "optim.groups" in result.output, result.output


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"train__freeze": {"encoders": 1, "encoders.a": 2}}, "share parameters"),
        ({"optim__groups": [{"params": "encoders"}, {"params": "encoders.b"}]}, "share"),
        (
            {"train__freeze": {"encoders": "always", "fusion": 1}},
            "freezes every trainable parameter",
        ),
    ],
)
def test_overlaps_and_a_model_with_nothing_to_train_are_refused(recipe_file, changes, words):
    with pytest.raises(UserError, match=words):
        Trainer(load_recipe(recipe_file(**changes)), 0).run()


def test_bad_paths_and_repeated_groups_fail_validation(recipe_file):
    for changes in (
        {"train__freeze": {"encoders..a": 1}},
        {"train__freeze": {"encoders.a": -1}},
        {"train__freeze": {"encoders.a": "later"}},
        {"optim__groups": [{"params": "fusion"}, {"params": "fusion", "lr": 0.1}]},
    ):
        with pytest.raises(UserError):
            load_recipe(recipe_file(**changes))


def test_a_resume_inside_the_frozen_window_matches_an_uninterrupted_run(recipe_file, tmp_path):
    changes = {
        "train__epochs": 4,
        "train__freeze": {"encoders.a": 3, "encoders.b": "always"},
        "optim__groups": [{"params": "encoders.c", "lr": 0.003}],
        "optim__scheduler": {"name": "step", "step_size": 1, "gamma": 0.5},
    }
    straight = load_recipe(recipe_file(name="straight", **changes))
    broken = load_recipe(recipe_file(name="broken", **changes))
    Trainer(straight, 0).run()
    with pytest.raises(Crash):
        Trainer(broken, 0, callbacks=crash_after(2)).run()
    Trainer(broken, 0, resume=True).run()
    a = timeless_metrics(tmp_path / "runs/straight/seed0")
    b = timeless_metrics(tmp_path / "runs/broken/seed0")
    pd.testing.assert_frame_equal(a, b)
    # the schedule scales both groups from their own rates
    assert a["lr"].tolist() == pytest.approx([0.01, 0.005, 0.0025, 0.00125])
    assert a["lr_encoders.c"].tolist() == pytest.approx([0.003, 0.0015, 0.00075, 0.000375])


def test_a_group_trains_with_its_own_rate(recipe_file):
    groups = [{"params": "encoders.a", "lr": 0.0}, {"params": "encoders.b", "lr": 0.05}]
    snap, metrics = _train(recipe_file, train__epochs=1, optim__name="adamw", optim__groups=groups)
    # lr 0 leaves encoders.a as it was (AdamW's decoupled decay is lr x weight_decay as well)
    assert not snap.moved("encoders.a.", 0)
    assert snap.moved("encoders.b.", 0) and snap.moved("encoders.c.", 0)
    assert snap.optimizer is not None
    assert [g["lr"] for g in snap.optimizer.param_groups] == [0.01, 0.0, 0.05]
    assert metrics[["lr", "lr_encoders.a", "lr_encoders.b"]].iloc[0].tolist() == [0.01, 0.0, 0.05]
    names = {id(p): n for n, p in snap.model.named_parameters()}
    grouped = [{names[id(p)] for p in g["params"]} for g in snap.optimizer.param_groups]
    assert grouped[1] == {n for n in names.values() if n.startswith("encoders.a.")}
    assert grouped[2] == {n for n in names.values() if n.startswith("encoders.b.")}
    assert grouped[0] == set(names.values()) - grouped[1] - grouped[2]


def test_groups_with_the_default_settings_train_as_one_group(recipe_file, tmp_path):
    """A group at optim.lr and optim.weight_decay changes nothing but the group layout: Adam
    updates every parameter by its own state."""
    _, plain = _train(recipe_file, name="plain", train__epochs=2)
    _, grouped = _train(
        recipe_file, name="grouped", train__epochs=2, optim__groups=[{"params": "encoders.b"}]
    )
    pd.testing.assert_frame_equal(
        plain.drop(columns=["seconds", "data_seconds"]),
        grouped.drop(columns=["seconds", "data_seconds", "lr_encoders.b"]),
    )


def test_new_fields_at_their_defaults_keep_the_settings_hash(recipe_file):
    recipe = load_recipe(recipe_file())
    dump = recipe.model_dump(mode="json")
    del dump["train"]["freeze"]
    del dump["optim"]["groups"]
    older = parse_recipe(dump, "older")
    assert older.settings_hash() == recipe.settings_hash()
    for changes in (
        {"train__freeze": {"encoders.a": 1}},
        {"optim__groups": [{"params": "fusion", "lr": 0.1}]},
    ):
        assert load_recipe(recipe_file(**changes)).settings_hash() != recipe.settings_hash()


def test_gblending_copies_train_with_the_run_groups_and_freezing(recipe_file):
    """G-Blending's sub-model copies take their originals' groups and frozen parts."""
    from mmval.methods.gblending import _fresh_like

    model = torch.nn.ModuleDict({"a": torch.nn.Linear(2, 2), "b": torch.nn.Linear(2, 2)})
    optimizer = torch.optim.Adam(
        [{"params": model["a"].parameters()}, {"params": model["b"].parameters(), "lr": 0.5}],
        lr=0.1,
        weight_decay=0.01,
    )
    copy = torch.nn.ModuleDict({"b": torch.nn.Linear(2, 2), "a": torch.nn.Linear(2, 2)})
    originals = [*model["b"].parameters(), *model["a"].parameters()]
    fresh = _fresh_like(optimizer, iter(originals), copy.parameters())
    assert [g["lr"] for g in fresh.param_groups] == [0.1, 0.5]
    assert [len(g["params"]) for g in fresh.param_groups] == [2, 2]
    assert fresh.param_groups[0]["params"][0] is copy["a"].weight
    assert all(g["weight_decay"] == 0.01 for g in fresh.param_groups)


def test_gblending_and_lfm_train_with_a_frozen_encoder(recipe_file, tmp_path):
    for method, freeze in (
        ({"name": "gblending", "super_epoch": 1, "schedule": "offline"}, {"encoders.b": 1}),
        ({"name": "lfm", "val_samples": 4}, {"encoders.b": 1}),
    ):
        snap, metrics = _train(
            recipe_file,
            name=method["name"],
            method=method,
            train__epochs=2,
            train__freeze=freeze,
        )
        assert not snap.moved("encoders.b.", 0), method
        assert snap.moved("encoders.b.", 1), method
        assert len(metrics) == 2


def test_lfm_refuses_a_frozen_hypergradient_parameter(recipe_file):
    recipe = load_recipe(
        recipe_file(
            method={"name": "lfm", "val_samples": 4},
            train__freeze={"encoders.a": 1},
        )
    )
    with pytest.raises(UserError, match="hypergradient_modality"):
        Trainer(recipe, 0).run()


def _train_rank(recipe: Recipe) -> None:
    Trainer(recipe, 0).run()


def test_two_process_training_with_freezing_and_groups_matches_one_process(recipe_file, tmp_path):
    """Gradient averaging over ranks leaves out the frozen parameters in their frozen epochs
    and takes them in once they train: the 2-rank run is the 1-process one."""
    common = {
        "train__epochs": 3,
        "model__encoder__dropout": 0.0,
        "train__freeze": {"encoders.a": 1, "encoders.b": "always"},
        "optim__groups": [{"params": "encoders.c", "lr": 0.02}],
    }
    Trainer(load_recipe(recipe_file(name="single", **common)), 0).run()
    run_ranks(_train_rank, load_recipe(recipe_file(name="double", **common)))
    a = timeless_metrics(tmp_path / "runs/single/seed0")
    b = timeless_metrics(tmp_path / "runs/double/seed0")
    pd.testing.assert_frame_equal(a, b, rtol=1e-4, atol=1e-6)
    wa = load_checkpoint(tmp_path / "runs/single/seed0/last.pt").model
    wb = load_checkpoint(tmp_path / "runs/double/seed0/last.pt").model
    assert all(torch.allclose(wa[k], wb[k], rtol=1e-4, atol=1e-6) for k in wa)


def test_onecycle_peaks_each_group_at_its_share_of_the_peak():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    cfg = OptimConfig(
        lr=0.01,
        groups=[{"params": "encoders.a", "lr": 0.001}],
        scheduler={"name": "onecycle", "max_lr": 0.1},
    )
    optimizer = torch.optim.SGD([{"params": params[:1]}, {"params": params[1:], "lr": 0.001}], 0.01)
    scheduler = build_scheduler(cfg, optimizer, 2, 5, Selection("val", "acc", True))
    assert scheduler is not None
    peaks = []
    for _ in range(10):
        peaks.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.after_step()
    assert max(p[0] for p in peaks) == pytest.approx(0.1)
    assert max(p[1] for p in peaks) == pytest.approx(0.01)
