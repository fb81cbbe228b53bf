"""Recipes: the typed, validated description of a training run (YAML file + `--set` overrides)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from mmval.compose import compose_recipe
from mmval.data.dataset import FrameAugment
from mmval.data.shards import sha256_json
from mmval.errors import UserError
from mmval.methods import METHODS, MethodConfig, MethodConfigUnion
from mmval.methods.concat import ConcatConfig
from mmval.models import ModelConfig
from mmval.validation import format_problems, problems_of
from mmval.valuation.config import TrainValuationConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SplitNames(_Strict):
    train: str = "train"
    val: str = "val"
    test: str = "test"


class DataConfig(_Strict):
    dataset: str | None = Field(
        default=None, description="built-in data set name, prepared under `root` on first use"
    )
    path: Path | None = Field(default=None, description="a prepared shard directory")
    root: Path = Field(default=Path("data"), description="where built-in data sets are prepared")
    modalities: list[str] | None = Field(
        default=None, min_length=1, description="modalities to use (default: all)"
    )
    splits: SplitNames = Field(default_factory=SplitNames)
    augment: FrameAugment | None = Field(
        default=None, description="training-time RandomResizedCrop + flip of RGB frames"
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of data.dataset (a built-in name) or data.path")
        return self

    @field_validator("modalities")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("modalities must not repeat")
        return value

    def directory(self) -> Path:
        return self.path if self.path is not None else self.root / str(self.dataset)


class StepSchedule(_Strict):
    name: Literal["step"] = "step"
    step_size: int = Field(ge=1, description="epochs between decays")
    gamma: float = Field(default=0.1, gt=0, le=1)


class CosineSchedule(_Strict):
    name: Literal["cosine"] = "cosine"
    min_lr: float = Field(default=0.0, ge=0)


class ConstantSchedule(_Strict):
    name: Literal["none"] = "none"


Schedule = Annotated[StepSchedule | CosineSchedule | ConstantSchedule, Field(discriminator="name")]


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(default=1e-4, ge=0)
    scheduler: Schedule = Field(default_factory=ConstantSchedule)


class TrainConfig(_Strict):
    epochs: int = Field(ge=1)
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int = Field(default=512, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: autocast")
    workers: int = Field(default=0, ge=0, description="DataLoader worker processes")
    prefetch: int = Field(
        default=2, ge=1, description="batches each DataLoader worker loads ahead (workers > 0)"
    )
    channels_last: bool = Field(
        default=False,
        description="channels-last memory format for the 4-D maps of resnet18 encoders (faster "
        "convolutions on tensor-core GPUs, with bf16 especially)",
    )
    compile: bool = Field(
        default=False,
        description="torch.compile each encoder (first steps slower while compiling; needs a C++ "
        "compiler on the CPU)",
    )
    eval_every: int = Field(default=1, ge=1, description="epochs between evaluations")
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between last.pt saves")
    tensorboard: bool = Field(
        default=False, description="also write per-epoch scalars as TensorBoard events in tb/"
    )
    nonfinite: Literal["stop", "skip"] = Field(
        default="stop",
        description="a NaN or infinite loss or gradient: stop the run (last.pt keeps the last "
        "good state) or skip that step (counted per epoch in metrics, as skipped_steps)",
    )

    @model_serializer(mode="wrap")
    def _omit_tensorboard_off(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Off (and nonfinite at stop, the loader and speed settings at their defaults), it
        dumps as before those fields existed, so finished runs still match their summary.json
        (and are skipped) and resume."""
        dump = handler(self)
        for name, default in HOST_DEFAULTS.items():
            if getattr(self, name) == default:
                dump.pop(name, None)
        if self.nonfinite == "stop":
            dump.pop("nonfinite", None)
        return dump


# Settings that change how fast a run goes, not what it computes (beyond floating-point
# rounding): left out of the settings hash and free to change on resume, and dumped only when
# they differ from these defaults.
HOST_DEFAULTS: dict[str, Any] = {
    "tensorboard": False,
    "prefetch": 2,
    "channels_last": False,
    "compile": False,
}


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.{}\-]*$"
SWEEP_KEYS = ("methods", "grid")


class Recipe(_Strict):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="run folder name; may use {dotted.field} placeholders",
    )
    seeds: list[int] = Field(min_length=1)
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfigUnion = Field(default_factory=ConcatConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    output: Path = Field(default=Path("runs"), description="runs go to output/name/seed<k>")
    valuation: TrainValuationConfig | None = Field(
        default=None,
        description="write per-sample modality contributions to contrib_epoch<k>.parquet",
    )

    @model_serializer(mode="wrap")
    def _omit_unset_valuation(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A recipe without valuation dumps as before it existed, so finished runs still match
        their summary.json and resume."""
        dump = handler(self)
        if self.valuation is None:
            dump.pop("valuation", None)
        return dump

    @model_validator(mode="before")
    @classmethod
    def _method_fusion(cls, data: Any) -> Any:
        """A model without `fusion` gets the method's own fusion, the one it is defined with; a
        fusion mapping without `name` gives settings of that fusion."""
        if not isinstance(data, dict):
            return data
        method = data.get("method", ConcatConfig())
        if isinstance(method, dict) and method.get("name") in METHODS:
            config = METHODS[method["name"]].Config
        elif isinstance(method, MethodConfig):
            config = type(method)
        else:
            return data  # the method is invalid, and named so
        own = {"name": config.fusion, **config.fusion_settings}
        model = data.get("model", {})
        if isinstance(model, ModelConfig) and model.fusion is None:
            model = model.model_dump(exclude={"fusion"})
        if not isinstance(model, dict):
            return data
        fusion = model.get("fusion")
        if fusion is None:
            model = {**model, "fusion": own}
        elif isinstance(fusion, dict) and "name" not in fusion:
            model = {**model, "fusion": {**own, **fusion}}
        return {**data, "model": model}

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        return value

    def for_seed(self, seed: int) -> Recipe:
        return self.model_copy(update={"seeds": [seed]})

    def settings_hash(self) -> str:
        """Identifies the experimental setting: seeds, name, output, valuation (which does not
        change training) and host details excluded."""
        dump = self.model_dump(mode="json", exclude={"seeds", "name", "output", "valuation"})
        dump["model"] = self.model.flat_dump()  # the layout the hashes of earlier runs read
        dump["train"].pop("device")
        dump["train"].pop("workers")
        for name in HOST_DEFAULTS:
            dump["train"].pop(name, None)
        return sha256_json(dump)[:12]


def _cross_checks(recipe: Recipe) -> list[tuple[str, str]]:
    modalities = recipe.data.modalities
    found = recipe.method.recipe_problems(recipe.model, modalities)
    found += recipe.model.flat_problems()
    if modalities is not None:
        for name in recipe.model.encoders:
            if name not in modalities:
                found.append((f"model.encoders.{name}", "not one of data.modalities"))
    return found


def check_against_data(recipe: Recipe, modalities: list[str]) -> None:
    """Re-run the cross-checks once the data set has named the modalities a recipe without
    `data.modalities` trains on (a two-modality method on six views fails here, not silently)."""
    if recipe.data.modalities is not None:
        return
    data = recipe.data.model_copy(update={"modalities": modalities})
    found = _cross_checks(recipe.model_copy(update={"data": data}))
    if found:
        where = f"recipe {recipe.name} on data with modalities {', '.join(modalities)}"
        raise UserError(format_problems(found, where))


def current_dump(stored: Any) -> Any:
    """A recipe dump written by an earlier mmval (summary.json, checkpoints: flat `fusion_*`
    fields) in today's layout, to compare with a recipe's `model_dump(mode="json")`; a dump that
    no longer validates comes back unchanged (and so differs)."""
    try:
        return Recipe.model_validate(stored).model_dump(mode="json")
    except ValidationError:
        return stored


def _fill_placeholders(raw: dict) -> dict:
    """Expand `{dotted.path}` in the name from the (raw) recipe itself."""

    def lookup(match: re.Match[str]) -> str:
        node: Any = raw
        for key in match.group(1).split("."):
            if not isinstance(node, dict) or key not in node:
                raise UserError(f"name: placeholder {{{match.group(1)}}} names no recipe field.")
            node = node[key]
        return str(node)

    if isinstance(raw.get("name"), str):
        raw = {**raw, "name": re.sub(r"\{([A-Za-z0-9_.]+)\}", lookup, raw["name"])}
    return raw


def parse_recipe(raw: Any, where: str) -> Recipe:
    if not isinstance(raw, dict):
        raise UserError(f"{where} must be a YAML mapping (name:, seeds:, data:, ...).")
    sweep_keys = [key for key in SWEEP_KEYS if key in raw]
    if sweep_keys:
        raise UserError(
            f"recipe {where} is a sweep ({', '.join(sweep_keys)}); `mmval train --recipe` runs "
            "it, and `mmval train --recipe FILE --dry-run` checks it and lists its runs."
        )
    raw = _fill_placeholders(raw)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_problems(problems_of(exc, raw), f"recipe {where}")) from None
    found = _cross_checks(recipe)
    if found:
        raise UserError(format_problems(found, f"recipe {where}"))
    return recipe


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe file, its bases composed (mmval.compose) and `--set` applied, validated."""
    return parse_recipe(compose_recipe(path, overrides), str(path))


def recipe_json_schema() -> dict:
    return Recipe.model_json_schema()
