"""The one training loop: data, forward, method hooks, evaluation, checkpoints, resume.

Methods change training only through the hooks of `mmval.methods.base.Method`; nothing here
knows about any particular method.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from mmval import __version__
from mmval.atomic import atomic_path, remove_stale_temps, write_text_atomic
from mmval.data.dataset import Batch, BlockShuffleSampler, ParquetSamples, collate_batch
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.shards import MANIFEST, DataManifest, check_data_dir
from mmval.data.sources import SOURCES
from mmval.engine.checkpoint import load_latest_checkpoint, save_checkpoint
from mmval.engine.metrics import accuracy, macro_f1
from mmval.engine.tensorboard import epoch_writer
from mmval.errors import UserError
from mmval.methods import Method, TrainContext, build_method
from mmval.methods.base import StepTools
from mmval.models import MultimodalModel, build_model
from mmval.recipe import DataConfig, OptimConfig, Recipe, check_against_data
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
    (`train.nonfinite: stop`) or drops the step (`skip`), before the optimizer changes anything."""

    skip: bool = False
    skipped: int = 0

    def step(self) -> None:
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
    """Check the data directory; prepare a built-in data set that needs no raw files."""
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


@torch.no_grad()
def predict(
    model: MultimodalModel,
    dataset: ParquetSamples,
    device: torch.device,
    *,
    batch_size: int,
    precision: str = "fp32",
) -> Predictions:
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
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


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _resume_key(recipe: dict[str, Any]) -> dict[str, Any]:
    """What must match to continue a run: everything but the epoch count, host details and
    valuation (which does not change training)."""
    key = json.loads(json.dumps(recipe))
    for name in ("epochs", "device", "workers", "tensorboard", "nonfinite"):
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
        return summary if summary.get("recipe") == self.recipe_dump else None

    def run(self) -> RunResult:
        run_dir, epochs = self.run_dir, self.recipe.train.epochs
        summary_path = run_dir / SUMMARY
        if not self.overwrite and (summary := self.finished_summary()) is not None:
            return RunResult(run_dir, skipped=True, summary=summary)
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
        session = self._build()
        state = _RunState()
        if self.resume and started:
            state = self._restore(session)
        label = _run_label(self.recipe)
        session.sampler.set_epoch(state.epoch)  # len(loader): a whole epoch, also after resume
        self.callbacks.on_start(f"{label} seed{self.seed}", epochs, len(session.loader))
        with (
            open(run_dir / LOG, "a", encoding="utf-8") as log,
            epoch_writer(run_dir, state.rows, enabled=self.recipe.train.tensorboard) as tensorboard,
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
                )
                row = self._train_epoch(session, ctx)
                state.step = ctx.step
                if session.scheduler is not None:
                    session.scheduler.step()
                if (epoch + 1) % self.recipe.train.eval_every == 0 or epoch + 1 == epochs:
                    metrics, test_preds = self._evaluate(session)
                    row.update(metrics)
                    if row["val_acc"] > state.best_val:
                        state.best_val, state.best_epoch = row["val_acc"], epoch + 1
                        self._save(BEST, session, {"epoch": epoch + 1, "metrics": row})
                        _write_predictions(
                            run_dir / PREDICTIONS, session.datasets["test"].sample_ids, test_preds
                        )
                if session.valuation is not None:
                    session.valuation.after_epoch(session.model, epoch + 1, run_dir)
                state.rows.append(row)
                state.epoch = epoch + 1
                _write_metrics(run_dir / METRICS, state.rows)
                log.write(json.dumps(row) + "\n")
                log.flush()
                tensorboard(row)
                if state.epoch % self.recipe.train.checkpoint_every == 0 or state.epoch == epochs:
                    self._save(LAST, session, self._training_state(session, state))
                self.callbacks.on_epoch(row)
        summary = self._summary(session.manifest, label, state)
        write_text_atomic(summary_path, json.dumps(summary, indent=2) + "\n")
        return RunResult(run_dir, skipped=False, summary=summary)

    def _build(self) -> _Session:
        recipe = self.recipe
        device = resolve_device(recipe.train.device)
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
        empty = [f"{role} ({d.split})" for role, d in datasets.items() if len(d) == 0]
        if empty:
            raise UserError(
                f"the data in {data_dir} has no samples in split(s) {', '.join(empty)}; every "
                "role needs samples (see data.splits in the recipe, or re-run `mmval prep` "
                "without --limit/--splits)."
            )
        torch.manual_seed(self.seed)
        model = build_model(recipe.model, specs, len(manifest.classes)).to(device)
        method_modules = method.build_modules(model).to(device)
        optimizer = build_optimizer(
            recipe.optim, [*model.parameters(), *method_modules.parameters()]
        )
        sampler = BlockShuffleSampler(datasets["train"].block_ids(), seed=self.seed)
        loader = DataLoader(
            datasets["train"],
            batch_size=recipe.train.batch_size,
            sampler=sampler,
            num_workers=recipe.train.workers,
            pin_memory=device.type == "cuda",
            collate_fn=collate_batch,
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
        )

    def _train_epoch(self, session: _Session, ctx: TrainContext) -> dict[str, float]:
        started = time.perf_counter()
        model, method, optimizer = session.model, session.method, session.optimizer
        session.sampler.set_epoch(ctx.epoch)
        session.datasets["train"].set_epoch(ctx.epoch)  # workers are re-created each epoch
        session.sampler.set_positions(method.train_positions(ctx))
        model.train()
        method.on_epoch_start(model, ctx)
        loss_sum, correct, seen = 0.0, 0, 0
        method_sums: dict[str, float] = {}
        tools = _GuardedTools(
            optimizer,
            functools.partial(autocast, session.device, self.recipe.train.precision),
            skip=self.recipe.train.nonfinite == "skip",
        )
        for number, batch in enumerate(session.loader, 1):
            batch = batch.to(session.device)
            skipped = tools.skipped
            try:
                result = method.train_step(model, batch, ctx, tools)
            except _NonFiniteStep:
                raise self._non_finite(ctx, number, "gradient") from None
            loss = float(result.loss)
            if not math.isfinite(loss):
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
        row: dict[str, float] = {
            "epoch": ctx.epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen if seen else math.nan,  # nan: every step skipped
            "train_acc": correct / seen if seen else math.nan,
        }
        if tools.skip:
            row["skipped_steps"] = tools.skipped
            if tools.skipped:
                logger.warning(
                    "warning: epoch %d: %d step(s) with a NaN or infinite loss or gradient "
                    "skipped (train.nonfinite: skip).",
                    ctx.epoch + 1,
                    tools.skipped,
                )
        row.update({f"method_{k}": v / max(seen, 1) for k, v in method_sums.items()})
        row.update({f"method_{k}": v for k, v in method.on_epoch_end(model, ctx).items()})
        row["seconds"] = time.perf_counter() - started
        return row

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
        """Validation and test metrics, and the test predictions (saved beside best.pt)."""
        row: dict[str, float] = {}
        for role in ("val", "test"):
            preds = predict(
                session.model,
                session.datasets[role],
                session.device,
                batch_size=self.recipe.train.eval_batch_size,
                precision=self.recipe.train.precision,
            )
            row.update(preds.metrics(role))
        return row, preds

    def _save(self, file_name: str, session: _Session, extra: dict[str, Any]) -> None:
        """A checkpoint names its recipe and data, so `mmval value` needs nothing else."""
        payload = {
            "recipe": self.recipe_dump,
            "data": session.data_info,
            "model": session.model.state_dict(),
            **extra,
        }
        previous = self.run_dir / PREVIOUS if file_name == LAST else None
        save_checkpoint(self.run_dir / file_name, payload, previous=previous)
        if file_name == LAST:
            self._saved_epoch = int(extra["epoch"])

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
            "rng": _rng_state(),
            "run_state": state.as_dict(),
        }

    def _restore(self, session: _Session) -> _RunState:
        last = self.run_dir / LAST
        ckpt, used = load_latest_checkpoint(last, self.run_dir / PREVIOUS)
        if _resume_key(ckpt["recipe"]) != _resume_key(self.recipe_dump):
            raise UserError(
                f"cannot resume {self.run_dir}: the recipe differs from the one the run was "
                "started with (only train.epochs, train.device, train.workers, "
                "train.tensorboard and train.nonfinite may change)."
            )
        if used != last and last.is_file():  # set aside, so the next save cannot keep it
            last.replace(last.with_name(LAST + ".corrupt"))
        session.model.load_state_dict(ckpt["model"])
        session.optimizer.load_state_dict(ckpt["optimizer"])
        if session.scheduler is not None and ckpt["scheduler"] is not None:
            session.scheduler.load_state_dict(ckpt["scheduler"])
        session.sampler.load_state_dict(ckpt["sampler"])
        session.method.load_state_dict(ckpt["method"])
        if "method_modules" in ckpt:  # absent from runs started before methods had modules
            session.method_modules.load_state_dict(ckpt["method_modules"])
        _set_rng_state(ckpt["rng"])
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
            "recipe": self.recipe_dump,
        }


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
    fusion = recipe.model.fusion
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
