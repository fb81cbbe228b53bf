"""Fusions as plug-ins: the tagged `model.fusion` (shorthand, the method's own by default, the old
flat `fusion_*` layout), the recipe problems derived from what methods need and fusions offer,
and methods and fusions registered at run time."""

from __future__ import annotations

import json
from typing import ClassVar, Literal

import pytest
import torch
import torch.nn.functional as F
from mmval.cli.main import app
from pydantic import Field
from torch import nn
from typer.testing import CliRunner

from mmval.data.shards import ModalitySpec
from mmval.errors import UserError
from mmval.methods import METHODS, Method, MethodConfig, register_method
from mmval.models import ModelConfig, build_model
from mmval.models.fusions import FUSIONS, FusionConfig, build_fusion, register_fusion
from mmval.models.fusions.cosine import CosineFusionConfig
from mmval.models.fusions.heads import SumFusion
from mmval.models.fusions.shared import SharedFusionConfig
from mmval.recipe import Recipe, load_recipe, parse_recipe, recipe_json_schema
from mmval.runner import Trainer
from mmval.sweep import plan_from_raw

# every flat field a dump of the old layout holds, at its old default
OLD_DEFAULTS = {
    "fusion_hidden": 128,
    "fusion_scale": 10.0,
    "fusion_inference": "dynamic",
    "fusion_weights": None,
    "fusion_predominant": None,
    "fusion_bank_size": 4096,
}
ENCODER = {"kind": "mlp", "hidden": [8], "out_dim": 4, "dropout": 0.0}
# (old flat settings, the same in the new layout)
LAYOUTS = [
    ({"fusion": "concat"}, {"name": "concat"}),
    ({"fusion": "gated", "fusion_hidden": 16}, {"name": "gated", "hidden": 16}),
    ({"fusion": "cosine", "fusion_scale": 15.0}, {"name": "cosine", "scale": 15.0}),
    (
        {"fusion": "shared", "fusion_inference": "fixed", "fusion_weights": {"a": 0.3, "b": 0.7}},
        {"name": "shared", "inference": "fixed", "weights": {"a": 0.3, "b": 0.7}},
    ),
]
runner = CliRunner()


def _specs(names: str = "ab") -> list[ModalitySpec]:
    return [ModalitySpec(name=m, dtype="float32", shape=[3]) for m in names]


def _weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build_model(config, _specs(), 3).state_dict()


@pytest.mark.parametrize(("old", "new"), LAYOUTS, ids=[new["name"] for _, new in LAYOUTS])
def test_an_old_flat_dump_builds_the_model_of_the_new_layout(old, new):
    legacy = ModelConfig.model_validate({"encoder": ENCODER, **OLD_DEFAULTS, **old, "mmtm": None})
    nested = ModelConfig.model_validate({"encoder": ENCODER, "fusion": new})
    assert legacy == nested and legacy.flat_problems() == []
    assert legacy.model_dump(mode="json")["fusion"] == nested.fusion.model_dump(mode="json")
    old_weights, new_weights = _weights(legacy), _weights(nested)
    assert old_weights.keys() == new_weights.keys()  # old checkpoints load
    assert all(torch.equal(old_weights[k], new_weights[k]) for k in old_weights)


def test_an_old_run_dump_matches_the_recipe_that_made_it(recipe_file):
    recipe = load_recipe(recipe_file(model__fusion="cosine", model__fusion_scale=12.0))
    assert recipe.model.fusion == CosineFusionConfig(scale=12.0)
    stored = recipe.model_dump(mode="json")
    stored["model"] = {**stored["model"], **OLD_DEFAULTS, "fusion": "cosine", "fusion_scale": 12.0}
    assert Recipe.model_validate(stored) == recipe  # as summary.json and checkpoints held it
    new = load_recipe(recipe_file(model__fusion={"name": "cosine", "scale": 12.0}))
    assert new == recipe and new.settings_hash() == recipe.settings_hash()


def test_shorthand_and_the_methods_own_fusion(recipe_file):
    assert load_recipe(recipe_file(model__fusion="sum")).model.fusion == FUSIONS["sum"]()
    own = {"concat": "concat", "mmcosine": "cosine", "greedy": "late", "mla": "shared"}
    for method, fusion in own.items():
        changes = {"model__mmtm": {}} if method == "greedy" else {}
        recipe = load_recipe(
            recipe_file(method={"name": method}, **changes, data__modalities=["a", "b"])
        )
        assert recipe.model.fusion == FUSIONS[fusion](), method
    # with the settings it is defined with
    recipe = load_recipe(recipe_file(method={"name": "reconboost"}))
    assert recipe.model.fusion == SharedFusionConfig(inference="fixed")
    recipe = load_recipe(recipe_file(method={"name": "reconboost"}, model__fusion_weights=None))
    assert recipe.model.fusion == SharedFusionConfig(inference="fixed")
    with pytest.raises(UserError, match="reconboost needs fused logits"):  # flat ones win
        load_recipe(recipe_file(method={"name": "reconboost"}, model__fusion_inference="dynamic"))
    # a mapping without a name, and the old flat fields, are the method's fusion's settings
    for model in ({"fusion": {"scale": 15.0}}, {"fusion_scale": 15.0}):
        recipe = load_recipe(recipe_file(method={"name": "mmcosine"}, model=model))
        assert recipe.model.fusion == CosineFusionConfig(scale=15.0)


@pytest.mark.parametrize(
    ("method", "changes", "expected"),
    [
        ({"name": "ogm_ge"}, {"model__fusion": "film"}, "ogm_ge needs per-modality logits"),
        ({"name": "amco"}, {"model__fusion": "late"}, "are the sum of per-modality logits"),
        ({"name": "mmcosine"}, {"model__fusion": "sum"}, "set model.fusion: cosine (got sum)"),
        ({"name": "ogm_ge"}, {"data__modalities": ["a"]}, "ogm_ge needs at least two"),
        (
            {"name": "greedy"},
            {"model__mmtm": {}, "data__modalities": ["a", "b", "c"]},
            "data.modalities: greedy needs exactly two modalities (got 3)",
        ),
        (
            {"name": "unimodal", "modality": "a"},
            {"model__fusion": "gated", "data__modalities": ["a", "b"]},
            "gated fusion takes exactly two modalities and the model is built on 1 (a)",
        ),
        (
            {"name": "concat"},
            {"model__fusion": "film", "data__modalities": ["a", "b", "c"]},
            "film fusion takes exactly two",
        ),
    ],
)
def test_problems_come_from_needs_and_capabilities(recipe_file, method, changes, expected):
    with pytest.raises(UserError) as caught:
        load_recipe(recipe_file(method=method, **changes))
    assert expected in str(caught.value)


def test_the_alternatives_named_meet_the_methods_needs(recipe_file):
    with pytest.raises(UserError) as caught:
        load_recipe(recipe_file(method={"name": "ogm_ge"}, model__fusion="film"))
    assert "(use concat, sum, weighted, late, cosine, shared, qmf or tmc)" in str(caught.value)
    with pytest.raises(UserError) as caught:
        load_recipe(recipe_file(method={"name": "amco"}, model__fusion="tmc"))
    assert "(use concat, sum, weighted or cosine)" in str(caught.value)


def test_every_method_trains_its_own_fusion():
    for name, cls in METHODS.items():
        assert cls.Config.lacks(FUSIONS[cls.Config.fusion]) is None, name


def test_old_dumps_with_the_retired_imml_fusion_settings_load_and_a_set_one_is_named(
    recipe_file,
):
    old = {"encoder": ENCODER, **OLD_DEFAULTS, "fusion": "concat", "mmtm": None}
    config = ModelConfig.model_validate(old)
    assert config.flat_problems() == [] and config.fusion.name == "concat"
    with pytest.raises(
        UserError,
        match=r"- model\.fusion_predominant: a setting of the imml "
        r"fusion, which is now the imml plug-in",
    ):
        load_recipe(recipe_file(model__fusion="concat", model__fusion_predominant="a"))


def test_flat_fields_that_do_not_apply_and_bad_values_name_their_field(recipe_file):
    with pytest.raises(UserError, match=r"- model\.fusion_scale: a setting of the cosine"):
        load_recipe(recipe_file(model__fusion="concat", model__fusion_scale=20.0))
    # at its old default it is what old dumps hold: dropped
    assert load_recipe(recipe_file(model__fusion="concat", model__fusion_scale=10.0))
    with pytest.raises(UserError, match=r"- model\.fusion_scale: Input should be greater"):
        load_recipe(recipe_file(model__fusion="cosine", model__fusion_scale=-1))
    with pytest.raises(UserError, match=r"- model\.fusion\.scale: Input should be greater"):
        load_recipe(recipe_file(model__fusion={"name": "cosine", "scale": -1}))
    with pytest.raises(UserError, match=r"- model\.fusion\.hidden: Extra inputs"):
        load_recipe(recipe_file(model__fusion={"name": "cosine", "hidden": 3}))


def test_unknown_names_list_the_registered_ones(recipe_file):
    with pytest.raises(UserError) as caught:
        load_recipe(recipe_file(model__fusion="attention"))
    assert "- model.fusion: Input should be 'concat', 'sum'," in str(caught.value)
    assert "'qmf' or 'tmc' (got 'attention')" in str(caught.value)
    with pytest.raises(UserError) as caught:
        load_recipe(recipe_file(model__fusion={"name": "attention"}))
    assert "- model.fusion: Input tag 'attention' found using 'name'" in str(caught.value)
    with pytest.raises(UserError) as caught:
        load_recipe(recipe_file(method={"name": "magic"}))
    assert "expected tags: 'concat', 'unimodal', 'ogm_ge'" in str(caught.value)


# ---------------------------------------------------------------- registered at run time


class ScaledConfig(MethodConfig):
    needs_unimodal_logits: ClassVar[bool] = True
    min_modalities: ClassVar[int] = 2
    name: Literal["scaled_ce"] = "scaled_ce"
    factor: float = Field(default=1.0, gt=0, description="loss scale")


class Scaled(Method):
    Config: ClassVar[type[MethodConfig]] = ScaledConfig
    config: ScaledConfig

    def loss(self, model, out, batch, ctx):
        return self.config.factor * F.cross_entropy(out.logits, batch.label)


class MaxFusion(SumFusion):
    """The sum fusion's per-modality heads, the fused logits their element-wise maximum."""

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack(list(self.unimodal_logits(feats).values())).amax(0)


class MaxFusionConfig(FusionConfig):
    name: Literal["max"] = "max"
    decomposable: ClassVar[bool] = True
    max_modalities: ClassVar[int | None] = 3
    sharpness: float = Field(default=1.0, gt=0, description="unused knob, to be dumped")

    def build(self, dims: dict[str, int], num_classes: int) -> nn.Module:
        return MaxFusion(dims, num_classes)


@pytest.fixture
def registered():
    register_method(Scaled)
    register_fusion(MaxFusionConfig)
    yield
    METHODS.pop("scaled_ce")
    FUSIONS.pop("max")


def test_a_registered_method_and_fusion_validate_dump_and_train(registered, recipe_file):
    path = recipe_file(
        method={"name": "scaled_ce", "factor": 2.0},
        model__fusion={"name": "max", "sharpness": 3.0},
        train__epochs=1,
    )
    recipe = load_recipe(path)
    dump = recipe.model_dump(mode="json")
    assert dump["method"] == {"name": "scaled_ce", "factor": 2.0}
    assert dump["model"]["fusion"] == {"name": "max", "sharpness": 3.0}
    assert parse_recipe(dump, "dump") == recipe
    with pytest.raises(UserError, match=r"- method\.factor: Input should be greater"):
        load_recipe(recipe_file(method={"name": "scaled_ce", "factor": 0}))
    with pytest.raises(UserError, match=r"- model\.fusion\.sharpness: Input should be"):
        load_recipe(recipe_file(model__fusion={"name": "max", "sharpness": 0}))
    with pytest.raises(UserError, match="scaled_ce needs per-modality logits"):
        load_recipe(recipe_file(method={"name": "scaled_ce"}, model__fusion="film"))
    with pytest.raises(UserError, match=r"expected tags: .*'scaled_ce'"):
        load_recipe(recipe_file(method={"name": "nope"}))
    with pytest.raises(UserError, match=r"'tmc' or 'max' \(got 'nope'\)"):
        load_recipe(recipe_file(model__fusion="nope"))
    assert build_fusion(recipe.model.fusion, {"a": 4, "b": 4}, 3)  # a fusion on its own
    result = Trainer(recipe, 0).run()
    assert result.summary["method"] == "scaled_ce+max"


def test_registered_ones_appear_in_the_schema_and_in_sweeps(registered, recipe_file):
    schema = json.loads(runner.invoke(app, ["recipe", "schema"]).output)
    assert {"ScaledConfig", "MaxFusionConfig", "ConcatConfig"} <= set(schema["$defs"])
    mapping = schema["$defs"]["ModelConfig"]["properties"]["fusion"]["anyOf"][1]
    assert mapping["discriminator"]["mapping"]["max"] == "#/$defs/MaxFusionConfig"
    assert recipe_json_schema() == schema
    raw = load_recipe(recipe_file()).model_dump(mode="json")
    del raw["method"]
    raw["methods"] = ["concat", {"name": "scaled_ce", "factor": 3.0}]
    plan = plan_from_raw(raw, "sweep")
    assert [v.recipe.method for v in plan.variants][1] == ScaledConfig(factor=3.0)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        register_fusion(type("Other", (CosineFusionConfig,), {}))
    assert register_fusion(SharedFusionConfig) is SharedFusionConfig  # the same one again
