"""The one training loop: data, forward, method hooks, evaluation, checkpoints, resume.

Methods change training only through the hooks of `mmval.methods.base.Method`; nothing here
knows about any particular method.

Under torchrun (or `mmval train --nproc N`) the same loop runs in every process: each rank
trains on its part of every global batch (`train.batch_size` is the global batch), gradients
are averaged over ranks by `StepTools` (no DistributedDataParallel wrapper, so that methods keep
reading the model's parts, running several backward passes and editing gradients), evaluation
is split over the ranks and gathered, epoch figures are reduced, and only rank 0 writes files.
After every epoch the ranks are checked to hold the same weights, buffers and random state.
docs/distributed.md has the design.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from mmval import __version__, distributed
from mmval.atomic import atomic_path, remove_stale_temps, write_text_atomic
from mmval.data.dataset import Batch, BlockShuffleSampler, ParquetSamples, collate_batch
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.shards import MANIFEST, DataManifest, check_data_dir
from mmval.data.sources import SOURCES
from mmval.engine.checkpoint import load_checkpoint, load_latest_checkpoint, save_checkpoint
from mmval.engine.metrics import accuracy, macro_f1
from mmval.engine.tensorboard import epoch_writer
from mmval.errors import UserError
from mmval.methods import Method, TrainContext, build_method
from mmval.methods.base import StepTools
from mmval.models import MultimodalModel, build_model
from mmval.recipe import (
    HOST_DEFAULTS,
    DataConfig,
    OptimConfig,
    Recipe,
    check_against_data,
    current_dump,
)
from mmval.valuation.training import EpochValuation

LAST, BEST, SUMMARY, METRICS, RECIPE_FILE, LOG = (
    "last.pt",
    "best.pt",
    "summary.json",
    "metrics.parquet",
    "recipe.yaml",
    "train.log",
)
PREDICTIONS = "predictions.parquet"
PREVIOUS = "last.prev.pt"  # the last.pt before the newest: resume falls back on it
logger = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """A NaN or infinite loss or gradient stopped the run (`train.nonfinite: stop`)."""


class _NonFiniteStep(Exception):
    """Raised by `_GuardedTools.step` before the update; `_train_epoch` names where."""


@dataclass
class _GuardedTools(StepTools):
    """`StepTools` whose step never applies a NaN or infinite gradient: it raises
    (`train.nonfinite: stop`) or drops the step (`skip`), before the optimizer changes anything.
    Under DDP the check reads the averaged gradients, so every rank decides alike."""

    skip: bool = False
    skipped: int = 0

    def step(self) -> None:
        self.reduce_gradients()
        params = (p for group in self.optimizer.param_groups for p in group["params"])
        grads = [p.grad for p in params if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            if not self.skip:
                raise _NonFiniteStep
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return
        self.optimizer.step()


@dataclass
class TrainCallbacks:
    """Hooks for whoever shows progress (the CLI's bars) or watches a run (tests)."""

    on_start: Callable[[str, int, int], None] = lambda label, epochs, steps_per_epoch: None
    on_step: Callable[[], None] = lambda: None
    on_epoch: Callable[[dict[str, float]], None] = lambda row: None


@dataclass
class RunResult:
    run_dir: Path
    skipped: bool
    summary: dict[str, Any] = field(default_factory=dict)


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


def build_scheduler(
    cfg: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    schedule = cfg.scheduler
    if schedule.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, schedule.step_size, schedule.gamma)
    if schedule.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, schedule.min_lr)
    return None


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
class Predictions:
    logits: np.ndarray
    labels: np.ndarray
    unimodal_pred: dict[str, np.ndarray]

    def metrics(self, prefix: str) -> dict[str, float]:
        pred = self.logits.argmax(1)
        row = {
            f"{prefix}_acc": accuracy(pred, self.labels),
            f"{prefix}_f1": macro_f1(pred, self.labels),
        }
        for m, upred in self.unimodal_pred.items():
            row[f"{prefix}_acc_{m}"] = accuracy(upred, self.labels)
        return row

    def gathered(self) -> Predictions:
        """Every rank's predictions in rank order (each rank predicted its share of a split)."""

        def cat(values: np.ndarray) -> np.ndarray:
            return distributed.gather_rows(torch.from_numpy(values)).numpy()

        return Predictions(
            logits=cat(self.logits),
            labels=cat(self.labels),
            unimodal_pred={m: cat(v) for m, v in self.unimodal_pred.items()},
        )


@torch.no_grad()
def predict(
    model: MultimodalModel,
    dataset: ParquetSamples,
    device: torch.device,
    *,
    batch_size: int,
    precision: str = "fp32",
    positions: Sequence[int] | None = None,
) -> Predictions:
    """Predictions for the dataset in order, or for `positions` only."""
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=None if positions is None else list(positions),
        collate_fn=collate_batch,
    )
    logits, labels, unimodal = [], [], {m: [] for m in model.modalities}
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, precision):
            out = model(batch.inputs)
        logits.append(out.logits.float().cpu())
        labels.append(batch.label.cpu())
        if out.unimodal_logits is not None:
            for m, z in out.unimodal_logits.items():
                unimodal[m].append(z.argmax(1).cpu())
    return Predictions(
        logits=torch.cat(logits).numpy(),
        labels=torch.cat(labels).numpy(),
        unimodal_pred={m: torch.cat(v).numpy() for m, v in unimodal.items() if v},
    )


def _rng_state(device: torch.device) -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        if device.type == "cuda" and distributed.world_size() > 1:
            # the state of the GPU rank 0 trains on: every rank's own GPU is in lockstep with it
            state["cuda_rank"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" not in state or not torch.cuda.is_available():
        return
    if device.type == "cuda" and distributed.world_size() > 1:
        # each rank's own GPU continues the stream of the GPU the saved run trained on
        torch.cuda.set_rng_state(state.get("cuda_rank", state["cuda"][0]), device)
    else:
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_key(recipe: dict[str, Any]) -> dict[str, Any]:
    """What must match to continue a run: everything but the epoch count, host details and
    valuation (which does not change training)."""
    key = json.loads(json.dumps(recipe))
    for name in ("epochs", "device", "workers", "nonfinite", *HOST_DEFAULTS):
        key["train"].pop(name, None)
    key.pop("valuation", None)
    return key


@dataclass
class _Session:
    """Everything a run builds before its first step."""

    device: torch.device
    manifest: DataManifest
    data_info: dict[str, Any]
    method: Method
    model: MultimodalModel
    datasets: dict[str, ParquetSamples]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    sampler: BlockShuffleSampler
    loader: DataLoader
    valuation: EpochValuation | None
    method_modules: nn.ModuleDict
    gradients: distributed.GradientSync | None  # under DDP: averages gradients over ranks


class Trainer:
    """Trains one recipe with one seed into `output/name/seed<k>/`."""

    def __init__(
        self,
        recipe: Recipe,
        seed: int,
        *,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: TrainCallbacks | None = None,
    ) -> None:
        self.recipe = recipe.for_seed(seed)
        self.seed = seed
        self.resume = resume
        self.overwrite = overwrite
        self.callbacks = callbacks or TrainCallbacks()
        self.run_dir = Path(recipe.output) / recipe.name / f"seed{seed}"
        self.recipe_dump = self.recipe.model_dump(mode="json")
        self._saved_epoch: int | None = None  # epoch of the newest last.pt, for messages

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of this very run if it already finished (same recipe), else None."""
        summary_path = self.run_dir / SUMMARY
        if not summary_path.is_file():
            return None
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        return summary if current_dump(summary.get("recipe")) == self.recipe_dump else None

    def run(self) -> RunResult:
        run_dir, epochs = self.run_dir, self.recipe.train.epochs
        device = distributed.setup(resolve_device(self.recipe.train.device))
        main = distributed.is_main()
        summary, started = distributed.on_main(self._open_run_dir)
        if summary is not None:
            return RunResult(run_dir, skipped=True, summary=summary)
        session = self._build(device)
        state = _RunState()
        if self.resume and started:
            state = self._restore(session)
        label = _run_label(self.recipe)
        session.sampler.set_epoch(state.epoch)  # len(loader): a whole epoch, also after resume
        self.callbacks.on_start(f"{label} seed{self.seed}", epochs, len(session.loader))
        self._check_ranks(session, "after building the model")
        with (
            open(run_dir / LOG, "a", encoding="utf-8") if main else nullcontext() as log,
            epoch_writer(
                run_dir, state.rows, enabled=self.recipe.train.tensorboard and main
            ) as tensorboard,
        ):
            for epoch in range(state.epoch, epochs):
                session.sampler.set_epoch(epoch)  # else len(loader) counts the last epoch's rest
                ctx = TrainContext(
                    epoch=epoch,
                    epochs=epochs,
                    step=state.step,
                    batches=functools.partial(self._ordered_batches, session),
                    steps_per_epoch=len(session.loader),
                    train_size=len(session.datasets["train"]),
                    sizes={role: len(d) for role, d in session.datasets.items()},
                )
                row = self._train_epoch(session, ctx)
                state.step = ctx.step
                self._check_ranks(session, f"after epoch {epoch + 1}")
                if session.scheduler is not None:
                    session.scheduler.step()
                if (epoch + 1) % self.recipe.train.eval_every == 0 or epoch + 1 == epochs:
                    metrics, test_preds = self._evaluate(session)
                    row.update(metrics)
                    if row["val_acc"] > state.best_val:
                        state.best_val, state.best_epoch = row["val_acc"], epoch + 1
                        self._save(BEST, session, {"epoch": epoch + 1, "metrics": row})
                        if main:
                            _write_predictions(
                                run_dir / PREDICTIONS,
                                session.datasets["test"].sample_ids,
                                test_preds,
                            )
                if session.valuation is not None and main:
                    session.valuation.after_epoch(session.model, epoch + 1, run_dir)
                state.rows.append(row)
                state.epoch = epoch + 1
                if main:
                    _write_metrics(run_dir / METRICS, state.rows)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                tensorboard(row)
                if state.epoch % self.recipe.train.checkpoint_every == 0 or state.epoch == epochs:
                    self._save(LAST, session, self._training_state(session, state))
                self.callbacks.on_epoch(row)
        summary = self._summary(session.manifest, label, state)
        if main:
            write_text_atomic(run_dir / SUMMARY, json.dumps(summary, indent=2) + "\n")
        if session.gradients is not None:
            session.gradients.close()
        distributed.barrier()  # the run's files are complete when any rank returns
        return RunResult(run_dir, skipped=False, summary=summary)

    def _open_run_dir(self) -> tuple[dict[str, Any] | None, bool]:
        """(the summary of this very run if it finished, else None; whether a run was started
        here): prepares the run folder. Under DDP only rank 0 calls it."""
        run_dir = self.run_dir
        if not self.overwrite and (summary := self.finished_summary()) is not None:
            return summary, False
        if self.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        started = (run_dir / LAST).is_file() or (run_dir / PREVIOUS).is_file()
        if started and not self.resume:
            raise UserError(
                f"{run_dir} already holds a run of this name; pass --resume to continue it, "
                "--overwrite to start again, or --set name=... for a new run."
            )
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)  # left by a killed run's interrupted writes
        write_text_atomic(run_dir / RECIPE_FILE, yaml.safe_dump(self.recipe_dump, sort_keys=False))
        return None, started

    def _build(self, device: torch.device) -> _Session:
        recipe = self.recipe
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
        method = build_method(recipe.method, len(manifest.classes))
        modalities = method.model_modalities(available)
        specs = [s for s in specs if s.name in modalities]
        datasets = {
            role: ParquetSamples(
                data_dir,
                getattr(recipe.data.splits, role),
                modalities,
                manifest=manifest,
                train=role == "train",
                seed=self.seed,
                augment=recipe.data.augment,
            )
            for role in ("train", "val", "test")
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
        torch.manual_seed(self.seed)  # on every rank: the same weights everywhere
        model = _for_ranks(build_model(recipe.model, specs, len(manifest.classes)), device)
        model = model.to(device)
        if recipe.train.channels_last:  # the conv weights; resnet18 inputs arrive channels-last
            model = model.to(memory_format=torch.channels_last)
        method_modules = _for_ranks(method.build_modules(model), device).to(device)
        if recipe.train.compile:
            for encoder in model.encoders.values():
                encoder.compile()  # in place: state_dict keys, and checkpoints, are unchanged
        params = [*model.parameters(), *method_modules.parameters()]
        optimizer = build_optimizer(recipe.optim, params)
        per_rank = recipe.train.batch_size // world
        sampler = BlockShuffleSampler(
            datasets["train"].block_ids(),
            seed=self.seed,
            num_replicas=world,
            rank=rank,
            batch_size=per_rank,
        )
        workers = recipe.train.workers
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
            generator=torch.Generator().manual_seed(self.seed) if workers else None,
        )
        valuation = None
        if recipe.valuation is not None:
            valuation = EpochValuation(
                recipe.valuation,
                data_dir=data_dir,
                manifest=manifest,
                modalities=modalities,
                split=getattr(recipe.data.splits, recipe.valuation.split),
                train_split=recipe.data.splits.train,
                seed=self.seed,
                device=device,
                batch_size=recipe.train.eval_batch_size,
            )
        data_info = {
            "path": str(data_dir.resolve()),
            "dataset": manifest.dataset,
            "fingerprint": manifest.fingerprint(),
            "classes": manifest.classes,
            "modalities": modalities,
        }
        return _Session(
            device=device,
            manifest=manifest,
            data_info=data_info,
            method=method,
            model=model,
            datasets=datasets,
            optimizer=optimizer,
            scheduler=build_scheduler(recipe.optim, optimizer, recipe.train.epochs),
            sampler=sampler,
            loader=loader,
            valuation=valuation,
            method_modules=method_modules,
            gradients=distributed.GradientSync(params) if world > 1 else None,
        )

    def _train_epoch(self, session: _Session, ctx: TrainContext) -> dict[str, float]:
        started = time.perf_counter()
        model, method, optimizer = session.model, session.method, session.optimizer
        session.sampler.set_epoch(ctx.epoch)
        session.datasets["train"].set_epoch(ctx.epoch)
        session.sampler.set_positions(method.train_positions(ctx))
        if session.loader.persistent_workers:
            # the draw a new loader iterator takes from the global generator (a persistent one
            # is reused): the random stream, and with it the run, does not depend on workers
            torch.empty((), dtype=torch.int64).random_()
        model.train()
        method.on_epoch_start(model, ctx)
        loss_sum, correct, seen, data_seconds = 0.0, 0, 0, 0.0
        method_sums: dict[str, float] = {}
        tools = _GuardedTools(
            optimizer,
            functools.partial(autocast, session.device, self.recipe.train.precision),
            session.gradients,
            skip=self.recipe.train.nonfinite == "skip",
        )
        batches = iter(session.loader)
        number = 0
        while True:
            waiting = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            batch = batch.to(session.device)
            data_seconds += time.perf_counter() - waiting
            number += 1
            skipped = tools.skipped
            try:
                result = method.train_step(model, batch, ctx, tools)
            except _NonFiniteStep:
                raise self._non_finite(ctx, number, "gradient") from None
            loss = float(result.loss)
            finite = math.isfinite(loss)
            if distributed.world_size() > 1:  # every rank stops or skips alike
                finite = not bool(distributed.all_reduce(torch.tensor(not finite), "max"))
            if not finite:
                if not tools.skip:
                    raise self._non_finite(ctx, number, "loss")
                tools.skipped = max(tools.skipped, skipped + 1)  # and left out of the figures
            else:
                for key, value in result.figures.items():
                    method_sums[key] = method_sums.get(key, 0.0) + value * len(batch)
                loss_sum += loss * len(batch)
                correct += int((result.logits.argmax(1) == batch.label).sum())
                seen += len(batch)
            ctx.step += 1
            session.sampler.advance(len(batch))
            self.callbacks.on_step()
        totals = distributed.sum_dict(
            {"loss": loss_sum, "correct": correct, "seen": seen}
            | {f"method_{k}": v for k, v in method_sums.items()}
        )
        seen = int(totals.pop("seen"))
        row: dict[str, float] = {
            "epoch": ctx.epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": totals.pop("loss") / seen if seen else math.nan,  # nan: all skipped
            "train_acc": totals.pop("correct") / seen if seen else math.nan,
        }
        if tools.skip:
            row["skipped_steps"] = tools.skipped
            if tools.skipped and distributed.is_main():
                logger.warning(
                    "warning: epoch %d: %d step(s) with a NaN or infinite loss or gradient "
                    "skipped (train.nonfinite: skip).",
                    ctx.epoch + 1,
                    tools.skipped,
                )
        row.update({k: v / max(seen, 1) for k, v in totals.items()})
        row.update({f"method_{k}": v for k, v in method.on_epoch_end(model, ctx).items()})
        row["seconds"] = time.perf_counter() - started
        # the longest any rank waited for its batches (loading, and the call of the copy to
        # the device): with row["seconds"], the share of the epoch spent waiting for data
        row["data_seconds"] = float(
            distributed.all_reduce(torch.tensor(data_seconds, dtype=torch.float64), "max")
        )
        return row

    def _check_ranks(self, session: _Session, when: str) -> None:
        """Under DDP, stop if the ranks no longer hold the same weights, buffers and random
        state: training keeps them identical by construction, so a difference is a bug (a
        method that edits gradients or draws random numbers differently on each rank)."""
        if distributed.world_size() == 1:
            return
        modules = [session.model, session.method_modules]
        for what, digest in (
            ("weights and buffers", distributed.module_digest(modules)),
            ("random generator states", distributed.rng_digest(session.device)),
        ):
            if not distributed.ranks_agree(digest):
                raise RuntimeError(
                    f"the {distributed.world_size()} processes hold different {what} {when} "
                    f"({self.recipe.method.name}); this is a bug in how the method runs under "
                    "DDP (docs/distributed.md)."
                )

    def _non_finite(self, ctx: TrainContext, batch: int, what: str) -> NonFiniteLoss:
        kept = (
            f"{self.run_dir / LAST} keeps the last good state (epoch {self._saved_epoch})"
            if self._saved_epoch is not None
            else "no checkpoint was written yet"
        )
        return NonFiniteLoss(
            f"the training {what} became NaN or infinite at epoch {ctx.epoch + 1}, step "
            f"{ctx.step + 1} (batch {batch} of {ctx.steps_per_epoch}); the run stopped and "
            f"{kept}. Lower optim.lr, or set train.nonfinite: skip to drop such steps "
            "(--resume continues from last.pt)."
        )

    def _ordered_batches(
        self, session: _Session, role: str, positions: np.ndarray | None = None
    ) -> Iterator[Batch]:
        """A split in index order (or `positions`, in their order) without training-time
        randomness, for methods' epoch hooks; the model's train/eval mode is the method's."""
        dataset = ParquetSamples(
            session.datasets[role].root,
            session.datasets[role].split,
            session.model.modalities,
            manifest=session.datasets[role].manifest,
        )
        loader = DataLoader(
            dataset,
            batch_size=self.recipe.train.eval_batch_size,
            shuffle=False,
            sampler=None if positions is None else positions.tolist(),
            collate_fn=collate_batch,
        )
        for batch in loader:
            yield batch.to(session.device)

    def _evaluate(self, session: _Session) -> tuple[dict[str, float], Predictions]:
        """Validation and test metrics, and the test predictions (saved beside best.pt); under
        DDP each rank predicts its share of a split and the shares are gathered."""
        row: dict[str, float] = {}
        for role in ("val", "test"):
            dataset = session.datasets[role]
            share = None
            if distributed.world_size() > 1:
                share = range(*distributed.shard_bounds(len(dataset)))
            preds = predict(
                session.model,
                dataset,
                session.device,
                batch_size=self.recipe.train.eval_batch_size,
                precision=self.recipe.train.precision,
                positions=share,
            ).gathered()
            row.update(preds.metrics(role))
        return row, preds

    def _save(self, file_name: str, session: _Session, extra: dict[str, Any]) -> None:
        """A checkpoint names its recipe and data, so `mmval value` needs nothing else. Under
        DDP rank 0 writes it."""
        if file_name == LAST:
            self._saved_epoch = int(extra["epoch"])
        if not distributed.is_main():
            return
        payload = {
            "recipe": self.recipe_dump,
            "data": session.data_info,
            "model": session.model.state_dict(),
            **extra,
        }
        previous = self.run_dir / PREVIOUS if file_name == LAST else None
        save_checkpoint(self.run_dir / file_name, payload, previous=previous)

    @staticmethod
    def _training_state(session: _Session, state: _RunState) -> dict[str, Any]:
        scheduler = session.scheduler
        return {
            "epoch": state.epoch,
            "optimizer": session.optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "sampler": session.sampler.state_dict(),
            "method": session.method.state_dict(),
            "method_modules": session.method_modules.state_dict(),
            "rng": _rng_state(session.device),
            "run_state": state.as_dict(),
        }

    def _restore(self, session: _Session) -> _RunState:
        """Continue from last.pt (or last.prev.pt); under DDP rank 0 picks the file and checks
        it, then every rank loads it."""
        loaded: dict[str, Any] = {}

        def pick() -> str:
            last = self.run_dir / LAST
            ckpt, used = load_latest_checkpoint(last, self.run_dir / PREVIOUS)
            if _resume_key(current_dump(ckpt["recipe"])) != _resume_key(self.recipe_dump):
                raise UserError(
                    f"cannot resume {self.run_dir}: the recipe differs from the one the run was "
                    "started with (only train.epochs, train.device, train.workers, "
                    "train.prefetch, train.channels_last, train.compile, train.tensorboard and "
                    "train.nonfinite may change)."
                )
            if used != last and last.is_file():  # set aside, so the next save cannot keep it
                last.replace(last.with_name(LAST + ".corrupt"))
            loaded["ckpt"] = ckpt
            return str(used)

        used = distributed.on_main(pick)
        ckpt = loaded["ckpt"] if "ckpt" in loaded else load_checkpoint(Path(used))
        session.model.load_state_dict(ckpt["model"])
        session.optimizer.load_state_dict(ckpt["optimizer"])
        if session.scheduler is not None and ckpt["scheduler"] is not None:
            session.scheduler.load_state_dict(ckpt["scheduler"])
        session.sampler.load_state_dict(ckpt["sampler"])
        session.method.load_state_dict(ckpt["method"])
        if "method_modules" in ckpt:  # absent from runs started before methods had modules
            session.method_modules.load_state_dict(ckpt["method_modules"])
        _set_rng_state(ckpt["rng"], session.device)
        self._saved_epoch = int(ckpt["epoch"])
        return _RunState.from_dict(ckpt["run_state"])

    def _summary(self, manifest: DataManifest, label: str, state: _RunState) -> dict[str, Any]:
        best = next(r for r in state.rows if r["epoch"] == state.best_epoch)
        final = state.rows[-1]
        return {
            "finished": True,
            "dataset": manifest.dataset,
            "method": label,
            "recipe_name": self.recipe.name,
            "settings_hash": self.recipe.settings_hash(),
            "mmval_version": __version__,
            "seed": self.seed,
            "epochs": self.recipe.train.epochs,
            "best_epoch": state.best_epoch,
            **{k: best[k] for k in ("val_acc", "val_f1", "test_acc", "test_f1")},
            "final_test_acc": final["test_acc"],
            "final_test_f1": final["test_f1"],
            "train_seconds": sum(r["seconds"] for r in state.rows),
            "processes": distributed.world_size(),
            "recipe": self.recipe_dump,
        }


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


@dataclass
class _RunState:
    epoch: int = 0
    step: int = 0
    best_val: float = -math.inf
    best_epoch: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> _RunState:
        return cls(**state)


def _run_label(recipe: Recipe) -> str:
    """Report name: plain training is named after its fusion (concat, sum, film, ...)."""
    assert recipe.model.fusion is not None  # a recipe gives the method's own fusion
    fusion = recipe.model.fusion.name
    if recipe.method.name == "concat":
        return fusion
    label = recipe.method.label()
    return label if fusion == recipe.method.fusion else f"{label}+{fusion}"


def _write_predictions(path: Path, sample_ids: list[str], preds: Predictions) -> None:
    """Per-sample test predictions of best.pt, for `mmval report`'s paired bootstrap."""
    frame = pd.DataFrame(
        {"sample_id": sample_ids, "label": preds.labels, "pred": preds.logits.argmax(1)}
    )
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _write_metrics(path: Path, rows: list[dict[str, float]]) -> None:
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_parquet(tmp, index=False)
