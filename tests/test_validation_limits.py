"""Values that used to pass validation and crash (or hang) later: seeds outside [0, 2^32) or
given as booleans, very long run names, non-finite learning rates and other floats, YAML alias
bombs and deep nesting. Each is refused by validation (exit 2 naming the field), quickly."""

from __future__ import annotations

import time

import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.errors import UserError
from mmval.recipe import load_recipe, parse_recipe
from mmval.validation import shown

runner = CliRunner()

REFUSED = [
    ("seeds=[-1]", "seeds[0]"),
    ("seeds=[0, 4294967296]", "seeds[1]"),
    ("seeds=[true]", "seeds[0]"),
    ("seeds=[1.0]", "seeds[0]"),
    ("name=" + "a" * 300, "name"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.lr=.nan", "optim.lr"),
    ("optim.weight_decay=.inf", "optim.weight_decay"),
    ("train.epochs=true", "train.epochs"),
    ("optim.lr=true", "optim.lr"),
]


@pytest.mark.parametrize(("assignment", "field"), REFUSED)
def test_values_that_crashed_later_are_refused_before_training(
    recipe_file, tmp_path, assignment, field
):
    result = runner.invoke(app, ["train", "--recipe", str(recipe_file()), "--set", assignment])
    assert result.exit_code == 2, result.output
    assert f"- {field}:" in result.output and "Traceback" not in result.output
    assert len(result.output) < 1000  # the 300-character name is cut
    assert not (tmp_path / "runs").exists()


def test_non_finite_floats_of_method_and_model_settings_are_refused(recipe_file):
    path = recipe_file(method={"name": "ogm_ge"})
    with pytest.raises(UserError, match=r"- method\.alpha: .*finite"):
        load_recipe(path, ["method.alpha=.inf"])
    with pytest.raises(UserError, match=r"- method\.alpha: .*finite"):
        load_recipe(path, ["method.alpha=1e400"])  # YAML reads a string; as a float it is inf
    assert load_recipe(path, ["method.alpha=0.5"]).method.alpha == 0.5


def test_the_largest_seed_and_a_100_character_name_train(recipe_file, tmp_path):
    name = "n" * 100
    overrides = ["seeds=[4294967295]", f"name={name}", "train.epochs=1"]
    result = runner.invoke(
        app,
        [
            "train",
            "--recipe",
            str(recipe_file()),
            *(part for o in overrides for part in ("--set", o)),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / name / "seed4294967295" / "best.pt").is_file()


def alias_bomb(levels: int = 9) -> str:
    """The 'billion laughs' in YAML flow style: 9 levels of 9 aliases, 9^9 leaves, 600 bytes."""
    items = ["&l0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        items.append(f"&l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "[" + ", ".join(items) + "]"


def test_a_yaml_alias_bomb_in_set_is_refused_at_once(recipe_file):
    bomb = alias_bomb()
    assert len(bomb) < 700
    started = time.perf_counter()
    result = runner.invoke(
        app, ["recipe", "validate", str(recipe_file()), "--set", f"seeds={bomb}"]
    )
    assert time.perf_counter() - started < 5
    assert result.exit_code == 2, result.output
    assert "alias" in result.output and "seeds" in result.output
    assert len(result.output) < 2000


def test_yaml_aliases_in_recipe_files_are_refused(recipe_file, tmp_path):
    text = recipe_file().read_text()
    path = tmp_path / "aliased.yaml"
    path.write_text(text + "evaluate: &shared {repeats: 2}\nvaluation: *shared\n")
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "aliased.yaml" in result.output and "alias" in result.output
    base = tmp_path / "base.yaml"
    base.write_text("train: &t {epochs: 1}\nother: *t\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: base.yaml\n{text}")
    with pytest.raises(UserError, match=r"base\.yaml.*alias"):
        load_recipe(child)


def test_deeply_nested_yaml_and_huge_integers_are_refused_not_a_traceback(recipe_file):
    deep = "[" * 5000 + "]" * 5000
    result = runner.invoke(
        app, ["recipe", "validate", str(recipe_file()), "--set", f"seeds={deep}"]
    )
    assert result.exit_code == 2, result.output
    assert "nested" in result.output and len(result.output) < 2000
    huge = "seeds=[" + "1" * 5000 + "]"  # more digits than Python converts to an int
    result = runner.invoke(app, ["recipe", "validate", str(recipe_file()), "--set", huge])
    assert result.exit_code == 2, result.output
    assert "digits" in result.output and len(result.output) < 2000


class Loud:
    """Counts how often its repr is built."""

    calls = 0

    def __repr__(self) -> str:
        Loud.calls += 1
        return "loud"


def test_error_messages_cut_values_before_building_their_repr(recipe_file):
    """A wrong value is shown cut short, and only its first items are ever rendered."""
    Loud.calls = 0
    raw = {"name": [Loud()] * 200_000, "seeds": [0], "data": {"path": "x"}, "train": {"epochs": 1}}
    started = time.perf_counter()
    with pytest.raises(UserError) as caught:
        parse_recipe(raw, "test")
    assert time.perf_counter() - started < 2
    assert Loud.calls < 20
    assert "- name:" in str(caught.value) and len(str(caught.value)) < 500
    nested: list = ["x"]
    for _ in range(60):  # 2^60 leaves, shared: a full repr would never end
        nested = [nested, nested]
    assert len(shown(nested)) <= 60
    assert "..." in shown("y" * 10_000) and len(shown("y" * 10_000)) <= 60
    assert shown(0.5) == "0.5"
