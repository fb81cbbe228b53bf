"""The one training loop: `fit` runs the epochs over `train_one_epoch` and `evaluate` and tells
its callbacks what happens; checkpoints, run files, TensorBoard, the rank check, progress and
valuation during training are callbacks (`mmval.engine.callbacks`, `mmval.runner`).

Methods change training only through the hooks of `mmval.methods.base.Method`; nothing here
knows about any particular method.

Under torchrun (or `mmval train --nproc N`) the same loop runs in every process: each rank
trains on its part of every global batch, gradients are averaged over ranks by `StepTools` (no
DistributedDataParallel wrapper, so that methods keep reading the model's parts, running several
backward passes and editing gradients), evaluation is split over the ranks and gathered, and
epoch figures are reduced. docs/distributed.md has the design.

Events, in the order `fit` sends them (each to every callback, in list order):

- `on_fit_start(fit)`: the session is built; a callback that keeps a run's state restores a
  resumed run here (`fit.state`, the session's weights, optimizer, RNG, ...).
- `on_train_start(fit)`: the state is final; `fit.state.epoch` epochs are done.
- per epoch:
  - `on_train_epoch_start(fit, steps)`: the epoch's positions are drawn; it takes `steps`
    steps (re-sampling methods add copies; a resumed epoch counts only what is left).
  - `on_train_step(fit)`: after each step (also one skipped under `train.nonfinite: skip`),
    after a per-step learning-rate schedule advanced.
  - `on_train_epoch_end(fit, row)`: after the epoch's last step (row: its training figures),
    before a per-epoch schedule advances and before evaluation.
  - `on_evaluated(fit, row, predictions, best)`: on evaluation epochs: row now holds the val_
    and test_ metrics (the task's loss as val_loss, test_loss), predictions are the test
    split's, best says whether the selection metric (`Session.selection`) improved
    (`fit.state.best_epoch` is then this epoch); a plateau schedule has advanced.
  - `on_epoch_end(fit, row)`: the row is complete and in `fit.state.rows`; after it the loop
    ends when early stopping stopped the run (`fit.state.stopped_epoch`).
- `on_fit_end(fit)`: every epoch is done, or early stopping ended the run (not sent when
  training stops with an error).
- `teardown(fit)`: always, last, also after an error: close what was opened.
"""

from __future__ import annotations

import functools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from mmval import distributed
from mmval.artifacts.layout import LAST
from mmval.data.dataset import Batch, ParquetSamples, collate_batch
from mmval.engine.freeze import group_columns
from mmval.engine.session import Session, autocast
from mmval.errors import UserError
from mmval.methods import TrainContext
from mmval.methods.base import StepTools
from mmval.metrics import accuracy
from mmval.models import ModelOutput, MultimodalModel
from mmval.recipe import Recipe
from mmval.tasks import Task

logger = logging.getLogger(__name__)


class NonFiniteLoss(UserError):
    """A NaN or infinite loss or gradient stopped the run (`train.nonfinite: stop`)."""


class _NonFiniteStep(Exception):
    """Raised by `_GuardedTools.step` before the update; `train_one_epoch` names where."""


@dataclass
class _GuardedTools(StepTools):
    """`StepTools` whose step never applies a NaN or infinite gradient: it raises
    (`train.nonfinite: stop`) or drops the step (`skip`), before the optimizer changes anything.
    Under DDP the check reads the averaged gradients, so every rank decides alike."""

    skip: bool = False
    skipped: int = 0
    clip: float | None = None  # train.clip_grad_norm

    def step(self) -> None:
        """Every optimizer step of a run comes here (a method's own `train_step` calls it after
        its gradient edits): the averaged gradients are checked, clipped to `clip` by their
        total norm (torch's clip_grad_norm_ rule), and applied."""
        self.reduce_gradients()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        params = [p for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else None
        if norm is not None and not torch.isfinite(norm):
            if not self.skip:
                raise _NonFiniteStep
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return
        if norm is not None and self.clip is not None:
            torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
        self.optimizer.step()


@dataclass
class Predictions:
    """What evaluation kept of a split: the task's per-sample arrays (`Task.collect`), each
    modality's own where the fusion has per-modality logits, and the classes of the method's
    other read-outs (`Method.eval_readouts`)."""

    task: Task
    collected: dict[str, np.ndarray]
    unimodal: dict[str, dict[str, np.ndarray]]
    readout_pred: dict[str, np.ndarray] = field(default_factory=dict)
    # the task's loss of the fused output summed over samples (batch means x batch sizes), and
    # the samples: `<split>_loss` of the evaluation row
    loss_sum: float | None = None
    count: int = 0

    def metrics(self, prefix: str) -> dict[str, float]:
        row = self.task.metrics(self.collected, self.unimodal, prefix)
        if self.loss_sum is not None:
            row[f"{prefix}_loss"] = self.loss_sum / max(self.count, 1)
        labels = self.collected["label"]
        for name, rpred in self.readout_pred.items():
            row[f"{prefix}_{name}_acc"] = accuracy(rpred, labels)
        return row

    def columns(self) -> dict[str, np.ndarray]:
        """predictions.parquet's columns besides sample_id."""
        return self.task.prediction_columns(self.collected)

    def gathered(self) -> Predictions:
        """Every rank's predictions in rank order (each rank predicted its share of a split)."""

        def cat(values: np.ndarray) -> np.ndarray:
            return distributed.gather_rows(torch.from_numpy(values)).numpy()

        def cat_all(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {name: cat(values) for name, values in arrays.items()}

        loss_sum = None
        if self.loss_sum is not None:
            summed = torch.tensor([self.loss_sum, self.count], dtype=torch.float64)
            loss_sum, count = distributed.all_reduce(summed).tolist()
        return Predictions(
            task=self.task,
            collected=cat_all(self.collected),
            unimodal={m: cat_all(own) for m, own in self.unimodal.items()},
            readout_pred=cat_all(self.readout_pred),
            loss_sum=loss_sum,
            count=int(count) if loss_sum is not None else self.count,
        )


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: ParquetSamples,
    device: torch.device,
    task: Task,
    *,
    batch_size: int,
    precision: str = "fp32",
    positions: Sequence[int] | None = None,
    readouts: Callable[[MultimodalModel, ModelOutput], dict[str, torch.Tensor]] | None = None,
    loss: bool = False,
) -> Predictions:
    """Predictions for the dataset in order, or for `positions` only (and those of the
    method's other read-outs, `readouts`; with `loss`, the task's loss)."""
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=None if positions is None else list(positions),
        collate_fn=collate_batch,
    )
    collected: list[dict[str, np.ndarray]] = []
    unimodal: dict[str, list[dict[str, np.ndarray]]] = {}
    extra: dict[str, list[torch.Tensor]] = {}
    loss_sum, count = 0.0, 0
    for batch in loader:
        batch = batch.to(device)
        with autocast(device, precision):
            out = task.eval_forward(model, batch.inputs)
            for name, z in ({} if readouts is None else readouts(model, out)).items():
                extra.setdefault(name, []).append(z.argmax(1).cpu())
            if loss:
                loss_sum += float(task.loss(out.logits, batch)) * len(batch)
                count += len(batch)
        collected.append(task.collect(out.logits, batch))
        for m, z in (out.unimodal_logits or {}).items():
            unimodal.setdefault(m, []).append(task.collect(z, batch))
    return Predictions(
        task=task,
        collected=_joined(collected),
        unimodal={m: _joined(parts) for m, parts in unimodal.items()},
        readout_pred={name: torch.cat(v).numpy() for name, v in extra.items()},
        loss_sum=loss_sum if loss else None,
        count=count,
    )


def _joined(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}


@dataclass
class FitState:
    """The loop's progress, kept in last.pt (as `run_state`) so that a resumed run continues."""

    epoch: int = 0  # epochs done
    step: int = 0  # optimizer steps taken
    # the selection score: the task's selection metric on val (test, published protocol),
    # negated when lower is better, so that higher is always better here
    best_val: float = -math.inf
    best_epoch: int = 0
    rows: list[dict[str, float]] = field(default_factory=list)  # every epoch's metrics
    # early stopping (train.early_stopping): the best score by more than min_delta, the
    # evaluations since, and the epoch the run stopped at (None: it did not stop early)
    stop_best: float = -math.inf
    stale: int = 0
    stopped_epoch: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "rows": self.rows,
            "stop_best": self.stop_best,
            "stale": self.stale,
            "stopped_epoch": self.stopped_epoch,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> FitState:
        return cls(**state)  # a state saved before early stopping existed lacks its keys

    def stops(self, score: float, patience: int, min_delta: float) -> bool:
        """Count an evaluation's score for early stopping; whether the run stops here."""
        if score > self.stop_best + min_delta:
            self.stop_best, self.stale = score, 0
            return False
        self.stale += 1
        return self.stale >= patience


@dataclass
class Fit:
    """One run being trained: what the loop and its callbacks share."""

    recipe: Recipe
    seed: int
    run_dir: Path
    session: Session
    title: str  # what progress shows for the run
    state: FitState = field(default_factory=FitState)
    saved_epoch: int | None = None  # the epoch of the newest last.pt, for messages

    @property
    def epochs(self) -> int:
        return self.recipe.train.epochs

    @property
    def steps_per_epoch(self) -> int:
        return len(self.session.loader)


class Callback:
    """Hooks called by `fit` (the module docstring lists them in order); each does nothing
    here, so a callback overrides only what it needs."""

    def on_fit_start(self, fit: Fit) -> None: ...

    def on_train_start(self, fit: Fit) -> None: ...

    def on_train_epoch_start(self, fit: Fit, steps: int) -> None: ...

    def on_train_step(self, fit: Fit) -> None: ...

    def on_train_epoch_end(self, fit: Fit, row: dict[str, float]) -> None: ...

    def on_evaluated(
        self, fit: Fit, row: dict[str, float], predictions: Predictions, best: bool
    ) -> None: ...

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None: ...

    def on_fit_end(self, fit: Fit) -> None: ...

    def teardown(self, fit: Fit) -> None: ...


def fit(run: Fit, callbacks: Sequence[Callback]) -> FitState:
    """Train `run` from `run.state` (after the callbacks' restore) to `train.epochs`."""
    session, train = run.session, run.recipe.train
    try:
        for callback in callbacks:
            callback.on_fit_start(run)
        state = run.state  # as restored
        session.sampler.set_epoch(state.epoch)  # len(loader): a whole epoch, also after resume
        # the published protocol trained on val: best.pt is the best test epoch, as the
        # official codes keep it
        selected, scheduler, stopping = session.selection, session.scheduler, train.early_stopping
        if train.select_on != "auto":
            _check_selection(run)
        for callback in callbacks:
            callback.on_train_start(run)
        # an early-stopped run stays stopped, however many epochs a resume asks for
        last = run.epochs if state.stopped_epoch is None else state.epoch
        for epoch in range(state.epoch, last):
            session.sampler.set_epoch(epoch)  # else len(loader) counts the last epoch's rest
            ctx = TrainContext(
                epoch=epoch,
                epochs=run.epochs,
                step=state.step,
                batches=functools.partial(ordered_batches, run),
                steps_per_epoch=len(session.loader),
                train_size=len(session.datasets["train"]),
                sizes={role: len(d) for role, d in session.datasets.items()},
            )
            row = train_one_epoch(run, ctx, callbacks)
            state.step = ctx.step
            for callback in callbacks:
                callback.on_train_epoch_end(run, row)
            if scheduler is not None:
                scheduler.after_epoch()
            if (epoch + 1) % train.eval_every == 0 or epoch + 1 == run.epochs:
                metrics, test_preds = evaluate(run)
                row.update(metrics)
                score = selected.score(row)
                best = score > state.best_val
                if best:
                    state.best_val, state.best_epoch = score, epoch + 1
                if scheduler is not None:
                    scheduler.after_evaluation(row[selected.column])
                for callback in callbacks:
                    callback.on_evaluated(run, row, test_preds, best)
                if stopping is not None and state.stops(
                    score, stopping.patience, stopping.min_delta
                ):
                    state.stopped_epoch = epoch + 1
                    logger.info(
                        "early stopping after epoch %d: %s has not improved by more than %g "
                        "in %d evaluations",
                        epoch + 1,
                        selected.column,
                        stopping.min_delta,
                        stopping.patience,
                    )
            state.rows.append(row)
            state.epoch = epoch + 1
            for callback in callbacks:
                callback.on_epoch_end(run, row)
            if state.stopped_epoch is not None:
                break
        for callback in callbacks:
            callback.on_fit_end(run)
    finally:
        for callback in callbacks:
            callback.teardown(run)
    if session.gradients is not None:
        session.gradients.close()
    distributed.barrier()  # the run's files are complete when any rank returns
    return run.state


def train_one_epoch(run: Fit, ctx: TrainContext, callbacks: Sequence[Callback]) -> dict[str, float]:
    """One epoch of the method's steps; the epoch's training figures (the row's first part)."""
    started = time.perf_counter()
    session, train = run.session, run.recipe.train
    model, method, optimizer = session.model, session.method, session.optimizer
    session.sampler.set_epoch(ctx.epoch)
    session.datasets["train"].set_epoch(ctx.epoch)
    session.sampler.set_positions(method.train_positions(ctx))
    for callback in callbacks:
        callback.on_train_epoch_start(run, len(session.loader))
    if session.loader.persistent_workers:
        # the draw a new loader iterator takes from the global generator (a persistent one
        # is reused): the random stream, and with it the run, does not depend on workers
        torch.empty((), dtype=torch.int64).random_()
    model.train()
    if session.freezing is not None:  # this epoch's frozen parts, before the method's hook
        session.freezing.apply(ctx.epoch)
    method.on_epoch_start(model, ctx)
    loss_sum, score_sum, seen, data_seconds = 0.0, 0.0, 0, 0.0
    method_sums: dict[str, float] = {}
    tools = _GuardedTools(
        optimizer,
        functools.partial(autocast, session.device, train.precision),
        session.gradients,
        skip=train.nonfinite == "skip",
        clip=train.clip_grad_norm,
    )
    batches = iter(session.loader)
    number = 0
    # the rates the epoch's last step trained with (the default group's first: the `lr` column)
    lrs = [group["lr"] for group in optimizer.param_groups]
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
            raise _non_finite(run, ctx, number, "gradient", batch) from None
        loss = float(result.loss)
        finite = math.isfinite(loss)
        if distributed.world_size() > 1:  # every rank stops or skips alike
            finite = not bool(distributed.all_reduce(torch.tensor(not finite), "max"))
        if not finite:
            if not tools.skip:
                raise _non_finite(run, ctx, number, "loss", batch)
            tools.skipped = max(tools.skipped, skipped + 1)  # and left out of the figures
        else:
            for key, value in result.figures.items():
                method_sums[key] = method_sums.get(key, 0.0) + value * len(batch)
            loss_sum += loss * len(batch)
            score_sum += session.task.train_score(result.logits, batch)
            seen += len(batch)
        ctx.step += 1
        session.sampler.advance(len(batch))
        lrs = [group["lr"] for group in optimizer.param_groups]
        if session.scheduler is not None:
            session.scheduler.after_step()
        for callback in callbacks:
            callback.on_train_step(run)
    totals = distributed.sum_dict(
        {"loss": loss_sum, "score": score_sum, "seen": seen}
        | {f"method_{k}": v for k, v in method_sums.items()}
    )
    seen = int(totals.pop("seen"))
    row: dict[str, float] = {
        "epoch": ctx.epoch + 1,
        "lr": lrs[0],
        **dict(zip(group_columns(run.recipe.optim), lrs[1:], strict=True)),
        "train_loss": totals.pop("loss") / seen if seen else math.nan,  # nan: all skipped
        f"train_{session.task.train_figure}": totals.pop("score") / seen if seen else math.nan,
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


def _non_finite(run: Fit, ctx: TrainContext, number: int, what: str, batch: Batch) -> NonFiniteLoss:
    """The error that stops a run at a non-finite step. It names the inputs when the batch
    holds a NaN or Inf (the step could not be finite whatever the learning rate), and advises
    a lower learning rate only when the inputs are finite."""
    kept = (
        f"{run.run_dir / LAST} keeps the last good state (epoch {run.saved_epoch})"
        if run.saved_epoch is not None
        else "no checkpoint was written yet"
    )
    where = (
        f"the training {what} became NaN or infinite at epoch {ctx.epoch + 1}, step "
        f"{ctx.step + 1} (batch {number} of {ctx.steps_per_epoch}); the run stopped and {kept}."
    )
    inputs = _non_finite_inputs(batch, run.session.datasets["train"])
    if inputs:
        return NonFiniteLoss(
            f"{where} The batch's inputs hold NaN or Inf: {inputs}. Find where they come from "
            "(data.corrupt, or the data folder: `mmval prep` with --overwrite sends such "
            "samples to errors.parquet); train.nonfinite: skip drops such steps."
        )
    return NonFiniteLoss(
        f"{where} Lower optim.lr, or set train.nonfinite: skip to drop such steps "
        "(--resume continues from last.pt)."
    )


def _non_finite_inputs(batch: Batch, dataset: ParquetSamples) -> str:
    """The samples (ids) and modality of each float input of `batch` holding NaN or Inf ("":
    none does)."""
    found = []
    for modality, values in batch.inputs.items():
        if not values.is_floating_point() or bool(torch.isfinite(values).all()):
            continue
        rows = ~torch.isfinite(values.reshape(len(values), -1)).all(1).cpu()
        positions = batch.index[rows].tolist()
        ids = ", ".join(repr(dataset.sample_ids[p]) for p in positions[:5])
        more = f" and {len(positions) - 5} more" if len(positions) > 5 else ""
        found.append(f"modality {modality!r} of sample(s) {ids}{more}")
    return "; ".join(found)


def ordered_batches(run: Fit, role: str, positions: np.ndarray | None = None) -> Iterator[Batch]:
    """A split in index order (or `positions`, in their order) without training-time
    randomness, for methods' epoch hooks; the model's train/eval mode is the method's."""
    session = run.session
    dataset = ParquetSamples(
        session.datasets[role].root,
        session.datasets[role].splits,
        session.model.modalities,
        manifest=session.datasets[role].manifest,
    )
    loader = DataLoader(
        dataset,
        batch_size=run.recipe.train.eval_batch_size,
        shuffle=False,
        sampler=None if positions is None else positions.tolist(),
        collate_fn=collate_batch,
    )
    for batch in loader:
        yield batch.to(session.device)


def _check_selection(run: Fit) -> None:
    """Refuse a `train.select_on` that evaluation does not log, before the first epoch: the
    metrics of one validation sample name what it logs (the random state is kept, so the run
    is the one it would be without this look)."""
    session, selected = run.session, run.session.selection
    rng = torch.get_rng_state()
    try:
        with warnings.catch_warnings():  # metrics of one sample (a correlation) may warn
            warnings.simplefilter("ignore")
            logged = predict(
                session.model,
                session.datasets["val"],
                session.device,
                session.task,
                batch_size=1,
                precision=run.recipe.train.precision,
                positions=[0],
                loss=True,
            ).metrics("val")
    finally:
        torch.set_rng_state(rng)
    if f"val_{selected.metric}" not in logged:
        names = ", ".join(sorted(logged))
        raise UserError(
            f"train.select_on val_{selected.metric}: evaluation of this {session.task.kind} "
            f"run logs no such metric; it logs {names}."
        )


def evaluate(run: Fit) -> tuple[dict[str, float], Predictions]:
    """Validation and test metrics, and the test predictions (saved beside best.pt); under
    DDP each rank predicts its share of a split and the shares are gathered."""
    session, train = run.session, run.recipe.train
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
            session.task,
            batch_size=train.eval_batch_size,
            precision=train.precision,
            positions=share,
            readouts=session.method.eval_readouts,
            loss=True,
        ).gathered()
        row.update(preds.metrics(role))
    return row, preds
