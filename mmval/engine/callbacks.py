"""The engine's own callbacks: the rank check, best.pt, last.pt (with resume) and the run files
(metrics.parquet, train.log, predictions.parquet, summary.json). `mmval.runner` lists them in the
order their files must be written in; under DDP only rank 0 writes.
"""

from __future__ import annotations

import json
import os
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

import pandas as pd
import torch

from mmval import __version__, distributed
from mmval.artifacts.checkpoint import (
    Checkpoint,
    TrainingState,
    load_checkpoint,
    load_latest_checkpoint,
    save_checkpoint,
)
from mmval.artifacts.layout import BEST, LAST, LOG, METRICS, PREDICTIONS, PREVIOUS, SUMMARY
from mmval.atomic import WriteError, atomic_path, write_text_atomic
from mmval.engine.cost import model_cost
from mmval.engine.loop import Callback, Fit, FitState, Predictions
from mmval.errors import UserError
from mmval.recipe import Recipe
from mmval.settings import SETTINGS_VERSION, normalised, resume_refusal


class RankCheck(Callback):
    """Under DDP, stop if the ranks no longer hold the same weights, buffers and random state:
    training keeps them identical by construction, so a difference is a bug (a method that edits
    gradients or draws random numbers differently on each rank)."""

    def on_train_start(self, fit: Fit) -> None:
        self._check(fit, "after building the model")

    def on_train_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        self._check(fit, f"after epoch {int(row['epoch'])}")

    @staticmethod
    def _check(fit: Fit, when: str) -> None:
        if distributed.world_size() == 1:
            return
        session = fit.session
        modules = [session.model, session.method_modules]
        for what, digest in (
            ("weights and buffers", distributed.module_digest(modules)),
            ("random generator states", distributed.rng_digest(session.device)),
        ):
            if not distributed.ranks_agree(digest):
                raise RuntimeError(
                    f"the {distributed.world_size()} processes hold different {what} {when} "
                    f"({fit.recipe.method.name}); this is a bug in how the method runs under "
                    "DDP (docs/distributed.md)."
                )


def _checkpoint(fit: Fit, **extra: Any) -> Checkpoint:
    """A checkpoint names its recipe and data, so `mmval value` needs nothing else."""
    return Checkpoint(
        recipe=fit.recipe.model_dump(mode="json"),
        data=fit.session.data_info,
        model=fit.session.model.state_dict(),
        **extra,
    )


class BestCheckpoint(Callback):
    """best.pt: the weights of the epoch with the best selection metric so far (the task's, or
    train.select_on; on test under the published protocol)."""

    def on_evaluated(
        self, fit: Fit, row: dict[str, float], predictions: Predictions, best: bool
    ) -> None:
        if best and distributed.is_main():
            save_checkpoint(
                fit.run_dir / BEST, _checkpoint(fit, epoch=int(row["epoch"]), metrics=row)
            )


class LastCheckpoint(Callback):
    """last.pt every `train.checkpoint_every` epochs and after the last, with everything a
    resumed run needs (optimizer, scheduler, sampler, method state, RNG, the loop's state); the
    file it replaces stays as last.prev.pt. With `resume`, the run continues from it."""

    def __init__(self, *, resume: bool) -> None:
        self.resume = resume

    def on_fit_start(self, fit: Fit) -> None:
        if self.resume:
            self._restore(fit)

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        state, every = fit.state, fit.recipe.train.checkpoint_every
        if state.epoch % every and state.epoch != fit.epochs and state.stopped_epoch is None:
            return
        fit.saved_epoch = state.epoch
        if distributed.is_main():
            training = _training_state(fit)
            checkpoint = _checkpoint(fit, epoch=state.epoch, training=training)
            save_checkpoint(fit.run_dir / LAST, checkpoint, previous=fit.run_dir / PREVIOUS)

    def _restore(self, fit: Fit) -> None:
        """Continue from last.pt (or last.prev.pt); under DDP rank 0 picks the file and checks
        it, then every rank loads it."""
        loaded: dict[str, Checkpoint] = {}

        def pick() -> str:
            last = fit.run_dir / LAST
            ckpt, used = load_latest_checkpoint(last, fit.run_dir / PREVIOUS)
            started = normalised(Recipe, ckpt.recipe)
            refusal = (
                "the recipe it was started with is not valid for this mmval version"
                if started is None
                else resume_refusal(started, fit.recipe)
            )
            if refusal is not None:
                raise UserError(f"cannot resume {fit.run_dir}: {refusal}.")
            if used != last and last.is_file():  # set aside, so the next save cannot keep it
                last.replace(last.with_name(LAST + ".corrupt"))
            loaded["ckpt"] = ckpt
            return str(used)

        used = distributed.on_main(pick)
        ckpt = loaded["ckpt"] if "ckpt" in loaded else load_checkpoint(Path(used))
        if ckpt.training is None:
            raise UserError(f"cannot resume {fit.run_dir}: {used} holds no training state.")
        session, training = fit.session, ckpt.training
        session.model.load_state_dict(ckpt.model)
        session.optimizer.load_state_dict(training.optimizer)
        if session.scheduler is not None and training.scheduler is not None:
            session.scheduler.load_state_dict(training.scheduler)
        session.sampler.load_state_dict(training.sampler)
        session.method.load_state_dict(training.method)
        if training.method_modules is not None:  # absent from runs before methods had modules
            session.method_modules.load_state_dict(training.method_modules)
        _set_rng_state(training.rng, session.device)
        fit.saved_epoch = ckpt.epoch
        fit.state = FitState.from_dict(training.run_state)


def _training_state(fit: Fit) -> TrainingState:
    session = fit.session
    scheduler = session.scheduler
    return TrainingState(
        optimizer=session.optimizer.state_dict(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        sampler=session.sampler.state_dict(),
        method=session.method.state_dict(),
        method_modules=session.method_modules.state_dict(),
        rng=_rng_state(session.device),
        run_state=fit.state.as_dict(),
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


class RunFiles(Callback):
    """metrics.parquet and train.log after every epoch, predictions.parquet beside best.pt,
    summary.json at the end (`label` names the run in reports), with the model's cost counted
    when training starts (`mmval.engine.cost`). The summary is made on every rank
    (`self.summary`); rank 0 writes."""

    def __init__(self, *, label: str) -> None:
        self.label = label
        self.summary: dict[str, Any] = {}
        self.cost: dict[str, int] = {}
        self._log: IO[str] | None = None

    def on_train_start(self, fit: Fit) -> None:
        session = fit.session
        sample = session.datasets["val"].__getitems__([0]).to(session.device)
        self.cost = model_cost(session.model, session.task, sample.inputs)
        if distributed.is_main():
            self._log = open(fit.run_dir / LOG, "a", encoding="utf-8")  # noqa: SIM115

    def on_evaluated(
        self, fit: Fit, row: dict[str, float], predictions: Predictions, best: bool
    ) -> None:
        if best and distributed.is_main():
            _write_predictions(
                fit.run_dir / PREDICTIONS, fit.session.datasets["test"].sample_ids, predictions
            )

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        if self._log is None:  # not rank 0
            return
        with atomic_path(fit.run_dir / METRICS) as tmp:
            pd.DataFrame(fit.state.rows).to_parquet(tmp, index=False)
        self._append_log(fit.run_dir / LOG, json.dumps(row) + "\n")

    def _append_log(self, path: Path, line: str) -> None:
        """Append one whole line to train.log: a write the file system refuses (disk full) is
        cut back to the lines before it and raised as a `WriteError` naming the log."""
        assert self._log is not None
        size = path.stat().st_size  # flushed after every line: the whole lines so far
        try:
            self._log.write(line)
            self._log.flush()
        except OSError as exc:
            with suppress(OSError):
                self._log.close()  # flushes the rest of the line again, and fails again
            self._log = None
            with suppress(OSError):
                os.truncate(path, size)
            raise WriteError.of(path, exc) from exc

    def on_fit_end(self, fit: Fit) -> None:
        self.summary = run_summary(fit, self.label, self.cost)
        if distributed.is_main():
            text = json.dumps(self.summary, indent=2) + "\n"
            write_text_atomic(fit.run_dir / SUMMARY, text)

    def teardown(self, fit: Fit) -> None:
        if self._log is not None:
            with suppress(OSError):
                self._log.close()
            self._log = None


def run_summary(fit: Fit, label: str, cost: dict[str, int]) -> dict[str, Any]:
    """summary.json: what the report reads of a finished run (`cost`: `model_cost`'s)."""
    state, recipe, task = fit.state, fit.recipe, fit.session.task
    selected = fit.session.selection
    headline = task.headline
    # the selection metric's values too, when it is not a headline one (val_loss)
    copied = (*headline, *(() if selected.metric in headline else (selected.metric,)))
    chosen = recipe.train.select_on != "auto"
    stopping = recipe.train.early_stopping
    best = next(r for r in state.rows if r["epoch"] == state.best_epoch)
    final = state.rows[-1]
    return {
        "finished": True,
        "dataset": fit.session.manifest.dataset,
        # what the data is (the manifest records where its inputs came from): reports name it
        "data_fingerprint": fit.session.data_info.fingerprint,
        "method": label,
        "recipe_name": recipe.name,
        "settings_hash": recipe.settings_hash(),
        "settings_version": SETTINGS_VERSION,
        "mmval_version": __version__,
        "seed": fit.seed,
        "epochs": recipe.train.epochs,
        "best_epoch": state.best_epoch,
        "protocol": recipe.train.protocol,
        **(
            {}
            if task.kind == "classification" and not chosen
            else {
                "task": task.kind,
                "headline": headline,
                "selected_on": selected.metric,
                "higher_is_better": selected.higher_is_better,
            }
        ),
        **(
            {}
            if stopping is None
            else {
                "stopped_early": state.stopped_epoch is not None,
                "epochs_trained": state.epoch,
            }
        ),
        **{f"{split}_{k}": best[f"{split}_{k}"] for split in ("val", "test") for k in copied},
        **{f"final_test_{k}": final[f"test_{k}"] for k in headline},
        "train_seconds": sum(r["seconds"] for r in state.rows),
        "processes": distributed.world_size(),
        **cost,
        "recipe": recipe.model_dump(mode="json"),
    }


def _write_predictions(path: Path, sample_ids: list[str], preds: Predictions) -> None:
    """Per-sample test predictions of best.pt, for `mmval report`'s paired bootstrap."""
    frame = pd.DataFrame({"sample_id": sample_ids, **preds.columns()})
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
