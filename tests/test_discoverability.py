"""Discoverability and papercuts: `recipe show`, a data set's `--set` parameters, `value` on a
run folder and `--device auto`, `prep` refusing a `--raw` it does not read, Ctrl-C in `train`,
progress bars that count the real steps, and encoders by import path behind --trust-code."""

from __future__ import annotations

import io
import math
import shlex
from typing import ClassVar, Literal

import pandas as pd
import pytest
import torch
from mmval.cli import main
from mmval.cli.main import app
from pydantic import Field
from rich.console import Console
from rich.progress import Progress
from torch import nn
from typer.testing import CliRunner

from mmval.artifacts.layout import LAST
from mmval.catalog import components
from mmval.data.manifest import load_dataset_manifest
from mmval.data.shards import ModalitySpec
from mmval.engine.loop import Callback, Fit
from mmval.methods import METHODS, Method, MethodConfig
from mmval.models.fusions import FUSIONS
from mmval.plugins import PLUGINS
from mmval.recipe import load_recipe
from mmval.runner import Trainer
from tests.conftest import Crash, crash_after, quick_recipe

runner = CliRunner()


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """One line per table row: cells are compared whole."""
    monkeypatch.setattr(main.console, "width", 2000)


# ------------------------------------------------------------------------------ recipe show
class ShownConfig(MethodConfig):
    name: Literal["shown_test"] = "shown_test"
    source: ClassVar[str] = "someone/somewhere@0123456789abcdef0123456789abcdef01234567"
    strength: float = Field(default=0.25, description="how hard the test method pushes")


class Shown(Method):
    """A method registered at run time: listed like the built-in ones."""

    Config = ShownConfig


def test_recipe_show_lists_every_registered_component(wide, monkeypatch):
    monkeypatch.setitem(METHODS, "shown_test", Shown)
    result = runner.invoke(app, ["recipe", "show"])
    assert result.exit_code == 0, result.output
    names = [*METHODS, *FUSIONS, *PLUGINS]
    assert "shown_test" in names
    rows = {
        tuple(cell.strip() for cell in line.split("│")[1:3]) for line in result.output.split("\n")
    }
    kinds = {"method": METHODS, "fusion": FUSIONS, "plug-in": PLUGINS}
    assert {(kind, name) for kind, registry in kinds.items() for name in registry} <= rows

    result = runner.invoke(app, ["recipe", "show", "shown_test"])
    assert result.exit_code == 0, result.output
    assert f"source: {ShownConfig.source}" in result.output
    assert "tasks: classification" in result.output
    row = next(line for line in result.output.split("\n") if "method.strength" in line)
    assert [cell.strip() for cell in row.split("│")[1:5]] == [
        "method.strength",
        "float",
        "0.25",
        "how hard the test method pushes",
    ]


def test_every_built_in_component_shows_its_source_tasks_and_settings(wide):
    for component in components():
        assert component.source, f"{component.kind} {component.name} declares no source"
        result = runner.invoke(app, ["recipe", "show", component.name])
        assert result.exit_code == 0, result.output
        assert f"source: {component.source}" in result.output
        if component.tasks:
            assert f"tasks: {', '.join(component.tasks)}" in result.output
        for field in component.fields:
            row = next(line for line in result.output.split("\n") if f" {field.name} " in line)
            cells = [cell.strip() for cell in row.split("│")[1:5]]
            assert cells == [field.name, field.type, field.default, field.description]
    ogm_ge = next(c for c in components() if c.name == "ogm_ge")
    alpha = next(f for f in ogm_ge.fields if f.name == "method.alpha")
    assert (alpha.type, alpha.default) == ("float", "0.1") and "modulation" in alpha.description


def test_recipe_show_names_the_known_components_for_an_unknown_one():
    result = runner.invoke(app, ["recipe", "show", "ogm-ge"])
    assert result.exit_code == 2 and "ogm_ge" in result.output


# ------------------------------------------------------------------------ prep --list / --raw
def test_prep_lists_a_data_sets_set_parameters(wide):
    result = runner.invoke(app, ["prep", "synthetic", "--list"])
    assert result.exit_code == 0, result.output
    rows = {
        cells[0]: cells
        for line in result.output.split("\n")
        if len(cells := [cell.strip() for cell in line.split("│")[1:5]]) == 4
    }
    manifest, _ = load_dataset_manifest("synthetic")
    assert manifest.params["signal"] == [0.6, 0.2]  # the manifest's value is the default shown
    assert rows["signal"][1:3] == ["list[float]", "[0.6, 0.2]"]
    assert rows["signal"][3].startswith("per modality: prototype scale")
    assert rows["kinds"][1:3] == ["list[vector | image | tokens] | None", "null"]

    result = runner.invoke(app, ["prep", "crema-d", "--list"])
    assert result.exit_code == 0 and "modalities.0.size" in result.output
    result = runner.invoke(app, ["prep", "--list", "--verbose"])
    assert result.exit_code == 0
    assert "--set parameters of uci-mfeat" in result.output
    assert "--set parameters of synthetic" in result.output
    result = runner.invoke(app, ["prep", "--list"])
    assert result.exit_code == 0 and "--set parameters of" not in result.output
    result = runner.invoke(app, ["prep", "synthetic", "--verbose"])
    assert result.exit_code == 2 and "--list" in result.output


@pytest.mark.parametrize("dataset", ["synthetic", "uci-mfeat", "table"])
def test_prep_refuses_a_raw_folder_the_data_set_does_not_read(tmp_path, dataset):
    out = tmp_path / "out"
    result = runner.invoke(app, ["prep", dataset, "--raw", str(tmp_path), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert "does not read raw files" in result.output and "--raw" in result.output
    assert not out.exists()


def test_prep_without_a_data_set_says_so(tmp_path):
    result = runner.invoke(app, ["prep", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "name the data set" in result.output and "uci-mfeat" in result.output


# --------------------------------------------------------------------- value on a run folder
def test_value_takes_a_run_folder_and_device_auto(recipe_file, tmp_path):
    path = recipe_file(seeds=[0, 1])
    assert runner.invoke(app, ["train", "--recipe", str(path)]).exit_code == 0
    run = tmp_path / "runs/tiny"
    by_folder, by_file = tmp_path / "folder.parquet", tmp_path / "file.parquet"
    result = runner.invoke(app, ["value", str(run / "seed0"), "--out", str(by_folder)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["value", str(run / "seed0/best.pt"), "--out", str(by_file)])
    assert result.exit_code == 0, result.output
    pd.testing.assert_frame_equal(pd.read_parquet(by_folder), pd.read_parquet(by_file))
    auto = runner.invoke(app, ["value", str(run / "seed1"), "--device", "auto", "--summary"])
    assert auto.exit_code == 0, auto.output

    result = runner.invoke(app, ["value", str(run), "--summary"])
    assert result.exit_code == 2
    assert "holds 2 runs" in result.output
    assert str(run / "seed0") in result.output and str(run / "seed1") in result.output
    result = runner.invoke(app, ["value", str(run / "seed0"), "--device", "tpu", "--summary"])
    assert result.exit_code == 2 and "cpu, cuda or auto" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["value", str(empty), "--summary"])
    assert result.exit_code == 2 and "holds no run folder" in result.output


# ------------------------------------------------------------------------------------ Ctrl-C
class InterruptAt(Callback):
    """Raises KeyboardInterrupt (what Ctrl-C raises) after `step` steps of epoch `epoch`."""

    def __init__(self, epoch: int, step: int) -> None:
        self.epoch, self.step, self.taken = epoch, step, 0

    def on_train_epoch_start(self, fit: Fit, steps: int) -> None:
        self.taken = 0

    def on_train_step(self, fit: Fit) -> None:
        self.taken += 1
        if fit.state.epoch + 1 == self.epoch and self.taken == self.step:
            raise KeyboardInterrupt


def test_ctrl_c_says_where_the_run_stopped_and_how_to_resume(recipe_file, tmp_path, monkeypatch):
    path = recipe_file()
    bars = main._train_callbacks
    monkeypatch.setattr(main, "_train_callbacks", lambda p: [*bars(p), InterruptAt(2, 3)])
    args = ["train", "--recipe", str(path), "--set", "train.epochs=3"]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    run = tmp_path / "runs/tiny/seed0"
    text = " ".join(result.output.split())
    steps = math.ceil(240 / 32)  # 4 classes x 60 training samples, batches of 32
    assert f"{run} stopped in epoch 2 of 3, after step 3 of {steps}" in text
    assert "its last.pt holds epoch 1" in text
    command = text.split("Continue with: ")[1].strip()
    assert command == shlex.join(["mmval", *args, "--resume"])
    assert (run / LAST).is_file()

    monkeypatch.setattr(main, "_train_callbacks", bars)
    result = runner.invoke(app, shlex.split(command)[1:])
    assert result.exit_code == 0, result.output
    assert "best epoch" in result.output and (run / "summary.json").is_file()


def test_ctrl_c_before_any_checkpoint_says_resume_starts_again(recipe_file, monkeypatch):
    bars = main._train_callbacks
    monkeypatch.setattr(main, "_train_callbacks", lambda p: [*bars(p), InterruptAt(1, 1)])
    result = runner.invoke(app, ["train", "--recipe", str(recipe_file())])
    assert result.exit_code == 130
    assert "no last.pt was written yet" in " ".join(result.output.split())


# ----------------------------------------------------------------------------- progress bars
class StepCount(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_step(self, fit: Fit) -> None:
        self.steps += 1


def bars() -> Progress:
    return Progress(console=Console(file=io.StringIO()))


def test_bars_count_the_copies_of_a_re_sampling_method_and_the_steps_of_a_resumed_run(
    synthetic_dir, tmp_path
):
    recipe = quick_recipe(
        "mmcooperation_sample", synthetic_dir, tmp_path / "runs", epochs=3, batch_size=32
    )
    progress, counted = bars(), StepCount()
    Trainer(recipe, 0, callbacks=[*main._train_callbacks(progress), counted]).run()
    (task,) = progress.tasks
    assert counted.steps > 3 * math.ceil(240 / 32)  # copies were trained
    assert task.total == task.completed == counted.steps

    broken = recipe.model_copy(update={"name": "resumed"})
    first, first_count = bars(), StepCount()
    with pytest.raises(Crash):
        Trainer(
            broken, 0, callbacks=[*main._train_callbacks(first), first_count, *crash_after(2)]
        ).run()
    then, then_count = bars(), StepCount()
    Trainer(broken, 0, resume=True, callbacks=[*main._train_callbacks(then), then_count]).run()
    (task,) = then.tasks
    assert task.completed == task.total == first_count.steps + then_count.steps == counted.steps


# ------------------------------------------------------------------ encoders by import path
class TinyEncoder(nn.Module):
    """A user's own encoder: built from the modality's spec and its recipe kwargs."""

    def __init__(self, spec: ModalitySpec, width: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(math.prod(spec.shape), width)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.net(x.float().flatten(1)))


class NoOutDim(nn.Module):
    def __init__(self, spec: ModalitySpec) -> None:
        super().__init__()


TARGET = f"{__name__}:TinyEncoder"


def test_a_python_encoder_trains_and_its_checkpoint_loads_only_when_trusted(recipe_file, tmp_path):
    encoder = {"kind": "python", "target": TARGET, "kwargs": {"width": 6}}
    path = recipe_file(model__encoder=encoder, evaluate={"repeats": 1})
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs/tiny/seed0"
    assert (run / "evaluate").is_dir()  # its own evaluate: tables load its own code
    weights = torch.load(run / "best.pt", weights_only=False)["model"]
    assert weights["encoders.a.net.weight"].shape == (6, 8)

    refused = runner.invoke(app, ["value", str(run), "--summary"])
    assert refused.exit_code == 2
    text = " ".join(refused.output.split())
    assert "--trust-code" in text and TARGET in text
    trusted = runner.invoke(app, ["value", str(run), "--summary", "--trust-code"])
    assert trusted.exit_code == 0, trusted.output
    for method in ("subsets", "dcor"):  # every way of loading a checkpoint refuses it
        again = runner.invoke(app, ["value", str(run), "--method", method])
        assert again.exit_code == 2 and "--trust-code" in again.output


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        (f"{__name__}:NoOutDim", "out_dim"),
        (f"{__name__}:Missing", "has no Missing"),
        ("no_such_package.encoders:Encoder", "cannot import no_such_package.encoders"),
    ],
)
def test_a_python_encoder_that_cannot_be_built_is_a_user_error(recipe_file, target, problem):
    path = recipe_file(model__encoder={"kind": "python", "target": target})
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2 and problem in result.output


def test_a_python_encoder_target_must_be_module_colon_class(recipe_file):
    path = recipe_file(model__encoder={"kind": "python", "target": "just_a_module"})
    with pytest.raises(Exception, match="target"):
        load_recipe(path)
