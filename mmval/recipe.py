"""Recipes: the typed, validated description of a training run (YAML file + `--set` overrides)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from itertools import pairwise
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mmval.compose import compose_recipe
from mmval.data.augment import FrameAugment
from mmval.data.corrupt import Corruption
from mmval.data.manifest import is_manifest_file
from mmval.errors import UserError
from mmval.methods import METHODS, MethodConfig, MethodConfigUnion
from mmval.methods.concat import ConcatConfig
from mmval.methods.plugged import plugin_problems
from mmval.models import ModelConfig
from mmval.plugins import PLUGINS, PluginField
from mmval.settings import ADDED_LATER, Effect, settings_hash
from mmval.tasks import TaskField
from mmval.validation import format_problems, problems_of
from mmval.valuation.config import TrainValuationConfig
from mmval.valuation.evaluate import EvaluateConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class SplitNames(_Strict):
    train: str = "train"
    val: str = "val"
    test: str = "test"


class DataConfig(_Strict):
    dataset: str | None = Field(
        default=None,
        description="built-in data set name (or a data set manifest file), prepared under "
        "`root` on first use",
    )
    path: Path | None = Field(default=None, description="a prepared shard directory")
    # where, not what: a moved data folder keeps its runs resumable (the manifest's fingerprint,
    # stored in every checkpoint, says what the data is)
    root: Annotated[Path, Effect.NONE] = Field(
        default=Path("data"), description="where built-in data sets are prepared"
    )
    modalities: list[str] | None = Field(
        default=None, min_length=1, description="modalities to use (default: all)"
    )
    splits: SplitNames = Field(default_factory=SplitNames)
    augment: FrameAugment | None = Field(
        default=None, description="training-time RandomResizedCrop + flip of RGB frames"
    )
    corrupt: Annotated[list[str], ADDED_LATER] = Field(
        default_factory=list,
        description="training-time corruptions MODALITY=KIND:LEVEL (as `mmval value "
        "--corrupt`: gaussian, salt-pepper, mask, blank), drawn anew per epoch and sample: "
        "robust training as augmentation (the papers train on clean data)",
    )

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if (self.dataset is None) == (self.path is None):
            raise ValueError("give exactly one of data.dataset (a built-in name) or data.path")
        return self

    @field_validator("corrupt")
    @classmethod
    def _corruptions(cls, value: list[str]) -> list[str]:
        for spec in value:
            try:
                Corruption.parse(spec)
            except UserError as exc:
                raise ValueError(str(exc).replace("--corrupt", "data.corrupt")) from None
        return value

    def corruptions(self) -> list[Corruption]:
        return [Corruption.parse(spec) for spec in self.corrupt]

    @field_validator("modalities")
    @classmethod
    def _unique(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("modalities must not repeat")
        return value

    def directory(self) -> Path:
        """data.path, or where the data set is prepared under data.root (a manifest file's
        data set under its file name without the suffix)."""
        if self.path is not None:
            return self.path
        name = str(self.dataset)
        return self.root / (Path(name).stem if is_manifest_file(name) else name)


class StepSchedule(_Strict):
    name: Literal["step"] = "step"
    step_size: int = Field(ge=1, description="epochs between decays")
    gamma: float = Field(default=0.1, gt=0, le=1)


class CosineSchedule(_Strict):
    name: Literal["cosine"] = "cosine"
    min_lr: float = Field(default=0.0, ge=0)


class ConstantSchedule(_Strict):
    name: Literal["none"] = "none"


class MultiStepSchedule(_Strict):
    """torch's MultiStepLR, stepped once per epoch."""

    name: Literal["multistep"] = "multistep"
    milestones: list[int] = Field(
        min_length=1,
        description="epoch counts after which the learning rate is multiplied by gamma "
        "(increasing; [30, 60]: epochs 31 and 61 train at the decayed rates)",
    )
    gamma: float = Field(default=0.1, gt=0, le=1)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if value[0] < 1 or any(b <= a for a, b in pairwise(value)):
            raise ValueError("milestones must be increasing epoch counts from 1")
        return value


class WarmupCosineSchedule(_Strict):
    """A linear warm-up from start_factor x optim.lr to optim.lr (torch's LinearLR) over
    `warmup` epochs or steps, then a cosine to min_lr over the rest of the run
    (CosineAnnealingLR), chained by SequentialLR. With `unit: steps` the whole schedule counts
    training steps (batches) and advances after each; with `epochs`, after each epoch."""

    name: Literal["warmup_cosine"] = "warmup_cosine"
    warmup: int = Field(ge=1, description="length of the warm-up, in `unit`s")
    unit: Literal["epochs", "steps"] = Field(
        default="epochs", description="what warmup counts, and when the schedule advances"
    )
    start_factor: float = Field(
        default=0.01, gt=0, le=1, description="the first epoch's (step's) rate over optim.lr"
    )
    min_lr: float = Field(default=0.0, ge=0, description="the rate the cosine ends at")


class PlateauSchedule(_Strict):
    """torch's ReduceLROnPlateau on the run's selection metric (train.select_on), stepped after
    every evaluation; patience counts evaluations."""

    name: Literal["plateau"] = "plateau"
    mode: Literal["auto", "max", "min"] = Field(
        default="auto", description="auto: max when the selection metric is higher-is-better"
    )
    factor: float = Field(default=0.1, gt=0, lt=1, description="multiplies the rate on a plateau")
    patience: int = Field(default=10, ge=0, description="evaluations without improvement")
    threshold: float = Field(default=1e-4, ge=0, description="the least improvement that counts")
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown: int = Field(default=0, ge=0, description="evaluations to wait after a reduction")
    min_lr: float = Field(default=0.0, ge=0)


class OneCycleSchedule(_Strict):
    """torch's OneCycleLR over the run's training steps (epochs x batches per epoch), advanced
    after every step (batch). A method that re-samples the train split may take more or fewer
    steps per epoch: the schedule then holds its last rate, or ends before its cycle does."""

    name: Literal["onecycle"] = "onecycle"
    max_lr: float | None = Field(default=None, gt=0, description="the peak rate (default optim.lr)")
    pct_start: float = Field(default=0.3, gt=0, lt=1, description="share of steps rising")
    anneal_strategy: Literal["cos", "linear"] = "cos"
    div_factor: float = Field(default=25.0, gt=0, description="max_lr / the first rate")
    final_div_factor: float = Field(default=1e4, gt=0, description="first rate / the last rate")
    three_phase: bool = False
    cycle_momentum: bool = Field(
        default=True, description="cycle SGD momentum (Adam's beta1) inversely to the rate"
    )
    base_momentum: float = Field(default=0.85, ge=0, lt=1)
    max_momentum: float = Field(default=0.95, ge=0, lt=1)


Schedule = Annotated[
    StepSchedule
    | CosineSchedule
    | ConstantSchedule
    | MultiStepSchedule
    | WarmupCosineSchedule
    | PlateauSchedule
    | OneCycleSchedule,
    Field(discriminator="name"),
]


# a module of the model by its attribute path: `encoders.text`, `fusion`, `encoders.visual.trunk.4`
MODULE_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$"


class ParamGroup(_Strict):
    """One optimizer parameter group: the parameters of a module of the model with their own
    learning rate and weight decay (mmval.engine.freeze)."""

    params: str = Field(
        pattern=MODULE_PATH,
        description="the module's dotted path in the model: encoders.<modality>, fusion, or "
        "a path inside one (encoders.text.bert.encoder)",
    )
    lr: float | None = Field(
        default=None, ge=0, description="its learning rate (default optim.lr); 0 keeps it fixed"
    )
    weight_decay: float | None = Field(
        default=None, ge=0, description="its weight decay (default optim.weight_decay)"
    )


class OptimConfig(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(default=1e-3, gt=0)
    momentum: float = Field(default=0.9, ge=0, lt=1, description="SGD only")
    weight_decay: float = Field(default=1e-4, ge=0)
    scheduler: Schedule = Field(default_factory=ConstantSchedule)
    groups: Annotated[list[ParamGroup], ADDED_LATER] = Field(
        default_factory=list,
        description="parameter groups with their own lr / weight_decay: [{params: "
        "encoders.text, lr: 2e-5}, ...]; every other parameter trains with optim.lr and "
        "optim.weight_decay. A parameter may fall in one group only; schedules scale every "
        "group alike, and metrics log each group's rate as lr_<params>",
    )

    @field_validator("groups")
    @classmethod
    def _distinct(cls, groups: list[ParamGroup]) -> list[ParamGroup]:
        paths = [g.params for g in groups]
        twice = sorted({p for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"{', '.join(twice)} named by more than one group")
        return groups


class EarlyStopping(_Strict):
    """Stop when the selection metric has not improved by more than min_delta for `patience`
    evaluations in a row."""

    patience: int = Field(ge=1, description="evaluations without improvement before stopping")
    min_delta: float = Field(
        default=0.0, ge=0, description="the least change of the selection metric that counts"
    )


# `train.workers: auto`: at most this many loader processes, one core left to the training one
AUTO_WORKERS_MAX = 4  # training on the CPU: workers take cores from the model's threads
AUTO_WORKERS_MAX_GPU = 16  # a GPU step outruns one worker 7- to 11-fold (bench/loader_scale.py)


# Marks (mmval.settings): Effect.NONE on the host settings, which change how fast or where a run
# goes, not what it computes (beyond floating-point rounding): out of the settings hash, and free
# to change on resume; a resumed run may also train longer or change its NaN policy (RESUMABLE).
class TrainConfig(_Strict):
    epochs: Annotated[int, Effect.RESUMABLE] = Field(ge=1)
    batch_size: int = Field(default=64, ge=1)
    eval_batch_size: int = Field(default=512, ge=1)
    device: Annotated[Literal["auto", "cpu", "cuda"], Effect.NONE] = "auto"
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: autocast")
    workers: Annotated[int | Literal["auto"], Effect.NONE] = Field(
        default="auto",
        description="DataLoader worker processes; auto, with a process's share of the cores "
        "(under torchrun): on a GPU min(16, cores - 1), on the CPU min(4, cores - 1) where "
        "there are more than 2 cores, else 0. Workers never change results",
    )
    prefetch: Annotated[int, Effect.NONE] = Field(
        default=2, ge=1, description="batches each DataLoader worker loads ahead (workers > 0)"
    )
    channels_last: Annotated[bool, Effect.NONE] = Field(
        default=False,
        description="channels-last memory format for the 4-D maps of resnet18 encoders (faster "
        "convolutions on tensor-core GPUs, with bf16 especially)",
    )
    compile: Annotated[bool, Effect.NONE] = Field(
        default=False,
        description="torch.compile each encoder (first steps slower while compiling; needs a C++ "
        "compiler on the CPU)",
    )
    eval_every: int = Field(default=1, ge=1, description="epochs between evaluations")
    checkpoint_every: int = Field(default=1, ge=1, description="epochs between last.pt saves")
    tensorboard: Annotated[bool, Effect.NONE] = Field(
        default=False, description="also write per-epoch scalars as TensorBoard events in tb/"
    )
    protocol: Annotated[Literal["validation", "published"], ADDED_LATER] = Field(
        default="validation",
        description="validation: train on the train split and keep best.pt at the best "
        "validation accuracy (an honest test number); published: as the papers' official code, "
        "train on the train and val splits together and keep best.pt at the best test accuracy "
        "(not an honest number: `mmval report --select test-max` labels it)",
    )
    tracking: Annotated[Literal["none", "mlflow"], Effect.NONE] = Field(
        default="none",
        description="mlflow: also log params, per-epoch metrics, recipe.yaml and summary.json "
        "to a local MLflow store (mmval/engine/tracking.py; pip install 'mmval[tracking]')",
    )
    tracking_uri: Annotated[Path | None, Effect.NONE] = Field(
        default=None,
        description="the local folder of the MLflow store (never a server); default: "
        "<output>/mlruns",
    )
    nonfinite: Annotated[Literal["stop", "skip"], Effect.RESUMABLE] = Field(
        default="stop",
        description="a NaN or infinite loss or gradient: stop the run (last.pt keeps the last "
        "good state) or skip that step (counted per epoch in metrics, as skipped_steps)",
    )
    clip_grad_norm: Annotated[float | None, ADDED_LATER] = Field(
        default=None,
        gt=0,
        description="rescale the gradients to this total L2 norm when above it, at every "
        "optimizer step of the run (after a method's gradient edits; averaged over ranks first)",
    )
    early_stopping: Annotated[EarlyStopping | None, ADDED_LATER] = Field(
        default=None,
        description="end the run when the selection metric stops improving: {patience: N "
        "evaluations, min_delta: x}; the run counts as finished",
    )
    freeze: Annotated[dict[str, Annotated[int, Field(ge=0)] | Literal["always"]], ADDED_LATER] = (
        Field(
            default_factory=dict,
            description="freezing schedules: {<module path>: N | always}; the parameters of "
            "that module of the model (encoders.image, encoders.text.bert.encoder, ...) are "
            "not trained in epochs 0 to N-1 (counted from 0) and trained from epoch N on "
            "(always: never); the module stays in train mode, so its BatchNorm statistics "
            "still update (QMF's freeze_img / freeze_txt)",
        )
    )
    select_on: Annotated[str, ADDED_LATER] = Field(
        default="auto",
        pattern=r"^(auto|val_[a-z0-9_]+)$",
        description="the validation metric best.pt, early stopping and the plateau scheduler "
        "go by (val_acc, val_f1, val_loss, val_mae, ...); auto: the task's (classification: "
        "val_acc). Under the published protocol it is read on test, as auto is",
    )
    select_mode: Annotated[Literal["auto", "max", "min"], ADDED_LATER] = Field(
        default="auto",
        description="whether higher (max) or lower (min) select_on is better; auto: the "
        "task's direction for its own metric, else lower for names ending in loss, mae, mse, "
        "rmse or error and higher for the rest",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value >= 0):
            return value
        raise ValueError("must be a number of worker processes (0 or more) or auto")

    @field_validator("freeze")
    @classmethod
    def _paths(cls, value: dict[str, Any]) -> dict[str, Any]:
        bad = [path for path in value if not re.match(MODULE_PATH, path)]
        if bad:
            raise ValueError(
                f"{', '.join(map(repr, bad))}: a key is a dotted module path of the model "
                "(encoders.<modality>, fusion, ...)"
            )
        return value

    @field_validator("tracking_uri", mode="before")
    @classmethod
    def _local(cls, value: Any) -> Any:
        if isinstance(value, str) and "://" in value:
            raise ValueError("a local folder, not a URI: mmval tracks to a local store only")
        return value


NAME_MAX = 100  # characters of a run name: a folder name, well below file systems' 255 bytes
NAME_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9_.{{}}+\-]{{0,{NAME_MAX - 1}}}$"
# numpy's legacy seeding (and so every library seeded through it) takes seeds in [0, 2^32)
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**32)]
SWEEP_KEYS = ("methods", "grid", "search")  # search: mmval.search


class Recipe(_Strict):
    name: Annotated[str, Effect.RUN] = Field(
        max_length=NAME_MAX,
        pattern=NAME_PATTERN,
        description=f"run folder name (at most {NAME_MAX} characters); may use {{dotted.field}} "
        "placeholders",
    )
    seeds: Annotated[list[Seed], Effect.RUN] = Field(
        min_length=1, description="one run per seed, each an integer in [0, 2^32)"
    )
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfigUnion = Field(default_factory=ConcatConfig)
    task: Annotated[TaskField | None, ADDED_LATER] = Field(
        default=None,
        description="what the model is trained for: classification, regression, "
        "localisation or segmentation, or a mapping with the task's settings "
        "(`{name: regression, loss: mse}`); unset, the data set's own task",
    )
    plugins: Annotated[list[PluginField], ADDED_LATER] = Field(
        default_factory=list,
        description="components added to the method's model and loss, in order (c3r, imml; "
        "mmval/plugins): `[c3r]` or `[{name: imml, gamma1: 0.1}]`",
    )
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig
    output: Annotated[Path, Effect.RUN] = Field(
        default=Path("runs"), description="runs go to output/name/seed<k>"
    )
    valuation: Annotated[TrainValuationConfig | None, Effect.NONE] = Field(
        default=None,
        description="write per-sample modality contributions to contrib_epoch<k>.parquet",
    )
    evaluate: Annotated[EvaluateConfig | None, Effect.NONE] = Field(
        default=None,
        description="after training, evaluate best.pt under noise, with missing modalities "
        "and feature masking into <run>/evaluate/ (`mmval report --robustness`), e.g. "
        "{corrupt: [image=gaussian:0,5,10], repeats: 5, subsets: true}",
    )

    @staticmethod
    def _plugin_shorthand(data: Any) -> Any:
        """`method: c3r` (or imml, with its settings) is short for concat with that plug-in,
        placed first among the recipe's plug-ins unless it must come last."""
        if not isinstance(data, dict):
            return data
        method = data.get("method")
        name = method.get("name") if isinstance(method, dict) else method
        if not isinstance(name, str) or name not in PLUGINS or name in METHODS:
            return data
        entry = method if isinstance(method, dict) else {"name": name}
        listed = data.get("plugins") or []
        if not isinstance(listed, list):
            return data  # invalid, and named so
        plugins = [*listed, entry] if PLUGINS[name].Config.last else [entry, *listed]
        return {**data, "method": {"name": "concat"}, "plugins": plugins}

    @model_validator(mode="before")
    @classmethod
    def _method_fusion(cls, data: Any) -> Any:
        """A model without `fusion` gets the method's own fusion, the one it is defined with; a
        fusion mapping without `name` gives settings of that fusion."""
        data = cls._plugin_shorthand(data)
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
    def _distinct(cls, value: list[Seed]) -> list[Seed]:
        if len(set(value)) != len(value):
            raise ValueError("seeds must be distinct")
        return value

    def for_seed(self, seed: int) -> Recipe:
        return self.model_copy(update={"seeds": [seed]})

    def settings_hash(self) -> str:
        """Identifies the experimental setting (mmval.settings: the fields marked as not
        changing what a run computes, and the name, output and seeds, left out)."""
        return settings_hash(self)

    def run_label(self) -> str:
        """Report name: plain training is named after its fusion (concat, sum, film, ...)."""
        assert self.model.fusion is not None  # filled from the method by validation
        fusion = self.model.fusion.name
        label = fusion if self.method.name == "concat" else self.method.label()
        if self.method.name != "concat" and fusion != self.method.fusion:
            label = f"{label}+{fusion}"
        return "+".join([label, *(plugin.name for plugin in self.plugins)])


def _task_problems(recipe: Recipe, task: str) -> list[tuple[str, str]]:
    """The method or plug-ins of the recipe that are not defined for `task`."""
    found = []
    if task not in recipe.method.tasks:
        found.append(
            (
                "method" if recipe.task is None else "task",
                f"{recipe.method.name} is defined for {' and '.join(recipe.method.tasks)}, "
                f"not {task}",
            )
        )
    for i, plugin in enumerate(recipe.plugins):
        if task not in plugin.tasks:
            found.append(
                (f"plugins[{i}]", f"{plugin.name} is defined for {' and '.join(plugin.tasks)}")
            )
    return found


def check_task(recipe: Recipe, task: str) -> None:
    """The recipe's method and plug-ins against the task it trains for (the data's task when
    the recipe names none)."""
    found = _task_problems(recipe, task)
    if found:
        raise UserError(format_problems(found, f"recipe {recipe.name} ({task} task)"))


def _cross_checks(recipe: Recipe) -> list[tuple[str, str]]:
    modalities = recipe.data.modalities
    found = recipe.method.recipe_problems(recipe.model, modalities)
    # a method or plug-in whose own phase never starts would train as plain training, unnoticed
    inactive = [("method", recipe.method.inactive_reason(recipe.train.epochs))]
    inactive += [
        (f"plugins[{i}]", plugin.inactive_reason(recipe.train.epochs))
        for i, plugin in enumerate(recipe.plugins)
    ]
    found += [(f"{where}.{reason[0]}", reason[1]) for where, reason in inactive if reason]
    if recipe.task is not None:
        found += _task_problems(recipe, recipe.task.name)
    schedule = recipe.optim.scheduler
    by_epoch = schedule.name == "warmup_cosine" and schedule.unit == "epochs"
    if by_epoch and schedule.warmup >= recipe.train.epochs:
        found.append(
            (
                "optim.scheduler.warmup",
                f"the warm-up of {schedule.warmup} epochs leaves none of the "
                f"{recipe.train.epochs} for the cosine (train.epochs)",
            )
        )
    whole = recipe.model.whole_model()
    if whole is not None:
        field, what = whole
        if recipe.method.name != "concat":
            found.append(
                (
                    f"model.{field}",
                    f"{what}: there are no per-modality features or logits for "
                    f"{recipe.method.name} to read; it trains with method concat",
                )
            )
        if recipe.plugins:
            found.append(
                ("plugins", f"plug-ins act on per-modality feature vectors; model.{field} has none")
            )
    built_on = None if modalities is None else recipe.method.model_modalities(modalities)
    found += plugin_problems(METHODS[recipe.method.name], recipe.plugins, built_on)
    found += recipe.model.flat_problems()
    if modalities is not None:
        for name in recipe.model.encoders:
            if name not in modalities:
                found.append((f"model.encoders.{name}", "not one of data.modalities"))
    return found


def _number_problems(raw: Any, valid: Any, where: str = "") -> list[tuple[str, str]]:
    """Non-finite floats anywhere in the validated recipe (`valid`, its python-mode dump: the
    method, model and plug-in settings included), and booleans that pydantic's lax mode read as
    numbers (`true` for 1), found by walking the raw recipe alongside."""
    if isinstance(valid, dict):
        found = []
        for key, value in valid.items():
            child = raw.get(key) if isinstance(raw, dict) else None
            found += _number_problems(child, value, f"{where}.{key}" if where else str(key))
        return found
    if isinstance(valid, list):
        found = []
        for i, value in enumerate(valid):
            child = raw[i] if isinstance(raw, list) and i < len(raw) else None
            found += _number_problems(child, value, f"{where}[{i}]")
        return found
    if isinstance(raw, bool) and isinstance(valid, int | float) and not isinstance(valid, bool):
        return [(where, f"a number is expected, not the boolean {str(raw).lower()}")]
    if isinstance(valid, float) and not math.isfinite(valid):
        return [(where, f"must be a finite number (got {valid})")]
    return []


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
    found = _number_problems(raw, recipe.model_dump()) or _cross_checks(recipe)
    if found:
        raise UserError(format_problems(found, f"recipe {where}"))
    return recipe


def load_recipe(path: Path, overrides: Sequence[str] = ()) -> Recipe:
    """A recipe file, its bases composed (mmval.compose) and `--set` applied, validated."""
    kept: list[str] = []
    raw = compose_recipe(path, overrides, variant_fields, kept)
    with left_over_named(kept):
        return parse_recipe(raw, str(path))


@contextmanager
def left_over_named(kept: list[str]) -> Iterator[None]:
    """A recipe problem in a field that `--set` on a tag kept from the mapping's old type
    (`compose_recipe`'s `kept`) says so: the user never wrote that value for the new type."""
    try:
        yield
    except UserError as exc:
        left = [name for name in kept if re.search(rf"\b{re.escape(name)}\b", str(exc))]
        if not left:
            raise
        raise UserError(
            f"{exc} ({', '.join(left)}: kept from the mapping before --set changed its type, "
            "as a field the new type also has; give it a value that fits with --set.)"
        ) from None


def _deref(node: dict, defs: dict) -> dict:
    while "$ref" in node:
        node = defs[node["$ref"].rsplit("/", 1)[-1]]
    return node


def _members(node: dict, defs: dict) -> list[dict]:
    node = _deref(node, defs)
    return [_deref(m, defs) for k in ("anyOf", "oneOf", "allOf") for m in node.get(k, [])]


def _field_schema(node: dict, key: str, defs: dict) -> dict | None:
    """The JSON schema of field `key` of the model (or optional model, or mapping) `node`."""
    node = _deref(node, defs)
    if key in node.get("properties", {}):
        return node["properties"][key]
    if isinstance(node.get("additionalProperties"), dict):
        return node["additionalProperties"]
    for member in _members(node, defs):
        found = _field_schema(member, key, defs)
        if found is not None:
            return found
    return None


def _tag_target(node: dict, key: str, tag: str, defs: dict) -> dict | None:
    """The config schema that a union at `node` (or inside an optional or shorthand one) holds
    for `tag`: by the union's discriminator mapping, or the member whose `key` is `tag`."""
    node = _deref(node, defs)
    target = node.get("discriminator", {}).get("mapping", {}).get(tag)
    if target is not None:
        return _deref({"$ref": target}, defs)
    for member in _members(node, defs):
        own = member.get("properties", {}).get(key, {})
        if tag in (own.get("const"), own.get("default")):
            return member
        found = _tag_target(member, key, tag, defs)
        if found is not None:
            return found
    return None


def variant_fields(path: tuple[str, ...], key: str, tag: Any) -> set[str] | None:
    """The fields of the config that the mapping at `path` of a recipe (optim.scheduler, method,
    model.fusion, ...) is with `key: tag`, read from the recipe's JSON schema (registered
    methods and fusions included); None when the tag is not one of them."""
    schema = recipe_json_schema()
    defs = schema.get("$defs", {})
    node: dict | None = schema
    for name in path:
        node = None if node is None else _field_schema(node, name, defs)
    if node is None or not isinstance(tag, str):
        return None
    target = _tag_target(node, key, tag, defs)
    return None if target is None else set(target.get("properties", {}))


def recipe_json_schema() -> dict:
    return Recipe.model_json_schema()
