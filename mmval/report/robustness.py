"""`mmval report --robustness`: the seed papers' robustness tables, built from the evaluation
tables inside finished run folders (`mmval value --method subsets [--corrupt ...]`, `--method
feature-mask`, or a recipe's `evaluate:` section, which writes both).

- Noise (QMF's protocol, followed by C3R and CMoB): one table per data set and corruption (the
  modalities and kinds noised together, e.g. `image=gaussian + text=blank`), a column group per
  level with Avg. and Worst. Avg. is each run's accuracy on all its modalities averaged over the
  noise draws, then mean ± sample std over seeds; Worst. is the lowest accuracy of any (seed,
  draw). QMF's evaluation (`shells/batch_eval_latefusion_qmf.sh`) evaluates 5 trained runs x 5
  noise seeds per level and logs the 25 accuracies; the released code does not aggregate them.
  That Worst. is taken over the trained runs too is our reading of its level-0 columns, where
  Avg. and Worst. differ although nothing is noised. Level 0 is the clean table (a corruption at
  level 0 changes nothing).
- Missing modalities (C3R's Table 2): one table per data set, a column per non-empty subset of
  the modalities (named `a+b`) and the mean over subsets, from the clean subsets tables; mean ±
  sample std over seeds.
Rows, ranks (best bold, second underlined), differences to a baseline and the paired t-test
over seeds are the main table's (`mmval.report.tables`), so every format renders them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa

from mmval.artifacts.layout import error_line
from mmval.errors import UserError
from mmval.report.runs import META, LeftOut, Metric, RunTree, TableFile, table_files
from mmval.report.tables import Comparison, check_options, compare_metrics

EVALUATION_METHODS = ("subsets", "feature-mask")
# `mmval.data.corrupt.Corruption` as written in the metadata; parsed here so that the
# report imports no torch
_CORRUPTION = re.compile(r"^(?P<modality>[^=]+)=(?P<kind>[a-z-]+):(?P<level>[0-9.]+)$")
CLEAN = "clean"
# what a subsets-table column averages to (`Task.subset_metrics`, recorded in the table's
# metadata; classification tables written before tasks existed have `correct`): the metric's
# key, its name in titles, whether it is shown in percent, whether higher is better
_SUBSET_METRICS = {
    "correct": ("acc", "accuracy", True, True),
    "abs_error": ("mae", "MAE", False, False),
    "seg_acc": ("seg_acc", "segment accuracy", True, True),
    "dice_wt": ("dice_wt", "Dice WT", True, True),
    "dice_tc": ("dice_tc", "Dice TC", True, True),
    "dice_et": ("dice_et", "Dice ET", True, True),
}


def _subset_metric(column: str) -> tuple[str, str, bool, bool]:
    return _SUBSET_METRICS.get(column, (column, column, False, True))


@dataclass(frozen=True)
class EvaluationTable:
    """One evaluation table of a finished run: its run folder, method, split, the corruptions
    it was computed under (modality, kind, level), the modalities of the model, how missing
    modalities were removed, and its rows (read once, when it is found)."""

    path: Path
    run: str
    method: str
    split: str
    corruptions: tuple[tuple[str, str, float], ...]
    modalities: tuple[str, ...]
    mask: str
    frame: pd.DataFrame = field(compare=False, repr=False)
    # the columns the report averages per subset (`Task.subset_metrics`)
    metrics: tuple[str, ...] = ("correct",)

    @property
    def clean(self) -> bool:
        return all(level == 0 for _, _, level in self.corruptions)

    @property
    def family(self) -> str:
        """What is noised, whatever the level: `image=gaussian + text=blank`."""
        return " + ".join(f"{m}={k}" for m, k, _ in sorted(self.corruptions))

    @property
    def level(self) -> str:
        levels = sorted({level for _, _, level in self.corruptions})
        return "level " + "/".join(f"{level:g}" for level in levels)


def find_evaluation_tables(
    tree: RunTree, split: str, files: list[TableFile] | None = None
) -> tuple[list[EvaluationTable], list[LeftOut]]:
    """The subsets and feature-mask tables of `split` inside the tree's finished runs (at any
    depth below the run folder, e.g. `evaluate/`), and the ones left out with the reason;
    `files` is the tree's `table_files` when the caller has them already."""
    found: list[EvaluationTable] = []
    left_out: list[LeftOut] = []
    seen: dict[tuple[str, str, str, str], Path] = {}
    for file in table_files(tree) if files is None else files:
        path, run, info = file.path, file.run, file.info
        if info is None:
            if run is not None:  # elsewhere it may be anything; inside a run it is mmval's
                left_out.append(LeftOut(path, f"damaged: {file.damaged}"))
            continue
        if info.get("mmval.method") not in EVALUATION_METHODS:
            continue
        if run is None:
            left_out.append(LeftOut(path, "evaluation table outside a finished, reported run"))
            continue
        if info.get("mmval.split") != split:
            continue
        try:
            table = _evaluation_table(path, run, info, split)
        except _Damaged as exc:
            left_out.append(LeftOut(path, f"damaged: {exc}"))
            continue
        key = (run, table.method, table.family, CLEAN if table.clean else table.level)
        if key in seen:
            left_out.append(LeftOut(path, f"duplicate: the same evaluation as {seen[key]}"))
            continue
        seen[key] = path
        found.append(table)
    return found, left_out


class _Damaged(Exception):
    """A Parquet file that cannot be read whole, or an evaluation table whose metadata is not
    what mmval writes."""


def _evaluation_table(path: Path, run: str, info: dict[str, str], split: str) -> EvaluationTable:
    """The table as its metadata describes it, with its rows (a table that cannot be read
    whole is damaged)."""
    try:
        corruptions = tuple(_parse(c) for c in json.loads(info.get("mmval.corruptions", "[]")))
        modalities = tuple(json.loads(info["mmval.modalities"]))
        metrics = tuple(json.loads(info.get("mmval.subset_metrics", '["correct"]')))
    except (ValueError, KeyError, TypeError, UserError) as exc:
        raise _Damaged(f"the evaluation table's metadata is not mmval's ({exc})") from exc
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _Damaged(f"the evaluation table cannot be read ({error_line(exc)})") from exc
    return EvaluationTable(
        path=path,
        run=run,
        method=info["mmval.method"],
        split=split,
        corruptions=corruptions,
        modalities=modalities,
        mask=info.get("mmval.mask", "?"),
        frame=frame,
        metrics=metrics,
    )


def _parse(text: str) -> tuple[str, str, float]:
    match = _CORRUPTION.match(text)
    if match is None:
        raise UserError(f"an evaluation table records the corruption {text!r}, which is not one.")
    return match["modality"], match["kind"], float(match["level"])


def full_set_accuracy(
    table: pd.DataFrame, modalities: tuple[str, ...], column: str = "correct"
) -> pd.Series:
    """Accuracy (or the mean of another subsets-table column) on all the model's modalities,
    per repeat (the noise draws)."""
    full = table[table["size"] == len(modalities)]
    if "repeat" not in full:  # written without --corrupt by an mmval before the column
        return pd.Series([full[column].mean()])
    return full.groupby("repeat")[column].mean()


def noise_comparisons(
    tree: RunTree,
    tables: list[EvaluationTable],
    options: _Options,
) -> list[Comparison]:
    """One table per (data set, corruption family), a column group per level."""
    subsets = [t for t in tables if t.method == "subsets"]
    clean = {t.run: t for t in subsets if t.clean}
    noisy = [t for t in subsets if not t.clean]
    runs = tree.runs.set_index("run", drop=False)
    records: dict[tuple[str, str, str], list[dict[str, object]]] = {}
    for table in noisy:
        run = runs.loc[table.run]
        per_run = [(table.level, table)]
        if table.run in clean:
            per_run.append(("level 0", clean[table.run]))
        column = table.metrics[0]
        for level, source in per_run:
            accuracy = full_set_accuracy(source.frame, source.modalities, column)
            records.setdefault((run["dataset"], table.family, column), []).append(
                {
                    **{c: run[c] for c in META},
                    "dataset": level,
                    "avg": accuracy.mean(),
                    "worst": accuracy.min() if _subset_metric(column)[3] else accuracy.max(),
                    "draws": len(accuracy),
                }
            )
    comparisons = []
    for (dataset, family, column), rows in sorted(records.items()):
        _, name, percent, higher = _subset_metric(column)
        metrics = [
            Metric("avg", "avg", "Avg.", percent=percent, higher_is_better=higher),
            # the worst draw: the lowest score, or the highest error
            Metric("worst", "worst", "Worst.", percent, higher, "min" if higher else "max"),
        ]
        frame = pd.DataFrame(rows).drop_duplicates(["run", "dataset"])
        levels = sorted(set(frame["dataset"]), key=_level_order)
        comparison = _compare(tree, frame, metrics, options, groups=levels)
        noised = frame[frame["dataset"] != "level 0"]
        draws = "/".join(str(n) for n in sorted(set(noised["draws"])))
        comparisons.append(
            replace(
                comparison,
                title=f"{dataset}: {name} under noise ({family}), {options.split} split",
                group_label="level",
                caption=[
                    f"{options.split} split, {family}; {name} on all modalities"
                    f"{' in %' if percent else ''}. Avg.: each run's {name} averaged over its "
                    "noise draws, then mean ± sample std over seeds; Worst.: the "
                    f"{'lowest' if higher else 'highest'} {name} of any (seed, draw), as QMF "
                    "takes both "
                    "over its trained runs and noise seeds. Level 0 is the clean test set. "
                    f"Noise draws per run and level: {draws}. Best bold, second underlined per "
                    "column.",
                ],
            )
        )
    return comparisons


def _level_order(label: str) -> tuple[float, ...]:
    return tuple(float(x) for x in label.removeprefix("level ").split("/"))


@dataclass(frozen=True)
class _Options:
    split: str
    baseline: str | None
    alpha: float
    resamples: int


def _compare(
    tree: RunTree,
    frame: pd.DataFrame,
    metrics: list[Metric],
    options: _Options,
    groups: list[str] | None = None,
) -> Comparison:
    """The main table's comparison over `frame` (a runs table with one column per metric); the
    baseline only where this table has it (a method evaluated elsewhere only is not one)."""
    baseline = options.baseline
    if baseline is not None and not {baseline} & (set(frame["row"]) | set(frame["method"])):
        baseline = None
    return compare_metrics(
        RunTree(tree.root, frame, [], tree.select, tree.roots, tree.settings, tree.narrowed),
        metrics,
        metrics,
        split=options.split,
        baseline=baseline,
        alpha=options.alpha,
        resamples=options.resamples,
        groups=groups,
    )


def missing_modality_comparisons(
    tree: RunTree,
    tables: list[EvaluationTable],
    options: _Options,
) -> list[Comparison]:
    """Per data set and subset metric (accuracy; per-region Dice for segmentation): its value
    on each subset of the modalities and the mean over subsets."""
    runs = tree.runs.set_index("run", drop=False)
    by_table: dict[tuple[str, str], list[dict[str, object]]] = {}
    names: dict[str, list[str]] = {}
    for table in tables:
        if table.method != "subsets" or not table.clean or len(table.modalities) < 2:
            continue
        run = runs.loc[table.run]
        for column in table.metrics:
            per_subset = table.frame.groupby("subset", sort=False)[column].mean()
            order = names.setdefault(run["dataset"], [])
            order += [s for s in per_subset.index if s not in order]
            record: dict[str, object] = {c: run[c] for c in META}
            record |= {f"{column}[{s}]": v for s, v in per_subset.items()}
            record[f"{column}[mean]"] = per_subset.mean()
            by_table.setdefault((run["dataset"], column), []).append(record)
    comparisons = []
    for (dataset, column), rows in sorted(by_table.items()):
        _, name, percent, higher = _subset_metric(column)
        order = sorted(names[dataset], key=lambda s: (s.count("+"), names[dataset].index(s)))
        metrics = [
            Metric(s, f"{column}[{s}]", s, percent=percent, higher_is_better=higher)
            for s in [*order, "mean"]
        ]
        frame = pd.DataFrame(rows)
        comparison = _compare(tree, frame, metrics, options)
        shown = set(frame["run"])
        masks = sorted(
            {t.mask for t in tables if t.method == "subsets" and t.clean and t.run in shown}
        )
        comparisons.append(
            replace(
                comparison,
                title=f"{dataset}: {name} with missing modalities, {options.split} split",
                delta_columns=False,
                caption=[
                    f"{options.split} split; {name}{' in %' if percent else ''} of the "
                    "prediction from each subset of the modalities (the others removed by mask "
                    f"{'/'.join(masks)}) and the mean over subsets, as C3R's Table 2 (and the "
                    "15-combination tables of the missing-MRI-sequence papers); mean ± sample "
                    "std over seeds. Best bold, second underlined per column.",
                ],
            )
        )
    return comparisons


@dataclass
class Robustness:
    """Every robustness table of a tree, and the evaluation tables left out."""

    tree: RunTree
    tables: list[EvaluationTable]
    noise: list[Comparison]
    missing: list[Comparison]
    left_out: list[LeftOut]

    @property
    def comparisons(self) -> list[Comparison]:
        return [*self.noise, *self.missing]


def robustness(
    tree: RunTree,
    *,
    split: str = "test",
    baseline: str | None = None,
    alpha: float = 0.05,
    resamples: int = 1000,
    required: bool = True,
    files: list[TableFile] | None = None,
) -> Robustness:
    """The robustness tables of the tree's runs (`files`: its `table_files`, if read already);
    with `required`, having none is an error."""
    check_options(split, alpha, resamples)
    if tree.runs.empty:
        raise UserError(f"no finished runs (summary.json) below {tree.where}.")
    tables, left_out = find_evaluation_tables(tree, split, files)
    options = _Options(split, baseline, alpha, resamples)
    noise = noise_comparisons(tree, tables, options)
    missing = missing_modality_comparisons(tree, tables, options)
    if required and not tables:
        raise UserError(
            f"no evaluation tables of the {split} split in the finished runs below {tree.where}: "
            "write them with `mmval value RUN/best.pt --method subsets [--corrupt "
            "MODALITY=KIND:LEVEL --repeats N] --out RUN/evaluate/NAME.parquet` or a recipe's "
            "`evaluate:` section."
        )
    if baseline and not any(c.baseline for c in [*noise, *missing]):
        raise UserError(f"--baseline {baseline}: no evaluated run of that method or row.")
    return Robustness(tree, tables, noise, missing, [*tree.left_out, *left_out])


def to_long_csv(result: Robustness) -> str:
    """Every robustness table in one CSV: a `table` column (its title) and `group` (the level,
    or the data set), then the main table's CSV columns."""
    frames = []
    for comparison in result.comparisons:
        frame = comparison.long.drop(columns="row").rename(columns={"dataset": "group"})
        frames.append(frame.assign(table=comparison.title))
    long = pd.concat(frames, ignore_index=True)
    first = ["table", "group"]
    return long[first + [c for c in long.columns if c not in first]].to_csv(
        index=False, float_format="%.6g"
    )
