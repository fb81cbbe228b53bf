"""A method (or plug-in) whose own phase never starts within the run is refused as a recipe
problem naming its field: mmcooperation_sample or cmob with warmup >= train.epochs used to train
bit-identically to concat without a word. Checked for every entry of `METHODS` (read when the
tests are collected, so that a new method with a warm-up or start field must be classified)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.errors import UserError
from mmval.methods import METHODS, MethodConfig
from mmval.plugins import PLUGINS
from tests.conftest import filled, quick_recipe, timeless_metrics, trained

runner = CliRunner()

# config fields that say when a method's own phase first acts: (the field, the 0-based epoch
# it first acts in as a function of the field's value)
PHASE_STARTS: dict[tuple[str, str], Any] = {
    **{
        (name, "modulation_starts"): lambda v: v
        for name in ("agm", "amco", "cml", "mbsd", "ogm_ge", "opm", "pmr")
    },
    **{
        (name, "warmup"): lambda v: v
        for name in (
            "cmob",
            "mmcooperation_sample",
            "mmcooperation_fixed",
            "mmcooperation_modality",
        )
    },
    ("greedy", "starting_epoch"): lambda v: v,
    ("lckd", "warmup_epochs"): lambda v: v,
    ("relearning", "reinit_epoch"): lambda v: v + 1,  # re-initialised after epoch R
}
# fields that look like one but are not: the phase acts from the first epoch
NOT_STARTS = {
    ("gblending", "super_epoch"): "weights are estimated at epoch 0, then every super_epoch",
    ("reconboost", "boost_epochs"): "a stage begins with boosting at epoch 0",
    ("reconboost", "rectify_epochs"): "rectification follows boosting within each stage",
    ("tmc", "lambda_epochs"): "the annealing weight grows from the first epoch",
}
LOOKS_LIKE_A_START = re.compile(r"warm|start|epoch|begin|first|delay")
PLACEHOLDERS = {"{modality}": "a", "{checkpoint}": "best.pt", "{teachers}": {"a": "best.pt"}}


def config_of(name: str, **changes: Any) -> MethodConfig:
    cls = METHODS[name].Config
    method = filled(cls.quick.get("method", {}), PLACEHOLDERS)
    return cls.model_validate({**method, "name": name, **changes})


def int_fields(cls: type) -> list[str]:
    return [f for f, info in cls.model_fields.items() if info.annotation is int]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_start_field_is_classified(name):
    """A new method's int field named like a warm-up or start epoch must be listed above, as
    one (then its refusal is tested) or not (with the reason)."""
    for field in int_fields(METHODS[name].Config):
        if LOOKS_LIKE_A_START.search(field):
            assert (name, field) in PHASE_STARTS or (name, field) in NOT_STARTS, (
                f"{name}.{field}: classify it in PHASE_STARTS or NOT_STARTS and, if it delays "
                "the method's phase, implement MethodConfig.inactive_reason"
            )


@pytest.mark.parametrize(("name", "field"), sorted(PHASE_STARTS))
def test_a_phase_that_never_starts_is_named(name, field):
    """Refused exactly when the phase would first act after the last epoch."""
    epochs = 6
    info = METHODS[name].Config.model_fields[field]
    least = next((m.ge for m in info.metadata if hasattr(m, "ge")), 0)
    for value in range(least, 10):
        reason = config_of(name, **{field: value}).inactive_reason(epochs)
        never = PHASE_STARTS[name, field](value) >= epochs
        assert (reason is not None) == never, (name, field, value, reason)
        if reason is not None:
            assert reason[0] == field and "train.epochs" in reason[1]


@pytest.mark.parametrize("name", sorted(set(METHODS) - {n for n, _ in PHASE_STARTS}))
def test_methods_without_a_start_field_act_from_the_first_epoch(name):
    assert config_of(name).inactive_reason(1) is None


def test_relearning_without_reinitialisation_is_refused():
    reason = config_of("relearning", reinit_num=0).inactive_reason(50)
    assert reason is not None and reason[0] == "reinit_num"


def test_imml_without_its_choice_is_refused():
    cls = PLUGINS["imml"].Config
    reason = cls(name="imml", warmup_epochs=3).inactive_reason(3)
    assert reason is not None and reason[0] == "warmup_epochs"
    assert cls(name="imml", warmup_epochs=2).inactive_reason(3) is None
    assert cls(name="imml", warmup_epochs=5, predominant="a").inactive_reason(3) is None


@pytest.mark.parametrize("name", ["mmcooperation_sample", "cmob"])
def test_warmup_of_train_epochs_is_a_recipe_problem(name, uci_dir, tmp_path):
    with pytest.raises(UserError, match=r"method\.warmup: .* 2-epoch run \(train\.epochs\)"):
        quick_recipe(name, uci_dir, tmp_path, epochs=2, changes={"method": {"warmup": 2}})
    recipe = quick_recipe(name, uci_dir, tmp_path, epochs=2, changes={"method": {"warmup": 1}})
    path = tmp_path / "recipe.yaml"
    path.write_text(recipe.model_dump_json())
    for args in (["recipe", "validate", str(path)], ["train", "--recipe", str(path), "--dry-run"]):
        result = runner.invoke(app, [*args, "--set", "method.warmup=3"])
        assert result.exit_code == 2 and "method.warmup" in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_the_last_accepted_warmup_trains_otherwise_than_concat(uci_dir, tmp_path: Path):
    """The boundary is where the method starts to act: warmup = epochs - 1 (accepted) changes
    the last epoch, so the refusal of warmup = epochs refuses exactly the runs equal to concat."""
    epochs = 2
    sample = quick_recipe(
        "mmcooperation_sample", uci_dir, tmp_path, epochs=epochs, changes={"method": {"warmup": 1}}
    )
    concat = quick_recipe(
        "concat", uci_dir, tmp_path, epochs=epochs, changes={"data": sample.data.model_dump()}
    )
    a = timeless_metrics(trained(sample)[0].run_dir)
    b = timeless_metrics(trained(concat)[0].run_dir)
    assert a["train_loss"].iloc[0] == b["train_loss"].iloc[0]  # the warm-up epoch: plain
    assert a["train_loss"].iloc[1] != b["train_loss"].iloc[1]
