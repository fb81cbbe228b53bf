"""Finding the runs below a folder and reading their numbers at the selected checkpoint.

A run folder is one with `recipe.yaml` and `train.log` (written when training starts) or a
`summary.json`. It counts only when its summary says finished; every other one is listed as
left out, never averaged.
Runs are grouped into report rows by data set, method label, recipe hash (seed excluded) and
mmval version, so two recipes of one method on one data set are never averaged together.
A report may read several folders and be narrowed (`Narrowing`: methods, excluded methods,
recipe values) before its rows are named, so the names say what differs among the rows shown.

Selection: `val` reads each run at its best-on-validation epoch (best.pt); `test-max` at its
best test epoch, the papers' official protocol, which is not an honest estimate: such rows are
labelled, and a run of the published protocol (trained on val too) is reported only that way.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mmval.artifacts.layout import (
    CONTRIB_EPOCH,
    LOG,
    METRICS,
    MLFLOW_DB,
    PREDICTIONS,
    RECIPE_FILE,
    SUMMARY,
    DamagedRunFile,
    check_predictions,
    error_line,
    read_metrics,
    read_predictions,
    read_summary,
)
from mmval.errors import UserError
from mmval.overrides import load_yaml

# Recipe fields that do not make a different experiment: those the settings hash leaves out
# (marked Effect.NONE or Effect.RUN in mmval.recipe; the report reads recipes without importing
# them, and tests/test_report.py checks that the two agree).
NOT_SETTINGS = (
    "name",
    "seeds",
    "data.root",
    "train.device",
    "train.workers",
    "train.prefetch",
    "train.channels_last",
    "train.compile",
    "train.tensorboard",
    "train.tracking",
    "train.tracking_uri",
    "output",
    "valuation",
    "evaluate",
)
# labelled by the selection instead (PUBLISHED_LABEL, TEST_MAX_LABEL), not as a recipe variant
_LABELLED_APART = ("train.protocol",)
# a recipe variant is named by its differing fields when there are at most this many and the
# label stays this short; else by its settings hash
_MAX_VARIANT_FIELDS = 4
_MAX_VARIANT_LABEL = 100
SELECTIONS = ("val", "test-max")
PUBLISHED_LABEL = "published protocol (test-max)"
TEST_MAX_LABEL = "test-max"
_ALIASES = {"acc": "acc", "accuracy": "acc", "f1": "f1", "macro-f1": "f1", "macro_f1": "f1"}
META = [
    "run",
    "dataset",
    "data_fingerprint",  # sha256 of the data's manifest, 12 hex ("-" for older runs)
    "method",
    "variant",
    "row",
    "recipe_name",
    "settings_hash",
    "mmval_version",
    "seed",
    "epochs",
    "best_epoch",  # the selected epoch
    "checkpoint_epoch",  # best.pt's epoch, whose test predictions the run saved
    "protocol",
    "selection",  # the label of a row not selected on validation
    "task",  # what the run trained for (mmval.tasks)
    "selected_on",  # the metric its checkpoint was selected on (acc, mae, seg_acc, dice_mean)
    "headline",  # the task's main metrics, comma-separated (the report's default columns)
    "parameters",  # the model's parameter count (None for runs before mmval counted it)
    "macs_per_sample",  # multiply-accumulates of one evaluation forward of one sample
]
# how the report names metrics, and the metrics where lower is better
METRIC_LABELS = {
    "acc": "Acc",
    "f1": "F1",
    "mae": "MAE",
    "corr": "Corr",
    "acc7": "Acc-7",
    "acc5": "Acc-5",
    "acc2_has0": "Acc-2 (has0)",
    "f1_has0": "F1 (has0)",
    "acc2_non0": "Acc-2 (non0)",
    "f1_non0": "F1 (non0)",
    "seg_acc": "Seg. acc",
    "dice_wt": "Dice WT",
    "dice_tc": "Dice TC",
    "dice_et": "Dice ET",
    "dice_et_post": "Dice ET (post)",
    "dice_mean": "Dice mean",
}
_LOWER_IS_BETTER = re.compile(r"(^|_)(loss|mae)(_|$)")
_PERCENT = re.compile(r"(^|_)(acc\d*|f1|seg_acc|dice)(_|$)")


@dataclass(frozen=True)
class LeftOut:
    """A run folder the report does not average in, and why."""

    run: Path
    reason: str


@dataclass
class RunTree:
    """Finished runs (one row each: META columns, then every logged metric at the best
    epoch) and the run folders left out."""

    root: Path  # the folder read, or the common parent of the folders read
    runs: pd.DataFrame
    left_out: list[LeftOut]
    select: str = "val"
    roots: list[Path] = field(default_factory=list)  # the folders read (default: [root])
    # run folder -> its resolved recipe as dotted paths (`flatten_recipe`), settings only
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    narrowed: str = ""  # how the runs were narrowed (`Narrowing.describe`), for the legend

    @property
    def where(self) -> str:
        """The folder(s) read, as messages and titles name them."""
        return ", ".join(str(r) for r in self.roots) if self.roots else str(self.root)

    def history(self, run: str) -> pd.DataFrame:
        """Every epoch's metrics of one run."""
        return read_metrics(Path(run))

    def predictions(self, run: str) -> pd.DataFrame | None:
        """Test-split predictions of the selected checkpoint, when the run saved them."""
        return read_predictions(Path(run))


@dataclass(frozen=True)
class TableFile:
    """A Parquet file below a report's root that is not a run's own file (metrics,
    predictions, training-time contributions): `mmval value` and evaluation tables among them.
    `run` is the finished run folder it lies in (if any); `info` its `mmval.*` metadata, None
    with `damaged` saying why when its footer cannot be read."""

    path: Path
    run: str | None
    info: dict[str, str] | None
    damaged: str = ""


def table_files(tree: RunTree) -> list[TableFile]:
    """Every such file below the tree's root, its footer read once (the contribution figures
    and the robustness tables both look through them)."""
    runs = set(tree.runs["run"])
    found = []
    paths = {p.resolve(): p for root in tree.roots or [tree.root] for p in root.rglob("*.parquet")}
    for path in sorted(paths.values()):
        if path.name in (METRICS, PREDICTIONS) or CONTRIB_EPOCH.search(path.name):
            continue
        run = next((str(p) for p in path.parents if str(p) in runs), None)
        try:
            meta = pq.read_schema(path).metadata or {}
        except (OSError, ValueError, pa.ArrowException) as exc:
            why = f"not a Parquet file mmval can read ({error_line(exc)})"
            found.append(TableFile(path, run, None, why))
            continue
        info = {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"mmval.")}
        found.append(TableFile(path, run, info))
    return found


@dataclass(frozen=True)
class Metric:
    """A reported metric: its short key (CSV prefix), the column of the runs table it reads,
    whether it is a fraction shown in percent, which direction is better, and how seeds are
    pooled: `mean` (mean ± sample std, tested against a baseline) or `min` / `max` (the
    lowest / highest value over seeds, QMF's worst case of a score / an error; no std, no
    test)."""

    key: str
    column: str
    label: str
    percent: bool
    higher_is_better: bool
    over_seeds: Literal["mean", "min", "max"] = "mean"


def find_runs(
    root: Path | Sequence[Path], select: str = "val", narrowing: Narrowing | None = None
) -> RunTree:
    """Every run folder below `root` (a folder or several), finished or not, each read at the
    epoch `select` picks, narrowed by `narrowing` before the rows are named. A folder whose
    files cannot be read, or a summary.json of another tool, is left out with the reason; it
    never stops the report of the others."""
    roots = [Path(root)] if isinstance(root, str | os.PathLike) else [Path(r) for r in root]
    if not roots:
        raise UserError("name a folder of runs.")
    for folder in roots:
        if not folder.is_dir():
            raise UserError(f"{folder} is not a folder.")
    if select not in SELECTIONS:
        raise UserError(f"--select must be one of {', '.join(SELECTIONS)}, not {select!r}.")
    base = roots[0] if len(roots) == 1 else Path(os.path.commonpath([r.absolute() for r in roots]))
    found: dict[Path, Path] = {}  # resolved -> as found: a folder below two roots counts once
    for top in roots:
        started = {p.parent for p in top.rglob(LOG) if (p.parent / RECIPE_FILE).is_file()}
        for folder in sorted(started | {p.parent for p in top.rglob(SUMMARY)}):
            if not _tracked_copy(folder, top):
                found.setdefault(folder.resolve(), folder)
    records: list[dict[str, Any]] = []
    left_out: list[LeftOut] = []
    for folder in sorted(found.values()):
        try:
            summary = _mmval_summary(folder)
            if summary is None or not summary.get("finished"):
                left_out.append(LeftOut(folder, _unfinished_reason(folder)))
                continue
            record = _record(folder, summary, select)
        except DamagedRunFile as exc:
            left_out.append(LeftOut(folder, f"damaged: {exc.reason}"))
            continue
        except _Foreign as exc:
            left_out.append(LeftOut(folder, f"{NOT_MMVAL}: {exc}"))
            continue
        if select == "val" and record["protocol"] == "published":
            left_out.append(LeftOut(folder, _PUBLISHED_LEFT_OUT))
            continue
        records.append(record)
    runs = pd.DataFrame(records)
    narrowing = narrowing or Narrowing()
    if not runs.empty:
        runs = narrowing.apply(runs)
    tree = RunTree(
        base, pd.DataFrame(columns=META), left_out, select, roots, {}, narrowing.describe()
    )
    if runs.empty:
        return tree
    tree.settings = {
        run: flatten_recipe(r) for run, r in zip(runs["run"], runs["_recipe"], strict=True)
    }
    runs = _label_variants(_name_data_apart(runs))
    runs["selection"] = ""
    if select == "test-max":
        runs["selection"] = runs["protocol"].map(
            lambda p: PUBLISHED_LABEL if p == "published" else TEST_MAX_LABEL
        )
        runs["row"] = runs["row"] + " · " + runs["selection"]  # no brackets: rich markup
    duplicate = runs.duplicated(["dataset", "row", "seed"], keep="first")
    for _, dup in runs[duplicate].iterrows():
        first = runs[
            ~duplicate
            & (runs["dataset"] == dup["dataset"])
            & (runs["row"] == dup["row"])
            & (runs["seed"] == dup["seed"])
        ]["run"].iloc[0]
        left_out.append(LeftOut(Path(dup["run"]), f"duplicate: same recipe and seed as {first}"))
    tree.runs = runs[~duplicate].drop(columns="_recipe").reset_index(drop=True)
    tree.left_out = sorted(left_out, key=lambda x: str(x.run))
    return tree


_MISSING = object()


@dataclass(frozen=True)
class Narrowing:
    """Which finished runs a report shows: only the `methods` (if any), none of `exclude`, and
    only those whose recipe meets every `where` condition (`dotted.path=value`, the value read
    as YAML as `--set` reads it, so `0.5` is a number and `[a, b]` a list). A run whose recipe
    has no such field is kept: a grid point `method.alpha=0.5` holds concat, which has no
    alpha, as a grid sweep runs it there. Narrowing comes before the rows are named, so a
    `--where` field no longer names them."""

    methods: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    where: tuple[str, ...] = ()

    def describe(self) -> str:
        parts = [f"--methods {','.join(self.methods)}"] if self.methods else []
        parts += [f"--exclude {','.join(self.exclude)}"] if self.exclude else []
        parts += [f"--where {w}" for w in self.where]
        return ", ".join(parts)

    def apply(self, runs: pd.DataFrame) -> pd.DataFrame:
        """The runs (with their `_recipe`) that pass; a method or field no run has is a user
        error naming it, so a typo never shows the whole table as if narrowed."""
        known = sorted(set(runs["method"]))
        for option, names in (("--methods", self.methods), ("--exclude", self.exclude)):
            unknown = [n for n in names if n not in known]
            if unknown:
                raise UserError(
                    f"{option}: no finished run of {', '.join(unknown)} (methods found: "
                    f"{', '.join(known)})."
                )
        keep = pd.Series(True, index=runs.index)
        if self.methods:
            keep &= runs["method"].isin(self.methods)
        keep &= ~runs["method"].isin(self.exclude)
        for condition in self.where:
            path, wanted = _parse_where(condition)
            values = runs["_recipe"].map(lambda r, p=path: _at(r, p))
            if (values.map(lambda v: v is _MISSING)).all():
                raise UserError(f"--where {condition}: no run's recipe has a field {path}.")
            has = values.map(lambda v: v is not _MISSING)
            meets = values.map(lambda v, w=wanted: v is _MISSING or _same(v, w))
            if not (keep & has & meets).any():
                seen = sorted({_compact(v) for v in values[keep & has]})
                raise UserError(
                    f"--where {condition}: no run has {path}={_compact(wanted)} (values found: "
                    f"{', '.join(seen) or 'none among the runs kept'})."
                )
            keep &= meets
        return runs[keep].reset_index(drop=True)


def _parse_where(condition: str) -> tuple[str, Any]:
    path, sep, text = condition.partition("=")
    path = path.strip()
    if not sep or not path or " " in path:
        raise UserError(f"--where {condition!r}: write it as dotted.path=value (method.alpha=0.5).")
    try:
        return path, load_yaml(text) if text.strip() else ""
    except (yaml.YAMLError, UserError):
        raise UserError(f"--where {condition!r}: the value is not valid YAML.") from None


def _at(recipe: Any, path: str) -> Any:
    """The recipe's value at a dotted path (a number indexes a list), `_MISSING` if none."""
    node = recipe
    for key in path.split("."):
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return _MISSING
    return node


def _same(value: Any, wanted: Any) -> bool:
    """Equal after YAML parsing, numbers by value (`1e-3`, a string to YAML 1.1, is 0.001)."""
    if isinstance(value, list) and isinstance(wanted, list):
        return len(value) == len(wanted) and all(map(_same, value, wanted))
    if isinstance(value, dict) and isinstance(wanted, dict):
        return value.keys() == wanted.keys() and all(_same(value[k], wanted[k]) for k in value)
    number = _number(value)
    if number is not None and not isinstance(value, str):
        other = _number(wanted)
        return other is not None and math.isclose(number, other, rel_tol=1e-12, abs_tol=0.0)
    return value == wanted


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _compact(value: Any) -> str:
    """A recipe value as a label shows it: `[gabor, wm]`, `0.5`, `film`, `{name: c3r}`."""
    if isinstance(value, str):
        return value
    if isinstance(value, list | dict):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return json.dumps(value)


def _tracked_copy(folder: Path, root: Path) -> bool:
    """Whether `folder` lies in an MLflow store (`train.tracking`), whose artifacts copy a
    run's recipe.yaml and summary.json: a copy, not a run."""
    return any((p / MLFLOW_DB).is_file() for p in folder.parents if p == root or root in p.parents)


NOT_MMVAL = "not an mmval run"
# the fields `_record` reads of a finished run's summary, and their types
_REQUIRED = {"dataset": str, "method": str, "seed": int, "epochs": int, "best_epoch": int}
_OPTIONAL = {"recipe": dict, "data_fingerprint": str, "recipe_name": str}


class _Foreign(Exception):
    """A summary.json that is not mmval's, in a folder mmval did not start training in."""


def _mmval_summary(folder: Path) -> dict[str, Any] | None:
    """The folder's summary if it is mmval's, None if there is none; `DamagedRunFile` for one
    of an mmval run folder (recipe.yaml and train.log) that is not mmval's, `_Foreign` for one
    of another folder that is not."""
    summary = read_summary(folder)
    if summary is None:
        return None
    started = (folder / RECIPE_FILE).is_file() and (folder / LOG).is_file()
    if not isinstance(summary, dict):
        what = f"a JSON {type(summary).__name__}, not an object"
        if started:
            raise DamagedRunFile(folder, f"{SUMMARY} is {what}")
        raise _Foreign(f"its {SUMMARY} is {what}")
    if not started and not set(summary) & {"finished", *_REQUIRED}:
        raise _Foreign(
            f"its {SUMMARY} has none of mmval's fields (finished, {', '.join(_REQUIRED)})"
        )
    if summary.get("finished"):
        missing = sorted(k for k in _REQUIRED if k not in summary)
        if missing:
            raise DamagedRunFile(folder, f"{SUMMARY} lacks {', '.join(missing)}")
        for key, kind in (_REQUIRED | _OPTIONAL).items():
            value = summary.get(key)
            if key in summary and (not isinstance(value, kind) or isinstance(value, bool)):
                raise DamagedRunFile(
                    folder,
                    f"{SUMMARY} has a {type(value).__name__} as {key}, not a {kind.__name__}",
                )
    return summary


_PUBLISHED_LEFT_OUT = (
    "published protocol: it trained on the validation split, so it has no honest selection; "
    "`--select test-max` reports it, labelled"
)


def collect_runs(root: Path) -> pd.DataFrame:
    """One row per finished run found anywhere below `root`, at its best-on-validation epoch."""
    return find_runs(root).runs


def resolve_metric(name: str, split: str, columns: Iterable[str]) -> Metric:
    """`acc`, `f1` (macro-F1) or any metric the runs logged: `acc_<modality>` and other
    per-split names are read from the `split`, anything else (`train_loss`, `method_*`) as
    written in metrics.parquet."""
    key = _ALIASES.get(name.lower(), name)
    available = set(columns)
    for column in (f"{split}_{key}", key):
        if column in available:
            percent = _PERCENT.search(key) is not None
            label = METRIC_LABELS.get(key, key)
            return Metric(key, column, label, percent, not _LOWER_IS_BETTER.search(key))
    logged = sorted(c.removeprefix(f"{split}_") for c in available if c not in META)
    raise UserError(
        f"--metric {name}: no run logged it on the {split} split; logged: {', '.join(logged)}."
    )


def headline_metrics(runs: pd.DataFrame) -> list[str]:
    """The main metrics of the runs' tasks, in order (accuracy and macro-F1 for
    classification): what a report shows unless told otherwise."""
    if runs.empty or "headline" not in runs:
        return ["acc", "f1"]
    return list(dict.fromkeys(m for names in runs["headline"] for m in names.split(",")))


def metric_columns(runs: pd.DataFrame) -> list[str]:
    """The logged metric columns of a run table."""
    return [c for c in runs.columns if c not in META]


def _unfinished_reason(folder: Path) -> str:
    """How far an unfinished run got, from its metrics and recipe (`?` where they cannot be
    read: a run killed while writing is unfinished whatever its files say)."""
    damaged: list[str] = []
    try:
        done = str(len(read_metrics(folder)))
    except DamagedRunFile as exc:
        done, damaged = "?", [exc.reason]
    planned = "?"
    if (folder / RECIPE_FILE).is_file():
        try:
            recipe = load_yaml((folder / RECIPE_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            recipe, damaged = None, [*damaged, f"{RECIPE_FILE} cannot be read"]
        train = recipe.get("train") if isinstance(recipe, dict) else None
        planned = str(train.get("epochs", "?")) if isinstance(train, dict) else "?"
    note = f" ({'; '.join(damaged)})" if damaged else ""
    return f"unfinished: {done} of {planned} epochs, no final summary{note}"


def _record(folder: Path, summary: dict[str, Any], select: str) -> dict[str, Any]:
    """A finished run's identity and every metric at its selected epoch; `DamagedRunFile` when
    its metrics or predictions cannot be read or lack what the selection needs."""
    history = read_metrics(folder)
    check_predictions(folder)  # now: a damaged one would stop the paired tests later
    key, higher = summary.get("selected_on", "acc"), summary.get("higher_is_better", True)
    needed = ["epoch", f"test_{key}"] if select == "test-max" else ["epoch"]
    lacking = [c for c in needed if c not in history.columns]
    if not (folder / METRICS).is_file():
        raise DamagedRunFile(folder, f"{METRICS} is missing")
    if lacking:
        raise DamagedRunFile(folder, f"{METRICS} has no {' or '.join(lacking)} column")
    selected = summary["best_epoch"]
    if select == "test-max" and history[f"test_{key}"].notna().any():
        best_row = history[f"test_{key}"].idxmax() if higher else history[f"test_{key}"].idxmin()
        selected = int(history.loc[best_row, "epoch"])  # the first best
    best = history[history["epoch"] == selected]
    recipe = summary.get("recipe", {})
    values = {k: v for k, v in best.iloc[0].to_dict().items() if k != "epoch"} if len(best) else {}
    meta = {
        "run": str(folder),
        "dataset": summary["dataset"],
        "data_fingerprint": summary.get("data_fingerprint", "-")[:12],
        "method": summary["method"],
        "recipe_name": summary.get("recipe_name", folder.parent.name),
        "settings_hash": summary.get("settings_hash", "-"),
        "mmval_version": summary.get("mmval_version", "-"),
        "seed": summary["seed"],
        "epochs": summary["epochs"],
        "best_epoch": selected,
        "checkpoint_epoch": summary["best_epoch"],
        # runs written before the protocol existed trained on train alone
        "protocol": recipe.get("train", {}).get("protocol", "validation"),
        "task": summary.get("task", "classification"),
        "selected_on": key,
        "headline": ",".join(summary.get("headline", ["acc", "f1"])),
        "parameters": summary.get("parameters"),
        "macs_per_sample": summary.get("macs_per_sample"),
        "_recipe": recipe,
    }
    return meta | {k: v for k, v in values.items() if k not in meta}


def _name_data_apart(runs: pd.DataFrame) -> pd.DataFrame:
    """Two different data sets of one name (two `mmval prep synthetic` with other settings)
    are two column groups, `synthetic (3b5c38412f01)`, never one."""
    runs = runs.copy()
    known = runs[runs["data_fingerprint"] != "-"]
    for name, group in known.groupby("dataset"):
        if group["data_fingerprint"].nunique() > 1:
            mask = (runs["dataset"] == name) & (runs["data_fingerprint"] != "-")
            runs.loc[mask, "dataset"] = name + " (" + runs.loc[mask, "data_fingerprint"] + ")"
    return runs


def _label_variants(runs: pd.DataFrame) -> pd.DataFrame:
    """Name each recipe of a method so that rows with different recipes stay apart: by the
    fields that differ between its recipes on some data set (`ogm_ge (method.alpha=0.5)`,
    `concat (data.modalities=[gabor, wm], optim.lr=0.001)` for a grid sweep's points), or by
    hash when more than _MAX_VARIANT_FIELDS differ or their values make a label longer than
    _MAX_VARIANT_LABEL. The same fields label the method's recipes on every data set, so
    `ogm_ge (method.alpha=0.5)` is one row across them; a method with one recipe per data set
    keeps its plain name."""
    runs = runs.copy()
    runs["variant"] = ""
    config = ["settings_hash", "mmval_version"]
    for method, group in runs.groupby("method", sort=False):
        configs = group.drop_duplicates(["dataset", *config])
        flat = {
            (h, v): flatten_recipe(r) | {"mmval": v}
            for h, v, r in configs[[*config, "_recipe"]].itertuples(index=False)
        }
        differing: set[str] = set()
        for _, on_dataset in configs.groupby("dataset"):
            variants = [flat[(h, v)] for h, v in on_dataset[config].itertuples(index=False)]
            keys = {k for f in variants for k in f}
            differing |= {
                k for k in keys if len({setting_key(f.get(k, _MISSING)) for f in variants}) > 1
            }
        if not differing:
            continue
        for (h, v), f in flat.items():
            label = ", ".join(f"{k}={_compact(f[k]) if k in f else '-'}" for k in sorted(differing))
            if len(differing) > _MAX_VARIANT_FIELDS or len(label) > _MAX_VARIANT_LABEL:
                label = h if "mmval" not in differing else f"{h}, mmval={v}"
            mask = (
                (runs["method"] == method)
                & (runs["settings_hash"] == h)
                & (runs["mmval_version"] == v)
            )
            runs.loc[mask, "variant"] = label
    runs["row"] = [
        f"{m} ({v})" if v else m for m, v in zip(runs["method"], runs["variant"], strict=True)
    ]
    return runs


def setting_key(value: Any) -> str:
    """A recipe value as compared: JSON with sorted keys."""
    return json.dumps(value, sort_keys=True, default=str)


def flatten_recipe(recipe: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (into lists of mappings by index), without the fields that
    are not settings."""
    flat: dict[str, Any] = {}
    for key, value in recipe.items():
        dotted = f"{prefix}{key}"
        if dotted in NOT_SETTINGS or dotted in _LABELLED_APART:
            continue
        if isinstance(value, dict):
            flat |= flatten_recipe(value, f"{dotted}.")
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            # a list of configs (plugins): `plugins.0.adjustment`, as --set names it
            flat |= flatten_recipe({str(i): v for i, v in enumerate(value)}, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat
