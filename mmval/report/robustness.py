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
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from mmval.artifacts.layout import CONTRIB_EPOCH, METRICS, PREDICTIONS, error_line
from mmval.errors import UserError
from mmval.report.runs import META, LeftOut, Metric, RunTree
from mmval.report.tables import Comparison, check_options, compare_metrics

EVALUATION_METHODS = ("subsets", "feature-mask")
# `mmval.data.corrupt.Corruption` as written in the metadata; parsed here so that the
# report imports no torch
_CORRUPTION = re.compile(r"^(?P<modality>[^=]+)=(?P<kind>[a-z-]+):(?P<level>[0-9.]+)$")
CLEAN = "clean"


@dataclass(frozen=True)
class EvaluationTable:
    """One evaluation table of a finished run: its run folder, method, split, the corruptions
    it was computed under (modality, kind, level) and the modalities of the model."""

    path: Path
    run: str
    method: str
    split: str
    corruptions: tuple[tuple[str, str, float], ...]
    modalities: tuple[str, ...]

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

    def read(self) -> pd.DataFrame:
        return pd.read_parquet(self.path)


def find_evaluation_tables(
    tree: RunTree, split: str
) -> tuple[list[EvaluationTable], list[LeftOut]]:
    """The subsets and feature-mask tables of `split` inside the tree's finished runs (at any
    depth below the run folder, e.g. `evaluate/`), and the ones left out with the reason."""
    runs = set(tree.runs["run"])
    found: list[EvaluationTable] = []
    left_out: list[LeftOut] = []
    seen: dict[tuple[str, str, str, str], Path] = {}
    for path in sorted(tree.root.rglob("*.parquet")):
        if path.name in (METRICS, PREDICTIONS) or CONTRIB_EPOCH.search(path.name):
            continue  # a run's own files: never evaluation tables
        run = next((str(p) for p in path.parents if str(p) in runs), None)
        try:
            info = _metadata(path)
        except _Damaged as exc:
            if run is not None:  # elsewhere it may be anything; inside a run it is mmval's
                left_out.append(LeftOut(path, f"damaged: {exc}"))
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
    """The table as its metadata describes it, its data read once to know it is whole."""
    try:
        corruptions = tuple(_parse(c) for c in json.loads(info.get("mmval.corruptions", "[]")))
        modalities = tuple(json.loads(info["mmval.modalities"]))
    except (ValueError, KeyError, TypeError, UserError) as exc:
        raise _Damaged(f"the evaluation table's metadata is not mmval's ({exc})") from exc
    try:
        pq.read_table(path)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _Damaged(f"the evaluation table cannot be read ({error_line(exc)})") from exc
    return EvaluationTable(
        path=path,
        run=run,
        method=info["mmval.method"],
        split=split,
        corruptions=corruptions,
        modalities=modalities,
    )


def _metadata(path: Path) -> dict[str, str]:
    """The `mmval.*` metadata of a Parquet file; `_Damaged` when its footer cannot be read."""
    try:
        meta = pq.read_schema(path).metadata or {}
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise _Damaged(f"not a Parquet file mmval can read ({error_line(exc)})") from exc
    return {k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"mmval.")}


def _parse(text: str) -> tuple[str, str, float]:
    match = _CORRUPTION.match(text)
    if match is None:
        raise UserError(f"an evaluation table records the corruption {text!r}, which is not one.")
    return match["modality"], match["kind"], float(match["level"])


def full_set_accuracy(table: pd.DataFrame, modalities: tuple[str, ...]) -> pd.Series:
    """Accuracy on all the model's modalities, per repeat (the noise draws)."""
    full = table[table["size"] == len(modalities)]
    if "repeat" not in full:  # written without --corrupt by an mmval before the column
        return pd.Series([full["correct"].mean()])
    return full.groupby("repeat")["correct"].mean()


def noise_comparisons(
    tree: RunTree,
    tables: list[EvaluationTable],
    *,
    split: str,
    baseline: str | None,
    alpha: float,
    resamples: int,
) -> list[Comparison]:
    """One table per (data set, corruption family), a column group per level."""
    subsets = [t for t in tables if t.method == "subsets"]
    clean = {t.run: t for t in subsets if t.clean}
    noisy = [t for t in subsets if not t.clean]
    runs = tree.runs.set_index("run", drop=False)
    records: dict[tuple[str, str], list[dict[str, object]]] = {}
    for table in noisy:
        run = runs.loc[table.run]
        per_run = [(table.level, table)]
        if table.run in clean:
            per_run.append(("level 0", clean[table.run]))
        for level, source in per_run:
            accuracy = full_set_accuracy(source.read(), source.modalities)
            records.setdefault((run["dataset"], table.family), []).append(
                {
                    **{c: run[c] for c in META},
                    "dataset": level,
                    "avg": accuracy.mean(),
                    "worst": accuracy.min(),
                    "draws": len(accuracy),
                }
            )
    metrics = [
        Metric("avg", "avg", "Avg.", percent=True, higher_is_better=True),
        Metric("worst", "worst", "Worst.", percent=True, higher_is_better=True, over_seeds="min"),
    ]
    comparisons = []
    for (dataset, family), rows in sorted(records.items()):
        frame = pd.DataFrame(rows).drop_duplicates(["run", "dataset"])
        levels = sorted(set(frame["dataset"]), key=_level_order)
        comparison = compare_metrics(
            RunTree(tree.root, frame, [], tree.select),
            metrics,
            metrics,
            split=split,
            baseline=_present(baseline, frame),
            alpha=alpha,
            resamples=resamples,
            groups=levels,
        )
        noised = frame[frame["dataset"] != "level 0"]
        draws = "/".join(str(n) for n in sorted(set(noised["draws"])))
        comparisons.append(
            replace(
                comparison,
                title=f"{dataset}: accuracy under noise ({family}), {split} split",
                group_label="level",
                caption=[
                    f"{split} split, {family}; accuracy on all modalities in %. Avg.: each "
                    "run's accuracy averaged over its noise draws, then mean ± sample std over "
                    "seeds; Worst.: the lowest accuracy of any (seed, draw), as QMF takes both "
                    "over its trained runs and noise seeds. Level 0 is the clean test set. "
                    f"Noise draws per run and level: {draws}. Best bold, second underlined per "
                    "column.",
                ],
            )
        )
    return comparisons


def _level_order(label: str) -> tuple[float, ...]:
    return tuple(float(x) for x in label.removeprefix("level ").split("/"))


def _present(baseline: str | None, frame: pd.DataFrame) -> str | None:
    """The baseline when this table has it (a method evaluated elsewhere only is not one)."""
    if baseline is None:
        return None
    return baseline if {baseline} & (set(frame["row"]) | set(frame["method"])) else None


def missing_modality_comparisons(
    tree: RunTree,
    tables: list[EvaluationTable],
    *,
    split: str,
    baseline: str | None,
    alpha: float,
    resamples: int,
) -> list[Comparison]:
    """Per data set: accuracy on each subset of the modalities and the mean over subsets."""
    runs = tree.runs.set_index("run", drop=False)
    by_dataset: dict[str, list[dict[str, object]]] = {}
    names: dict[str, list[str]] = {}
    for table in tables:
        if table.method != "subsets" or not table.clean or len(table.modalities) < 2:
            continue
        run = runs.loc[table.run]
        frame = table.read()
        per_subset = frame.groupby("subset", sort=False)["correct"].mean()
        order = names.setdefault(run["dataset"], [])
        order += [s for s in per_subset.index if s not in order]
        record: dict[str, object] = {c: run[c] for c in META}
        record |= {f"acc[{s}]": v for s, v in per_subset.items()}
        record["acc[mean]"] = per_subset.mean()
        by_dataset.setdefault(run["dataset"], []).append(record)
    comparisons = []
    for dataset, rows in sorted(by_dataset.items()):
        order = sorted(names[dataset], key=lambda s: (s.count("+"), names[dataset].index(s)))
        metrics = [
            Metric(s, f"acc[{s}]", s, percent=True, higher_is_better=True) for s in [*order, "mean"]
        ]
        frame = pd.DataFrame(rows)
        comparison = compare_metrics(
            RunTree(tree.root, frame, [], tree.select),
            metrics,
            metrics,
            split=split,
            baseline=_present(baseline, frame),
            alpha=alpha,
            resamples=resamples,
        )
        masks = sorted(set(frame["run"].map(lambda r: _mask_of(tables, r))))
        comparisons.append(
            replace(
                comparison,
                title=f"{dataset}: accuracy with missing modalities, {split} split",
                delta_columns=False,
                caption=[
                    f"{split} split; accuracy in % of the prediction from each subset of the "
                    f"modalities (the others removed by mask {'/'.join(masks)}) and the mean "
                    "over subsets, as C3R's Table 2; mean ± sample std over seeds. Best bold, "
                    "second underlined per column.",
                ],
            )
        )
    return comparisons


def _mask_of(tables: list[EvaluationTable], run: str) -> str:
    path = next(t.path for t in tables if t.run == run and t.method == "subsets" and t.clean)
    return _metadata(path).get("mmval.mask", "?")


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
) -> Robustness:
    """The robustness tables of the tree's runs; with `required`, having none is an error."""
    check_options(split, alpha, resamples)
    if tree.runs.empty:
        raise UserError(f"no finished runs (summary.json) below {tree.root}.")
    tables, left_out = find_evaluation_tables(tree, split)
    options = {"split": split, "baseline": baseline, "alpha": alpha, "resamples": resamples}
    noise = noise_comparisons(tree, tables, **options)
    missing = missing_modality_comparisons(tree, tables, **options)
    if required and not tables:
        raise UserError(
            f"no evaluation tables of the {split} split in the finished runs below {tree.root}: "
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
