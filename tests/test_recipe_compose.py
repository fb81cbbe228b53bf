"""Composed recipes (`base: [path, ...]`): merge order and rules, `--set` after the bases, and
the user errors of a bad base, through `mmval recipe validate`, `load_recipe` and sweeps."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.compose import compose_recipe, merge
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.sweep import load_plan

runner = CliRunner()


def write(path: Path, raw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def base_file(tmp_path: Path, synthetic_dir: Path) -> Path:
    """A base with everything but the name and the method."""
    return write(
        tmp_path / "bases" / "small.yaml",
        {
            "seeds": [0, 1],
            "data": {"path": str(synthetic_dir), "modalities": ["a", "b"]},
            "model": {"encoder": {"kind": "mlp", "hidden": [16], "out_dim": 8, "dropout": 0.1}},
            "optim": {"name": "adam", "lr": 0.01, "scheduler": {"name": "step", "step_size": 5}},
            "train": {"epochs": 2, "batch_size": 32},
            "output": str(tmp_path / "runs"),
        },
    )


def test_merge_rules():
    base = {
        "a": {"b": 1, "c": [1, 2], "d": {"e": 1}},
        "method": {"name": "ogm_ge", "alpha": 0.5},
        "optim": {"name": "adam", "lr": 0.1, "scheduler": {"name": "step", "step_size": 5}},
        "model": {"encoder": {"kind": "mlp", "hidden": [8]}, "encoders": {"x": {"kind": "mlp"}}},
    }
    over = {
        "a": {"c": [3], "d": {"f": 2}},  # nested merge, list replaced
        "method": {"name": "pmr"},  # another method: the base's alpha must not leak
        "optim": {"name": "sgd", "scheduler": {"name": "none"}},  # optim merges, scheduler not
        "model": {"encoder": {"kind": "resnet18"}, "encoders": {"x": {"kind": "resnet18"}}},
    }
    assert merge(base, over) == {
        "a": {"b": 1, "c": [3], "d": {"e": 1, "f": 2}},
        "method": {"name": "pmr"},
        "optim": {"name": "sgd", "lr": 0.1, "scheduler": {"name": "none"}},
        "model": {"encoder": {"kind": "resnet18"}, "encoders": {"x": {"kind": "resnet18"}}},
    }
    # the same discriminator (or none given) merges
    assert merge(base, {"method": {"name": "ogm_ge", "beta": 1}})["method"] == {
        "name": "ogm_ge",
        "alpha": 0.5,
        "beta": 1,
    }
    assert merge(base, {"method": {"alpha": 0.1}})["method"] == {"name": "ogm_ge", "alpha": 0.1}
    fused = {"model": {"fusion": {"name": "gated", "hidden": 8}}}
    assert merge(fused, {"model": {"fusion": {"name": "film"}}}) == {
        "model": {"fusion": {"name": "film"}}
    }
    assert merge(fused, {"model": {"fusion": "concat"}}) == {"model": {"fusion": "concat"}}
    assert base["method"] == {"name": "ogm_ge", "alpha": 0.5}, "merge changed its input"


def test_recipe_on_a_base_then_set(tmp_path, base_file):
    path = write(
        tmp_path / "r.yaml",
        {
            "base": "bases/small.yaml",  # a single string, relative to this file
            "name": "r-{method.name}-{train.epochs}",
            "method": {"name": "ogm_ge", "alpha": 0.3},
            "optim": {"scheduler": {"name": "none"}},
            "train": {"epochs": 3},
        },
    )
    recipe = load_recipe(path)
    assert recipe.seeds == [0, 1] and recipe.data.modalities == ["a", "b"]
    assert recipe.model.encoder.hidden == [16] and recipe.optim.lr == 0.01
    assert recipe.optim.scheduler.name == "none"
    assert (recipe.train.epochs, recipe.train.batch_size) == (3, 32)
    assert recipe.name == "r-ogm_ge-3", "placeholders resolve after composition"
    recipe = load_recipe(path, ["train.epochs=4", "optim.lr=0.5", "method.alpha=0.9"])
    assert (recipe.train.epochs, recipe.optim.lr, recipe.method.alpha) == (4, 0.5, 0.9)
    assert recipe.name == "r-ogm_ge-4"
    assert "base" not in compose_recipe(path)
    result = runner.invoke(app, ["recipe", "validate", str(path), "--set", "seeds=[7]"])
    assert result.exit_code == 0, result.output
    assert "base:" not in result.output and "- 7" in result.output


def test_chain_and_order_of_bases(tmp_path, base_file):
    write(tmp_path / "bases" / "long.yaml", {"base": ["small.yaml"], "train": {"epochs": 9}})
    write(tmp_path / "bases" / "sgd.yaml", {"optim": {"name": "sgd", "lr": 0.2}})
    write(tmp_path / "bases" / "slow.yaml", {"optim": {"lr": 0.001}, "train": {"epochs": 5}})
    path = write(
        tmp_path / "r.yaml",
        {
            "base": ["bases/long.yaml", "bases/sgd.yaml", "bases/slow.yaml"],
            "name": "r",
            "train": {"batch_size": 8},
        },
    )
    recipe = load_recipe(path)
    assert recipe.optim.name == "sgd" and recipe.optim.lr == 0.001  # later bases win
    assert recipe.optim.scheduler.name == "step"  # from the first base's base
    assert (recipe.train.epochs, recipe.train.batch_size) == (5, 8)
    path = write(tmp_path / "r.yaml", {"base": ["bases/slow.yaml", "bases/long.yaml"], "name": "r"})
    assert load_recipe(path).train.epochs == 9


def test_a_sweep_composes_its_base(tmp_path, base_file):
    path = write(
        tmp_path / "sweep.yaml",
        {"base": ["bases/small.yaml"], "name": "s", "methods": ["concat", "ogm_ge"]},
    )
    plan = load_plan(path, ["seeds=[0]"])
    assert [v.label for v in plan.variants] == ["concat", "ogm_ge"]
    assert all(v.recipe.model.encoder.hidden == [16] for v in plan.variants)
    assert len(plan.runs()) == 2


def expect_user_error(path: Path, *phrases: str) -> None:
    """Exit 2 from the CLI, one paragraph naming the files, as load_recipe raises it."""
    result = runner.invoke(app, ["recipe", "validate", str(path)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    with pytest.raises(UserError) as caught:
        load_recipe(path)
    for phrase in phrases:
        assert phrase in str(caught.value), str(caught.value)


def test_missing_base(tmp_path):
    path = write(tmp_path / "r.yaml", {"base": ["nowhere.yaml"], "name": "r"})
    expect_user_error(path, "nowhere.yaml", "r.yaml", "does not exist")


def test_base_cycle(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml", "seeds": [0]})
    write(tmp_path / "b.yaml", {"base": ["a.yaml"]})
    path = write(tmp_path / "r.yaml", {"base": "a.yaml", "name": "r"})
    expect_user_error(path, "cycle", "r.yaml", "a.yaml", "b.yaml")
    write(tmp_path / "self.yaml", {"base": "self.yaml", "name": "r"})
    expect_user_error(tmp_path / "self.yaml", "cycle", "self.yaml")


def test_base_that_is_not_a_mapping(tmp_path):
    write(tmp_path / "list.yaml", [1, 2])
    path = write(tmp_path / "r.yaml", {"base": "list.yaml", "name": "r"})
    expect_user_error(path, "list.yaml", "r.yaml", "mapping")
    (tmp_path / "broken.yaml").write_text("seeds: [unclosed\n")
    path = write(tmp_path / "r.yaml", {"base": "broken.yaml", "name": "r"})
    expect_user_error(path, "broken.yaml", "r.yaml", "not valid YAML")
    path = write(tmp_path / "r.yaml", {"base": {"file": "x.yaml"}, "name": "r"})
    expect_user_error(path, "r.yaml", "base must be a file name or a list of file names")


def test_diamond_is_not_a_cycle(tmp_path, base_file):
    write(tmp_path / "bases" / "left.yaml", {"base": "small.yaml", "train": {"epochs": 4}})
    write(tmp_path / "bases" / "right.yaml", {"base": "small.yaml", "seeds": [3]})
    path = write(
        tmp_path / "r.yaml", {"base": ["bases/left.yaml", "bases/right.yaml"], "name": "r"}
    )
    recipe = load_recipe(path)
    # right.yaml brings small.yaml's epochs back over left.yaml's: bases merge whole, in order
    assert recipe.seeds == [3] and recipe.train.epochs == 2


def test_packaged_recipes_find_their_bases(tmp_path):
    """The quickstart reads its recipes from the installed package (mmval.recipes), whose
    base/ folder must come along."""
    from importlib import resources

    from mmval.quickstart import quickstart_recipes

    assert (resources.files("mmval.recipes") / "base" / "uci-mfeat.yaml").is_file()
    recipes = quickstart_recipes(tmp_path)
    assert [r.name for r in recipes[:3]] == [
        "concat-uci-mfeat",
        "ogm_ge-uci-mfeat",
        "unimodal-fou-uci-mfeat",
    ]
    for recipe in recipes:
        assert recipe.data.dataset == "uci-mfeat" and recipe.data.root == tmp_path / "data"
        assert recipe.model.encoder.hidden == [256] and recipe.train.epochs == 20


def test_environment_variables_in_a_recipe(tmp_path, monkeypatch):
    """`${NAME}` is read from the environment after --set; an unset one is a user error naming
    the field, and a field given with --set needs no variable."""
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: env\nseeds: [0]\ndata: {path: data/x}\ntrain: {epochs: 1}\n"
        "model: {encoder: {kind: resnet18, pretrained: '${MMVAL_TEST_WEIGHTS}/r18.pth'}}\n"
    )
    monkeypatch.delenv("MMVAL_TEST_WEIGHTS", raising=False)
    with pytest.raises(
        UserError, match=r"model\.encoder\.pretrained names the environment variable"
    ):
        load_recipe(path)
    given = load_recipe(path, ["model.encoder.pretrained=/w/r18.pth"])
    assert str(given.model.encoder.pretrained) == "/w/r18.pth"
    monkeypatch.setenv("MMVAL_TEST_WEIGHTS", "/models")
    assert str(load_recipe(path).model.encoder.pretrained) == "/models/r18.pth"
