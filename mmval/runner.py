"""`Trainer`: one recipe with one seed trained into `output/name/seed<k>/`.

Above the engine: it prepares the run folder (or finds the run finished), builds the session and
the callbacks, valuation during training included, and runs `mmval.engine.loop.fit`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mmval import distributed
from mmval.artifacts.layout import (
    EVALUATE_DIR,
    LAST,
    PREVIOUS,
    RECIPE_FILE,
    TB_DIR,
    read_summary,
    run_files,
    run_folder,
    run_folder_state,
)
from mmval.atomic import remove_stale_temps, write_text_atomic
from mmval.engine.callbacks import BestCheckpoint, LastCheckpoint, RankCheck, RunFiles
from mmval.engine.loop import Callback, Fit, fit
from mmval.engine.session import Session, build_session, resolve_device
from mmval.engine.tensorboard import TensorBoard
from mmval.engine.tracking import MLflowTracking
from mmval.errors import UserError
from mmval.locks import LOCK_FILE, locked
from mmval.models.encoders import trusting_code
from mmval.recipe import Recipe
from mmval.settings import SAME_RUN, changes, identity, normalised
from mmval.valuation.evaluate import evaluate_run
from mmval.valuation.training import EpochValuation


@dataclass
class RunResult:
    run_dir: Path
    skipped: bool
    summary: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains one recipe with one seed into `output/name/seed<k>/`; `callbacks` (progress, ...)
    come after the run's own, and `title` names the run for them (default: its report label
    and seed)."""

    def __init__(
        self,
        recipe: Recipe,
        seed: int,
        *,
        resume: bool = False,
        overwrite: bool = False,
        callbacks: Sequence[Callback] = (),
        title: str | None = None,
    ) -> None:
        self.recipe = recipe.for_seed(seed)
        self.seed = seed
        self.resume = resume
        self.overwrite = overwrite
        self.callbacks = list(callbacks)
        self.title = title or f"{self.recipe.run_label()} seed{seed}"
        self.run_dir = run_folder(recipe.output, recipe.name, seed)

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of this very run if it already finished (the same recipe but for its
        `evaluate:` section, compared as today's recipe model reads both, so that runs of older
        mmval versions and moved run folders are recognised), else None."""
        summary = read_summary(self.run_dir)
        stored = self._finished_recipe(summary)
        if summary is None or stored is None:
            return None
        if identity(stored, SAME_RUN) != identity(self.recipe, SAME_RUN):
            return None
        return summary

    def _finished_recipe(self, summary: dict[str, Any] | None) -> Recipe | None:
        """The recipe a finished run's summary records, read by today's model, with this
        recipe's `evaluate:` section: what is evaluated after training is read from best.pt, so
        a new `evaluate:` section adds tables to the finished run, it does not make another."""
        if summary is None:
            return None
        stored = normalised(Recipe, summary.get("recipe", {}))
        if stored is None:
            return None
        return stored.model_copy(update={"evaluate": self.recipe.evaluate})

    def start_refusal(self) -> str | None:
        """Why this run cannot start in its folder as asked, read from the folder's files alone
        (nothing is loaded or written): a finished run of another setting (with or without
        --resume), or a started one without --resume or --overwrite; None if it may start (or
        is finished). An unfinished run whose recipe differs is refused when its checkpoint is
        read (`LastCheckpoint`), before anything is written."""
        run_dir = self.run_dir
        if self.overwrite:
            return None
        summary = read_summary(run_dir)
        stored = self._finished_recipe(summary)
        if summary is not None and stored is not None:
            if identity(stored, SAME_RUN) == identity(self.recipe, SAME_RUN):
                return None
            fixed = changes(stored, self.recipe)
            if fixed:
                return (
                    f"{run_dir} holds a finished run whose recipe differs in {fixed}; a finished "
                    "run is kept as it is (--resume continues only what --resume may change): "
                    "pass --set name=... for a new run, or --overwrite to replace it."
                )
            if not self.resume:
                free = changes(stored, self.recipe, SAME_RUN)
                return (
                    f"{run_dir} holds a finished run of this recipe but for {free}; pass "
                    "--resume to continue it with the new values, --overwrite to start again, "
                    "or --set name=... for a new run."
                )
            return None
        started = (run_dir / LAST).is_file() or (run_dir / PREVIOUS).is_file()
        if started and not self.resume:
            return (
                f"{run_dir} holds a run of this name that has not finished; pass --resume to "
                "continue it, --overwrite to start again, or --set name=... for a new run."
            )
        return None

    def run(self) -> RunResult:
        """Train (or find finished) and evaluate the run, holding its folder's lock from the
        opening of the folder to the end of its `evaluate:` tables (rank 0 only: the other ranks
        write nothing there)."""
        device = distributed.setup(resolve_device(self.recipe.train.device))
        with contextlib.ExitStack() as held:
            return self._run(device, held)

    def _run(self, device: torch.device, held: contextlib.ExitStack) -> RunResult:
        summary, started = distributed.on_main(lambda: self._open_run_dir(held))
        if summary is not None:
            distributed.on_main(lambda: self._evaluate(device))
            return RunResult(self.run_dir, skipped=True, summary=summary)
        session = build_session(self.recipe, self.seed, device)
        files = RunFiles(label=self.recipe.run_label())
        # in the order the files of an epoch are written: contributions, best.pt and its
        # predictions, metrics and log, TensorBoard, last.pt, MLflow; then the caller's
        # (progress)
        callbacks: list[Callback] = [_StartRun(overwrite=self.overwrite), RankCheck()]
        callbacks += self._valuation(session)
        callbacks += [BestCheckpoint(), files, TensorBoard()]
        # MLflow after the run's own files: it sends summary.json once written
        callbacks += [LastCheckpoint(resume=self.resume and started), MLflowTracking(self.recipe)]
        callbacks += self.callbacks
        fit(Fit(self.recipe, self.seed, self.run_dir, session, self.title), callbacks)
        distributed.on_main(lambda: self._evaluate(device))
        return RunResult(self.run_dir, skipped=False, summary=files.summary)

    def _evaluate(self, device: torch.device) -> None:
        """The recipe's `evaluate:` tables of best.pt, those not written yet (a finished run
        rerun with a new `evaluate:` section gets them without training again)."""
        recipe = self.recipe
        if recipe.evaluate is None:
            return
        with trusting_code():  # best.pt's recipe is this run's: its python encoders are ours
            evaluate_run(
                recipe.evaluate,
                self.run_dir,
                split=getattr(recipe.data.splits, recipe.evaluate.split),
                data_dir=recipe.data.directory(),
                device=str(device),
                batch_size=recipe.train.eval_batch_size,
            )

    def _valuation(self, session: Session) -> list[Callback]:
        """The recipe's valuation during training, built before the first epoch, so that a
        setting it cannot run fails before training starts."""
        recipe = self.recipe
        if recipe.valuation is None:
            return []
        valuation = EpochValuation(
            recipe.valuation,
            data_dir=recipe.data.directory(),
            manifest=session.manifest,
            modalities=session.modalities,
            split=getattr(recipe.data.splits, recipe.valuation.split),
            train_split=recipe.data.splits.train,
            seed=self.seed,
            device=session.device,
            batch_size=recipe.train.eval_batch_size,
            task=session.task,
        )
        return [_Valuation(valuation)]

    def _open_run_dir(self, held: contextlib.ExitStack) -> tuple[dict[str, Any] | None, bool]:
        """(the summary of this very run if it finished, else None; whether a run was started
        here): locks the run folder for `held` and prepares it. Under DDP only rank 0 calls it."""
        run_dir = self.run_dir
        held.enter_context(locked(run_dir, folder=True, what=f"run folder {run_dir}"))
        if run_folder_state(run_dir) == "foreign":
            held_files = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
            listed = ", ".join(held_files[:3]) + (
                f" and {len(held_files) - 3} more" if held_files[3:] else ""
            )
            raise UserError(
                f"{run_dir} is not an mmval run folder: it holds {listed}, but no {RECIPE_FILE}. "
                "mmval neither writes into nor deletes from another program's folder: change "
                "the recipe's output: or name: (--set name=...), or move those files away."
            )
        if not self.overwrite and (summary := self.finished_summary()) is not None:
            return summary, False
        if (refusal := self.start_refusal()) is not None:
            raise UserError(refusal)
        started = not self.overwrite and (
            (run_dir / LAST).is_file() or (run_dir / PREVIOUS).is_file()
        )
        return None, started


class _StartRun(Callback):
    """What starting (or resuming) a run changes in its folder, done once nothing can refuse it
    any more (the session is built, the data checked, a resumed run's checkpoint read and its
    recipe accepted): `--overwrite` clears the old run, a killed run's temp files go and
    recipe.yaml is written. A refused start leaves the folder as it was. Rank 0 only."""

    def __init__(self, *, overwrite: bool) -> None:
        self.overwrite = overwrite

    def on_train_start(self, fit: Fit) -> None:
        if not distributed.is_main():
            return
        run_dir = fit.run_dir
        if self.overwrite:
            _clear_run(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(run_dir)  # left by a killed run's interrupted writes
        dump = fit.recipe.model_dump(mode="json")
        write_text_atomic(run_dir / RECIPE_FILE, yaml.safe_dump(dump, sort_keys=False))


def _clear_run(run_dir: Path) -> None:
    """Delete the files of a run folder that mmval wrote (known by name), and tb/ and evaluate/
    once empty; the user's files stay."""
    for path in run_files(run_dir):
        path.unlink(missing_ok=True)
    for folder in (TB_DIR, EVALUATE_DIR):
        with contextlib.suppress(OSError):  # not there, or it holds the user's files
            (run_dir / folder).rmdir()


class _Valuation(Callback):
    """Runs the recipe's valuation after each epoch (rank 0; it writes its own files): the
    engine knows no valuation code, and valuation knows no engine."""

    def __init__(self, valuation: EpochValuation) -> None:
        self.valuation = valuation

    def on_epoch_end(self, fit: Fit, row: dict[str, float]) -> None:
        if distributed.is_main():
            self.valuation.after_epoch(fit.session.model, fit.state.epoch, fit.run_dir)
