"""Recipe validation: every bad recipe exits 2 and names the bad field."""

from __future__ import annotations

import json

import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.errors import UserError
from mmval.recipe import load_recipe
from tests.conftest import DELETE

runner = CliRunner()


def validate(path, *extra: str):
    return runner.invoke(app, ["recipe", "validate", str(path), *extra])


BAD_RECIPES = [
    ({"optim__lr": -0.1}, "optim.lr"),
    ({"optim__lr": "fast"}, "optim.lr"),
    ({"train__epochs": 0}, "train.epochs"),
    ({"train__epochs": DELETE}, "train.epochs"),
    ({"seeds": []}, "seeds"),
    ({"seeds": [1, 1]}, "seeds"),
    ({"method": {"name": "magic"}}, "method"),
    ({"method": {"name": "ogm_ge", "alpha": 0}}, "method.alpha"),
    ({"method": {"name": "ogm_ge", "alhpa": 0.1}}, "method.alhpa"),
    ({"model__fusion": "attention"}, "model.fusion"),
    ({"train__device": "tpu"}, "train.device"),
    ({"optim__name": "lamb"}, "optim.name"),
    ({"optim__scheduler": {"name": "step"}}, "optim.scheduler.step_size"),
    ({"data__dataset": "uci-mfeat"}, "data"),
    ({"learning_rate": 0.1}, "learning_rate"),
    ({"model__encoder__dropout": 1.5}, "model.encoder.dropout"),
    ({"data__modalities": ["a", "b", "c"], "model__fusion": "film"}, "model.fusion"),
    (
        {"method": {"name": "unimodal", "modality": "z"}, "data__modalities": ["a"]},
        "method.modality",
    ),
    ({"method": {"name": "unimodal"}}, "method.modality"),
    (
        {"method": {"name": "ogm_ge"}, "model__fusion": "gated", "data__modalities": ["a", "b"]},
        "model.fusion",
    ),
    ({"name": "bad name/with slash"}, "name"),
]


@pytest.mark.parametrize(("changes", "field"), BAD_RECIPES)
def test_bad_recipe_exits_2_naming_the_field(recipe_file, changes, field):
    result = validate(recipe_file(**changes))
    assert result.exit_code == 2, result.output
    assert f"- {field}:" in result.output
    assert "Traceback" not in result.output


def test_good_recipe_validates(recipe_file):
    result = validate(recipe_file())
    assert result.exit_code == 0, result.output
    assert "valid" in result.output


def test_yaml_syntax_error_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    assert validate(bad).exit_code == 2
    result = validate(tmp_path / "absent.yaml")
    assert result.exit_code == 2 and "does not exist" in result.output


def test_overrides_are_validated_like_the_file(recipe_file):
    path = recipe_file()
    recipe = load_recipe(
        path, ["train.epochs=7", "seeds=[3, 4]", "method.name=ogm_ge", "method.alpha=0.5"]
    )
    assert recipe.train.epochs == 7 and recipe.seeds == [3, 4]
    assert recipe.method.name == "ogm_ge" and recipe.method.alpha == 0.5
    result = validate(path, "--set", "method.name=ogm_ge", "--set", "method.alpha=abc")
    assert result.exit_code == 2 and "method.alpha" in result.output
    result = validate(path, "--set", "train.epochs")
    assert result.exit_code == 2 and "dotted.path=value" in result.output
    with pytest.raises(UserError, match="not an item of the list"):
        load_recipe(path, ["seeds.first=1"])
    with pytest.raises(UserError, match="not a section"):
        load_recipe(path, ["name.first=1"])
    assert load_recipe(path, ["seeds.0=9"]).seeds == [9]


def test_name_placeholders(recipe_file):
    path = recipe_file(name="uni-{method.modality}", method={"name": "unimodal", "modality": "b"})
    assert load_recipe(path).name == "uni-b"
    with pytest.raises(UserError, match="placeholder"):
        load_recipe(recipe_file(name="x-{method.nothing}"))


def test_schema_is_json_with_method_union():
    result = runner.invoke(app, ["recipe", "schema"])
    assert result.exit_code == 0
    schema = json.loads(result.output)
    assert "method" in schema["properties"]
    assert {"ConcatConfig", "OGMGEConfig", "UnimodalConfig"} <= set(schema["$defs"])
