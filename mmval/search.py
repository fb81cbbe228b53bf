"""Hyperparameter search with Optuna: a recipe with `search:` trains trials drawn from a space.

```yaml
name: search-uci-mfeat
seeds: [0, 1]
method: {name: ogm_ge}
data: {dataset: uci-mfeat}
train: {epochs: 20}
search:
  sampler: tpe          # or random
  trials: 20
  seed: 0               # the sampler's
  metric: val_acc       # default: the task's selection metric on validation, its direction
  space:
    optim.lr: {log_uniform: [1e-4, 1e-2]}
    method.alpha: {uniform: [0, 1]}            # `step: 0.05` for a grid of values
    train.batch_size: {choice: [32, 64]}
    model.encoder.out_dim: {int: [16, 128]}
```

Every trial is a normal run folder per seed, `<output>/<name>/trial-0003/seed<k>/`, trained by
`mmval.sweep.run_plan` (so `mmval report` and `mmval value` read it like any run). A trial's
value is the mean over its seeds of `metric` in the row of the epoch best.pt was kept at.

The study lives in `<output>/<name>/optuna.journal`, Optuna's journal file storage: an
append-only log that Optuna fsyncs after every record, which survives a killed process (a torn
last line is cut off before the search continues) and needs no `fcntl` locks in the file system
(SQLite's locking is unsafe on NFS). The search holds mmval's lock on its folder
(`mmval.locks`) while it runs, so one process writes the journal at a time. Running the recipe
again continues the search: finished trials are kept; a trial that was interrupted (Ctrl-C, a
crash, a kill) is tried again with its parameters in its own folder, where finished runs are
read back and a started run needs `--resume`, as in a sweep. A trial that fails with a user
error (a diverging learning rate under `train.nonfinite: stop`, ...) counts as a trial and is
not tried again. The sampler of trial n is seeded from (`seed`, n), so a resumed search draws
the trials an uninterrupted one would have drawn.

After each finished trial the best trial's recipe is written to `<output>/<name>/
best-recipe.yaml` (atomically): training it finds the trial's finished runs; give it another
`name:` and more `seeds:` for the final runs.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import pandas as pd
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    model_validator,
)

from mmval import distributed
from mmval.artifacts.layout import METRICS
from mmval.atomic import write_text_atomic
from mmval.compose import compose_recipe
from mmval.engine.loop import Callback
from mmval.engine.session import ensure_data
from mmval.errors import UserError
from mmval.locks import locked
from mmval.recipe import SWEEP_KEYS, Recipe, _fill_placeholders, check_against_data, parse_recipe
from mmval.settings import SETTING, differing, identity
from mmval.sweep import RunOutcome, SweepPlan, Variant, _assign, run_plan
from mmval.tasks import TASKS
from mmval.validation import format_problems, problems_of

if TYPE_CHECKING:
    import optuna

SEARCH_KEY = "search"
JOURNAL = "optuna.journal"
BEST_RECIPE = "best-recipe.yaml"
STUDY = "search"
SETTINGS_ATTR = "mmval.search"  # what the study was started with, compared on resume
KINDS = ("log_uniform", "uniform", "int", "choice")
# what a trial may not change: its folder, its seeds, its method (one search per method)
UNSEARCHED = ("method", "method.name", "task", "task.name")
UNSEARCHED_SECTIONS = ("name", "seeds", "output", *SWEEP_KEYS)
Number = float | int


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _ordered(low: Number, high: Number) -> None:
    if not low < high:
        raise ValueError(f"the range [{low}, {high}] must have low < high")


class LogUniform(_Strict):
    log_uniform: tuple[float, float] = Field(description="[low, high], sampled on a log scale")

    @model_validator(mode="after")
    def _check(self) -> LogUniform:
        _ordered(*self.log_uniform)
        if self.log_uniform[0] <= 0:
            raise ValueError("a log_uniform range must start above 0")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_float(name, *self.log_uniform, log=True)

    def corners(self) -> list[Any]:
        return list(self.log_uniform)


class Uniform(_Strict):
    uniform: tuple[float, float] = Field(description="[low, high]")
    step: float | None = Field(
        default=None, gt=0, description="draw only low + k * step (a grid Optuna samples)"
    )

    @model_validator(mode="after")
    def _check(self) -> Uniform:
        _ordered(*self.uniform)
        if self.step is not None:
            count = (self.uniform[1] - self.uniform[0]) / self.step
            if abs(count - round(count)) > 1e-9 * max(1.0, count):
                raise ValueError("high - low must be a whole number of steps")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_float(name, *self.uniform, step=self.step)

    def corners(self) -> list[Any]:
        return list(self.uniform)


class IntRange(_Strict):
    range_: tuple[int, int] = Field(alias="int", description="[low, high], both included")
    step: int = Field(default=1, ge=1)
    log: bool = Field(default=False, description="sample on a log scale (step 1 only)")

    @model_validator(mode="after")
    def _check(self) -> IntRange:
        _ordered(*self.range_)
        if self.log and (self.step != 1 or self.range_[0] < 1):
            raise ValueError("a log int range needs step 1 and low >= 1")
        if (self.range_[1] - self.range_[0]) % self.step:
            raise ValueError("high - low must be a whole number of steps")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_int(name, *self.range_, step=self.step, log=self.log)

    def corners(self) -> list[Any]:
        return list(self.range_)


class Choice(_Strict):
    # Optuna stores a choice as itself: a number, string, boolean or null
    choice: list[str | bool | int | float | None] = Field(
        min_length=1, description="the values to choose among"
    )

    @model_validator(mode="after")
    def _check(self) -> Choice:
        if len({json.dumps(v) for v in self.choice}) != len(self.choice):
            raise ValueError("the choices repeat")
        return self

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choice)

    def corners(self) -> list[Any]:
        return list(self.choice)


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return next((k for k in KINDS if k in value), None)
    return {LogUniform: "log_uniform", Uniform: "uniform", IntRange: "int", Choice: "choice"}.get(
        type(value)
    )


Distribution = Annotated[
    Annotated[LogUniform, Tag("log_uniform")]
    | Annotated[Uniform, Tag("uniform")]
    | Annotated[IntRange, Tag("int")]
    | Annotated[Choice, Tag("choice")],
    Discriminator(
        _kind,
        custom_error_type="distribution",
        custom_error_message=f"give one of {', '.join(KINDS)} (e.g. {{log_uniform: [1e-4, 1e-2]}})",
    ),
]


def _flatten_space(value: Any, prefix: str = "") -> Any:
    """`{optim: {lr: {log_uniform: ...}}}` (what `--set search.space.optim.lr=...` writes) ->
    `{optim.lr: {log_uniform: ...}}`: mappings of mappings down to one that names a
    distribution (or names none, and is refused as such)."""
    if not isinstance(value, dict):
        return value
    flat: dict[str, Any] = {}
    for key, child in value.items():
        path = f"{prefix}{key}"
        section = isinstance(child, dict) and child and _kind(child) is None
        if section and all(isinstance(v, dict) for v in child.values()):
            flat.update(_flatten_space(child, f"{path}."))
        else:
            flat[path] = child
    return flat


class SearchConfig(_Strict):
    """The `search:` section of a recipe."""

    sampler: Literal["tpe", "random"] = Field(
        default="tpe", description="tpe: Optuna's TPESampler; random: RandomSampler"
    )
    trials: int = Field(ge=1, description="trials in all (finished or failed); may grow on resume")
    seed: int = Field(default=0, ge=0, lt=2**32, description="seeds the sampler")
    metric: str | None = Field(
        default=None,
        pattern=r"^val_[A-Za-z0-9_]+$",
        description="a validation column of metrics.parquet, read at the epoch best.pt was kept "
        "at and averaged over seeds; default: the task's selection metric (val_acc, val_mae, ...)",
    )
    direction: Literal["maximize", "minimize"] | None = Field(
        default=None,
        description="default: the task's for its selection metric; needed for another metric",
    )
    space: Annotated[dict[str, Distribution], BeforeValidator(_flatten_space)] = Field(
        min_length=1, description="dotted recipe path -> distribution"
    )


@dataclass(frozen=True)
class Search:
    """A validated search: its settings, the base recipe every trial starts from (validated, and
    raw so that a trial's values go in before validation), and the folder that holds it."""

    source: str
    config: SearchConfig
    base: Recipe
    base_raw: dict[str, Any]

    @property
    def folder(self) -> Path:
        return Path(self.base.output) / self.base.name

    def trial_recipe(self, params: dict[str, Any], label: str) -> Recipe:
        raw = copy.deepcopy(self.base_raw)
        for path, value in params.items():
            _assign(raw, path, value, self.source)
        raw["name"] = label
        raw["output"] = str(self.folder)
        shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
        return parse_recipe(raw, f"{self.source}, {label} ({shown})")

    def objective(self) -> tuple[str, Literal["maximize", "minimize"]]:
        """The metric a trial is scored on and its direction (the task's selection metric by
        default; the task is the recipe's, else its data set's)."""
        config = self.config
        data_task = ensure_data(self.base.data).task
        task = TASKS[self.base.task.name if self.base.task is not None else data_task]
        selection = f"val_{task.selected_on}"
        metric = config.metric or selection
        if config.direction is not None:
            return metric, config.direction
        if metric != selection:
            raise UserError(
                f"search in {self.source}: search.direction: give maximize or minimize for "
                f"{metric} (only the selection metric {selection} has a known direction)."
            )
        return metric, "maximize" if task.higher_is_better else "minimize"


def load_search(path: Path, overrides: Sequence[str] = ()) -> Search | None:
    """The search of a recipe file (its bases and `--set` applied), or None if it has none."""
    raw = compose_recipe(path, overrides)
    if not isinstance(raw, dict) or SEARCH_KEY not in raw:
        return None
    return search_from_raw(raw, str(path))


def search_from_raw(raw: dict[str, Any], where: str) -> Search:
    """Validate the search: its section, the base recipe, and each value of the space at its
    ends (every choice) in the base, so that a bad range fails before anything trains."""
    swept = [key for key in SWEEP_KEYS if key != SEARCH_KEY and key in raw]
    if swept:
        raise UserError(
            f"search in {where}: a search explores one recipe; leave out {', '.join(swept)} "
            "(one search per method)."
        )
    section = raw[SEARCH_KEY]
    try:
        config = SearchConfig.model_validate(section)
    except ValidationError as exc:
        problems = [(f"search.{p}", m) for p, m in problems_of(exc, section)]
        raise UserError(format_problems(problems, f"search in {where}")) from None
    base_raw = _fill_placeholders({k: v for k, v in raw.items() if k != SEARCH_KEY})
    base = parse_recipe(base_raw, where)
    dump = base.model_dump(mode="json")
    problems: list[tuple[str, str]] = []
    for path in config.space:
        if path in UNSEARCHED or path.split(".")[0] in UNSEARCHED_SECTIONS:
            problems.append((f"search.space.{path}", "cannot be searched (one search per method)"))
        elif not _exists(dump, path):
            problems.append((f"search.space.{path}", "names no field of the recipe"))
    if problems:
        raise UserError(format_problems(problems, f"search in {where}"))
    search = Search(where, config, base, base_raw)
    for path, dist in config.space.items():
        for value in dist.corners():
            try:
                search.trial_recipe({path: value}, "trial-0000")
            except UserError as exc:
                raise UserError(
                    f"search in {where}: search.space.{path} reaches {json.dumps(value)}, which "
                    f"the recipe refuses:\n{exc}"
                ) from None
    return search


def _exists(node: Any, dotted: str) -> bool:
    """Whether a dotted path (a number indexes a list) names a field of a recipe's dump."""
    for key in dotted.split("."):
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            return False
    return True


@dataclass(frozen=True)
class TrialRow:
    """One trial as `--dry-run` and the end of a search list it."""

    folder: str
    state: str  # finished, failed, interrupted, running, waiting
    value: float | None
    params: dict[str, Any]
    error: str = ""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(
            "a search: recipe needs Optuna, which is not installed: pip install 'mmval[search]'."
        ) from None
    return optuna


def _folder(trial: optuna.trial.FrozenTrial) -> str:
    return str(trial.user_attrs.get("folder", f"trial-{trial.number:04d}"))


def trial_rows(search: Search) -> list[TrialRow]:
    """The trials of the search so far (none before it started); reads the journal only."""
    path = search.folder / JOURNAL
    if not path.is_file():
        return []
    optuna = _optuna()
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
    except KeyError:  # stopped before the study was created
        return []
    names = {
        "COMPLETE": "finished",
        "FAIL": "failed",
        "RUNNING": "running",
        "WAITING": "waiting",
        "PRUNED": "pruned",
    }
    rows = []
    for trial in study.get_trials(deepcopy=False):
        error = str(trial.user_attrs.get("error", ""))
        state = names[trial.state.name]
        if state == "failed" and not error:
            state = "interrupted"
        rows.append(TrialRow(_folder(trial), state, trial.value, dict(trial.params), error))
    return rows


def run_search(
    search: Search,
    *,
    resume: bool = False,
    overwrite: bool = False,
    callbacks: Sequence[Callback] = (),
    on_outcome: Callable[[RunOutcome], None] = lambda outcome: None,
) -> list[TrialRow]:
    """Run the search until `trials` trials are done, holding its folder's lock; the trials."""
    optuna = _optuna()
    if overwrite:
        raise UserError(
            f"--overwrite does not apply to a search: {search.folder} holds its trials and its "
            "study; give it another name (--set name=...) or delete that folder."
        )
    if distributed.launched():
        raise UserError("a search trains its trials in one process; run it without torchrun.")
    folder = search.folder
    with locked(folder, folder=True, what=f"search folder {folder}"):
        data = search.base.data
        modalities = [m.name for m in ensure_data(data).modalities]
        check_against_data(search.base, modalities)
        metric, direction = search.objective()
        study = _open_study(optuna, search, metric, direction)
        _retry_interrupted(optuna, study)
        while _counted(study) < search.config.trials:
            study.sampler = _sampler(optuna, search.config, _counted(study))
            _run_trial(optuna, search, study, metric, resume, callbacks, on_outcome)
    return trial_rows(search)


def _open_study(optuna: Any, search: Search, metric: str, direction: str) -> optuna.Study:
    """Create or load the study, after cutting off a torn last record (a killed write) and the
    journal's own lock file a killed process left (mmval's folder lock is held: nobody else
    writes); refuse a study started with other settings."""
    path = search.folder / JOURNAL
    _repair_journal(path)
    Path(f"{path}.lock").unlink(missing_ok=True)
    backend = optuna.storages.journal.JournalFileBackend(str(path))
    storage = optuna.storages.JournalStorage(backend)
    study = optuna.create_study(
        study_name=STUDY, storage=storage, direction=direction, load_if_exists=True
    )
    config = search.config
    settings = {
        "search": {**config.model_dump(mode="json", by_alias=True, exclude={"trials"})},
        "objective": {"metric": metric, "direction": direction},
        "seeds": search.base.seeds,
        "recipe": identity(search.base, SETTING),
    }
    stored = study.user_attrs.get(SETTINGS_ATTR)
    if stored is None:
        study.set_user_attr(SETTINGS_ATTR, settings)
    elif stored != settings:
        changed = ", ".join(differing(stored, settings))
        raise UserError(
            f"{search.folder} holds a search started with other settings ({changed} differ); "
            "give this one another name (--set name=...), or restore those settings to "
            "continue it."
        )
    return study


def _repair_journal(path: Path) -> None:
    """Cut a journal back to its last whole line: Optuna appends each record with one write and
    an fsync, so a process killed mid-write leaves at most a torn tail."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as fh:
            fh.truncate(data.rfind(b"\n") + 1)


def _retry_interrupted(optuna: Any, study: optuna.Study) -> None:
    """Close the trials a stopped search left running, and queue each interrupted trial's
    parameters once more, for its own folder."""
    state = optuna.trial.TrialState
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        study.tell(trial.number, state=state.FAIL)
    trials = study.get_trials(deepcopy=False)
    settled = {
        _folder(t)
        for t in trials
        if t.state in (state.COMPLETE, state.WAITING)
        or (t.state == state.FAIL and "error" in t.user_attrs)
    }
    for trial in trials:
        folder = _folder(trial)
        if trial.state == state.FAIL and folder not in settled:
            study.enqueue_trial(dict(trial.params), user_attrs={"folder": folder})
            settled.add(folder)


def _counted(study: optuna.Study) -> int:
    """Trials done: finished, or failed with a user error (interrupted ones are tried again)."""
    return sum(
        t.state.name == "COMPLETE" or (t.state.name == "FAIL" and "error" in t.user_attrs)
        for t in study.get_trials(deepcopy=False)
    )


def _sampler(optuna: Any, config: SearchConfig, done: int) -> Any:
    """The sampler of the next trial, seeded from (seed, trials done): the same draws whether or
    not the search was interrupted in between."""
    import numpy as np

    seed = int(np.random.SeedSequence([config.seed, done]).generate_state(1)[0])
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _run_trial(
    optuna: Any,
    search: Search,
    study: optuna.Study,
    metric: str,
    resume: bool,
    callbacks: Sequence[Callback],
    on_outcome: Callable[[RunOutcome], None],
) -> None:
    state = optuna.trial.TrialState
    trial = study.ask()
    finished = False
    try:
        # drawn in the order of the paths, so that the order the space is written in (which
        # the study's stored settings ignore) does not change the draws
        space = search.config.space
        params = {path: space[path].suggest(trial, path) for path in sorted(space)}
        label = _folder(trial)
        trial.set_user_attr("folder", label)
        try:
            recipe = search.trial_recipe(params, label)
        except UserError as exc:  # a combination of values the recipe refuses
            trial.set_user_attr("error", str(exc))
            study.tell(trial, state=state.FAIL)
            finished = True
            return
        combo = ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items())
        plan = SweepPlan(search.source, True, [Variant(label, combo, recipe)])
        outcomes = run_plan(plan, resume=resume, callbacks=callbacks, on_outcome=on_outcome)
        failed = [o for o in outcomes if o.status == "failed"]
        if failed:
            trial.set_user_attr("error", f"seed {failed[0].seed}: {failed[0].error}")
            study.tell(trial, state=state.FAIL)
        else:
            study.tell(trial, _value(outcomes, metric))
            _write_best(optuna, search, study, metric)
        finished = True
    finally:
        if not finished:  # interrupted (or a bug): tried again when the search continues
            study.tell(trial, state=state.FAIL, skip_if_finished=True)


def _value(outcomes: list[RunOutcome], metric: str) -> float:
    """The mean over seeds of `metric` at the epoch each run kept best.pt at."""
    values = []
    for outcome in outcomes:
        metrics = pd.read_parquet(outcome.run_dir / METRICS)
        if metric not in metrics.columns:
            listed = ", ".join(c for c in metrics.columns if c.startswith("val_"))
            raise UserError(
                f"search.metric {metric} is not a column of {outcome.run_dir / METRICS} "
                f"(its validation columns: {listed})."
            )
        row = metrics[metrics["epoch"] == outcome.summary["best_epoch"]]
        values.append(float(row[metric].iloc[0]))
    return sum(values) / len(values)


def _write_best(optuna: Any, search: Search, study: optuna.Study, metric: str) -> None:
    """best-recipe.yaml: the recipe of the best trial so far, all its seeds."""
    best = study.best_trial
    recipe = search.trial_recipe(dict(best.params), _folder(best))
    seeds = ", ".join(map(str, recipe.seeds))
    done = _counted(study)
    header = (
        f"# best of {done} trial(s) of the search {search.source}: {metric} {best.value:.6g} "
        f"(mean over seeds {seeds}), runs in {search.folder / _folder(best)}\n"
    )
    text = header + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    write_text_atomic(search.folder / BEST_RECIPE, text)
