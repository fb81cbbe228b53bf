"""Run identity from field marks: the settings hash, the resume key and its refusal message."""

from __future__ import annotations

import pytest

from mmval import settings
from mmval.recipe import Recipe, load_recipe
from mmval.settings import Effect, marked, normalised, resume_refusal

HOST = {
    "data.root": "moved-data",
    "train.device": "cpu",
    "train.workers": 2,
    "train.prefetch": 4,
    "train.channels_last": True,
    "train.compile": True,
    "train.tensorboard": True,
    "train.tracking": "mlflow",
    "train.tracking_uri": "store",
}


def changed(recipe: Recipe, dotted: str, value: object) -> Recipe:
    dump = recipe.model_dump(mode="json")
    *path, last = dotted.split(".")
    node = dump
    for key in path:
        node = node[key]
    node[last] = value
    return Recipe.model_validate(dump)


def test_marks_decide_hash_and_resume(recipe_file):
    recipe = load_recipe(recipe_file())
    for dotted, value in {**HOST, "name": "other", "output": "elsewhere", "seeds": [3]}.items():
        other = changed(recipe, dotted, value)
        assert other.settings_hash() == recipe.settings_hash(), dotted
        assert resume_refusal(recipe, other) is None, dotted
    for dotted, value in {"train.epochs": 9, "train.nonfinite": "skip"}.items():
        other = changed(recipe, dotted, value)
        assert other.settings_hash() != recipe.settings_hash(), dotted
        assert resume_refusal(recipe, other) is None, dotted
    other = changed(changed(recipe, "optim.lr", 0.5), "train.eval_every", 2)
    assert other.settings_hash() != recipe.settings_hash()
    refusal = resume_refusal(recipe, other) or ""
    assert "differs in optim.lr (was 0.01, now 0.5), train.eval_every (was 1, now 2)" in refusal
    assert "(only data.root, train.epochs," in refusal


def test_free_fields_are_listed_from_the_marks(recipe_file):
    recipe = load_recipe(recipe_file())
    free = marked(recipe, frozenset({Effect.RESUMABLE, Effect.NONE}))
    assert set(free) == {*HOST, "train.epochs", "train.nonfinite", "valuation", "evaluate"}
    assert marked(recipe, frozenset({Effect.RUN})) == ["name", "seeds", "output"]


def test_the_hash_names_its_version(recipe_file, monkeypatch):
    recipe = load_recipe(recipe_file())
    before = recipe.settings_hash()
    monkeypatch.setattr(settings, "SETTINGS_VERSION", settings.SETTINGS_VERSION + 1)
    assert recipe.settings_hash() != before


@pytest.mark.parametrize("dump", [{"name": "x"}, {}])
def test_a_dump_this_version_cannot_read_normalises_to_none(dump):
    assert normalised(Recipe, dump) is None
