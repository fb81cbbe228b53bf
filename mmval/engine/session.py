"""What a run builds before its first step: device, data, method, model, optimizer, loader.

Under torchrun (or `mmval train --nproc N`) every rank builds the same session: the same seeded
weights, and a sampler that gives each rank its part of every global batch
(`train.batch_size` is the global batch). docs/distributed.md has the design.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau
from torch.utils.data import DataLoader

from mmval import distributed
from mmval.artifacts.checkpoint import DataInfo
from mmval.data.corrupt import check_corruptions, training_corruptor
from mmval.data.dataset import BlockShuffleSampler, ParquetSamples, collate_batch
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.shards import MANIFEST, DataManifest, check_data_dir
from mmval.data.sources import SOURCES
from mmval.engine.freeze import Freezing, build_freezing, param_groups
from mmval.errors import UserError
from mmval.methods import Method, build_method
from mmval.methods.plugged import with_plugins
from mmval.models import MultimodalModel, build_model
from mmval.recipe import (
    AUTO_WORKERS_MAX,
    AUTO_WORKERS_MAX_GPU,
    DataConfig,
    OptimConfig,
    Recipe,
    TrainConfig,
    check_against_data,
    check_task,
)
from mmval.tasks import Task, resolve_task


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device is cuda but no CUDA device is available; use auto or cpu.")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def ensure_data(data: DataConfig) -> DataManifest:
    """Check the data directory; prepare a built-in data set that needs no raw files (under
    DDP rank 0 prepares, then the others check)."""
    return distributed.main_first(lambda: _ensure_data(data))


def _ensure_data(data: DataConfig) -> DataManifest:
    directory = data.directory()
    if data.dataset is not None and not (directory / MANIFEST).is_file():
        entry, _ = load_dataset_manifest(data.dataset)
        if SOURCES[entry.source].needs_raw:
            raise UserError(
                f"{directory} holds no prepared {data.dataset}; run `mmval prep {data.dataset} "
                f"--raw RAW_DIR --out {directory}` first."
            )
        prepare(data.dataset, directory)
    if data.path is not None and not directory.is_dir():
        raise UserError(f"data.path {directory} does not exist.")
    return check_data_dir(directory, verify_checksums=True, cached=True)


def build_optimizer(cfg: OptimConfig, params: Any) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    optimizer = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    # foreach: one fused kernel per step for all tensors, also on the CPU (about 3x faster here)
    return optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)


# metric names (the end of them) where lower is better, for `train.select_mode: auto`
LOWER_IS_BETTER = ("loss", "mae", "mse", "rmse", "error")


@dataclass(frozen=True)
class Selection:
    """The metric a run is selected on (best.pt), stops early on and plateaus on."""

    split: str  # val, or test under the published protocol (as the official codes select)
    metric: str  # without the split: acc, f1, loss, mae, dice_mean, ...
    higher_is_better: bool

    @property
    def column(self) -> str:
        return f"{self.split}_{self.metric}"

    def score(self, row: dict[str, float]) -> float:
        """The row's selection value, negated when lower is better: higher is always better."""
        return row[self.column] if self.higher_is_better else -row[self.column]


def selection(train: TrainConfig, task: Task) -> Selection:
    """`train.select_on` / `select_mode` resolved against the task (auto: the task's own)."""
    split = "test" if train.protocol == "published" else "val"
    metric = task.selected_on if train.select_on == "auto" else train.select_on[len("val_") :]
    if train.select_mode != "auto":
        higher = train.select_mode == "max"
    elif metric == task.selected_on:
        higher = task.higher_is_better
    else:
        higher = not metric.endswith(LOWER_IS_BETTER)
    return Selection(split, metric, higher)


class Scheduler:
    """A learning-rate scheduler and when it advances: after every training step (batch),
    after every epoch, or after every evaluation with the selection metric (`every`). The loop
    calls all three hooks; methods never see the schedule. Its state is the torch scheduler's
    own (last.pt's `scheduler`, as before the wrapper existed)."""

    def __init__(
        self,
        scheduler: LRScheduler | ReduceLROnPlateau,
        every: Literal["step", "epoch", "evaluation"],
        steps: int | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.every = every
        self.steps = steps  # a per-step schedule's length: it is not advanced beyond it

    def after_step(self) -> None:
        if self.every == "step":
            assert self.steps is not None
            if self.scheduler.last_epoch < self.steps:
                self.scheduler.step()

    def after_epoch(self) -> None:
        if self.every == "epoch":
            self.scheduler.step()

    def after_evaluation(self, value: float) -> None:
        if self.every == "evaluation":
            self.scheduler.step(value)

    def state_dict(self) -> dict[str, Any]:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state)


def build_scheduler(
    cfg: OptimConfig,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    steps_per_epoch: int,
    selected: Selection,
) -> Scheduler | None:
    """The recipe's schedule over `epochs` epochs of `steps_per_epoch` training steps."""
    lr = torch.optim.lr_scheduler
    schedule = cfg.scheduler
    if schedule.name == "step":
        return Scheduler(lr.StepLR(optimizer, schedule.step_size, schedule.gamma), "epoch")
    if schedule.name == "cosine":
        return Scheduler(lr.CosineAnnealingLR(optimizer, epochs, schedule.min_lr), "epoch")
    if schedule.name == "multistep":
        return Scheduler(lr.MultiStepLR(optimizer, schedule.milestones, schedule.gamma), "epoch")
    if schedule.name == "warmup_cosine":
        per_step = schedule.unit == "steps"
        total = epochs * steps_per_epoch if per_step else epochs
        if schedule.warmup >= total:
            raise UserError(
                f"optim.scheduler.warmup {schedule.warmup} {schedule.unit} leaves none of the "
                f"run's {total} for the cosine; shorten the warm-up or train longer."
            )
        warm = lr.LinearLR(optimizer, schedule.start_factor, 1.0, schedule.warmup)
        cosine = lr.CosineAnnealingLR(optimizer, total - schedule.warmup, schedule.min_lr)
        chained = lr.SequentialLR(optimizer, [warm, cosine], milestones=[schedule.warmup])
        return Scheduler(chained, "step", total) if per_step else Scheduler(chained, "epoch")
    if schedule.name == "plateau":
        mode = schedule.mode
        if mode == "auto":
            mode = "max" if selected.higher_is_better else "min"
        plateau = lr.ReduceLROnPlateau(
            optimizer,
            mode=mode,
            factor=schedule.factor,
            patience=schedule.patience,
            threshold=schedule.threshold,
            threshold_mode=schedule.threshold_mode,
            cooldown=schedule.cooldown,
            min_lr=schedule.min_lr,
        )
        return Scheduler(plateau, "evaluation")
    if schedule.name == "onecycle":
        total = epochs * steps_per_epoch
        peak = schedule.max_lr if schedule.max_lr is not None else cfg.lr
        # with optim.groups, each group peaks at its own share of the default group's peak
        peaks = [peak * g["lr"] / cfg.lr for g in optimizer.param_groups[1:]]
        cycle = lr.OneCycleLR(
            optimizer,
            max_lr=[peak, *peaks] if peaks else peak,
            total_steps=total,
            pct_start=schedule.pct_start,
            anneal_strategy=schedule.anneal_strategy,
            cycle_momentum=schedule.cycle_momentum,
            base_momentum=schedule.base_momentum,
            max_momentum=schedule.max_momentum,
            div_factor=schedule.div_factor,
            final_div_factor=schedule.final_div_factor,
            three_phase=schedule.three_phase,
        )
        return Scheduler(cycle, "step", total)
    return None


def loader_workers(workers: int | str, processes: int, gpu: bool = False) -> int:
    """`train.workers` as a number. Auto, from a process's share of the usable cores (under
    torchrun): training on a GPU, every core but one (at most 16) decodes and augments, since
    one worker feeds a small fraction of a GPU step's samples (bench/loader_scale.py); on the
    CPU, workers compete with the model's threads: min(4, cores - 1), none with 2 cores."""
    if workers != "auto":
        return int(workers)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = (usable or 1) // processes
    if gpu:
        return max(0, min(AUTO_WORKERS_MAX_GPU, cores - 1))
    return 0 if cores <= 2 else min(AUTO_WORKERS_MAX, cores - 1)


def autocast(device: torch.device, precision: str) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def join_ranks(recipes: Sequence[Recipe]) -> torch.device | None:
    """Under torchrun, join the process group for these runs (NCCL on CUDA, gloo on the CPU:
    one kind for all of them) before anything reads or prepares data; the device of this rank,
    or None outside torchrun."""
    if not distributed.launched():
        return None
    kinds = {resolve_device(r.train.device).type for r in recipes}
    if len(kinds) > 1:
        raise UserError(
            "under torchrun every run of one command must train on the same device kind; "
            f"these recipes use {', '.join(sorted(kinds))} (see train.device)."
        )
    return distributed.setup(resolve_device(recipes[0].train.device))


@dataclass
class Session:
    """Everything a run builds before its first step."""

    device: torch.device
    manifest: DataManifest
    data_info: DataInfo
    modalities: list[str]  # those the model is built on
    task: Task
    method: Method
    model: nn.Module  # a MultimodalModel, or a segmentation model
    datasets: dict[str, ParquetSamples]
    optimizer: torch.optim.Optimizer
    scheduler: Scheduler | None
    selection: Selection
    sampler: BlockShuffleSampler
    loader: DataLoader
    method_modules: nn.ModuleDict
    gradients: distributed.GradientSync | None  # under DDP: averages gradients over ranks
    freezing: Freezing | None = None  # train.freeze, applied at the start of every epoch


def build_session(recipe: Recipe, seed: int, device: torch.device) -> Session:
    world, rank = distributed.world_size(), distributed.rank()
    if recipe.train.batch_size % world:
        raise UserError(
            f"train.batch_size {recipe.train.batch_size} is the global batch, split evenly "
            f"over the {world} processes: make it a multiple of {world}."
        )
    manifest = ensure_data(recipe.data)
    data_dir = recipe.data.directory()
    available = recipe.data.modalities or [s.name for s in manifest.modalities]
    check_against_data(recipe, available)
    specs = [manifest.modality(m) for m in available]
    task = resolve_task(recipe.task, manifest.task, len(manifest.classes))
    check_task(recipe, task.kind)
    method = with_plugins(
        build_method(recipe.method, len(manifest.classes), task),
        recipe.plugins,
        len(manifest.classes),
    )
    modalities = method.model_modalities(available)
    specs = [s for s in specs if s.name in modalities]
    splits = recipe.data.splits
    roles = {"train": (splits.train,), "val": (splits.val,), "test": (splits.test,)}
    if recipe.train.protocol == "published":  # no validation carve-out: it trains too
        roles["train"] = (splits.train, splits.val)
    corruptions = recipe.data.corruptions()
    check_corruptions(corruptions, modalities, field="data.corrupt")
    datasets = {
        role: ParquetSamples(
            data_dir,
            names,
            modalities,
            manifest=manifest,
            train=role == "train",
            seed=seed,
            augment=recipe.data.augment,
            corrupt=training_corruptor(corruptions, seed) if corruptions else None,
        )
        for role, names in roles.items()
    }
    empty = [f"{role} ({d.split})" for role, d in datasets.items() if len(d) < world]
    if empty:
        raise UserError(
            f"the data in {data_dir} has no samples in split(s) {', '.join(empty)}; every "
            "role needs samples (see data.splits in the recipe, or re-run `mmval prep` "
            "without --limit/--splits)."
            if world == 1
            else f"the data in {data_dir} has fewer samples than the {world} processes in "
            f"split(s) {', '.join(empty)}; each process evaluates a share of every split."
        )
    torch.manual_seed(seed)  # on every rank: the same weights everywhere
    model = _for_ranks(
        build_model(recipe.model, specs, task.out_dim(), recipe.plugins, task=task.kind), device
    )
    model = model.to(device)
    if recipe.train.channels_last:  # the conv weights; resnet18 inputs arrive channels-last
        model = model.to(memory_format=torch.channels_last)
    method_modules = _for_ranks(method.build_modules(model), device).to(device)
    if recipe.train.compile:  # in place: state_dict keys, and checkpoints, are unchanged
        for encoder in model.encoders.values() if isinstance(model, MultimodalModel) else [model]:
            encoder.compile()
    own = list(method_modules.parameters())
    params = [*model.parameters(), *own]
    optimizer = build_optimizer(recipe.optim, param_groups(recipe.optim, model, own))
    # resolved before any epoch froze a parameter: GradientSync (below) hooks every one, so
    # that those unfrozen later are averaged too
    freezing = build_freezing(recipe.train.freeze, model, own)
    per_rank = recipe.train.batch_size // world
    sampler = BlockShuffleSampler(
        datasets["train"].block_ids(),
        seed=seed,
        num_replicas=world,
        rank=rank,
        batch_size=per_rank,
    )
    workers = loader_workers(recipe.train.workers, world, gpu=device.type == "cuda")
    loader = DataLoader(
        datasets["train"],
        batch_size=per_rank,
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_batch,
        persistent_workers=workers > 0,
        prefetch_factor=recipe.train.prefetch if workers else None,
        # its own generator: persistent workers must not change the global random stream
        generator=torch.Generator().manual_seed(seed) if workers else None,
    )
    data_info = DataInfo(
        path=str(data_dir.resolve()),
        dataset=manifest.dataset,
        fingerprint=manifest.fingerprint(),
        classes=manifest.classes,
        modalities=modalities,
    )
    selected = selection(recipe.train, task)
    return Session(
        device=device,
        manifest=manifest,
        data_info=data_info,
        modalities=modalities,
        task=task,
        method=method,
        model=model,
        datasets=datasets,
        optimizer=optimizer,
        scheduler=build_scheduler(
            recipe.optim, optimizer, recipe.train.epochs, len(loader), selected
        ),
        selection=selected,
        sampler=sampler,
        loader=loader,
        method_modules=method_modules,
        gradients=distributed.GradientSync(params) if world > 1 else None,
        freezing=freezing,
    )


def _for_ranks(module: nn.Module, device: torch.device) -> nn.Module:
    """Under DDP, BatchNorm layers become SyncBatchNorm, so that batch statistics (and the
    running ones) are the global batch's, as in one process; PyTorch synchronises them on GPUs
    only, so on the CPU a model with BatchNorm is refused."""
    if distributed.world_size() == 1:
        return module
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    if device.type != "cuda":
        raise UserError(
            "the model has BatchNorm layers (resnet18 encoders), which multi-process training "
            "keeps exact only as SyncBatchNorm, and PyTorch synchronises BatchNorm on GPUs "
            "only: train it on CUDA devices, or in one process on the CPU."
        )
    return nn.SyncBatchNorm.convert_sync_batchnorm(module)
