"""The comparison: numbers over seeds per report row and data set, ranks, differences to a
baseline with their significance, and the table formats (rich, Markdown, CSV, LaTeX).

Layout as in the balancing papers: one row per method (recipe), a column group per data set
with one column per metric (plus the difference to the baseline when one is given), best bold
and second underlined per column. Every row ends with the hash of its resolved recipe (seed
excluded; one per data set) and the mmval version that trained it. Reference rows (published
numbers, `mmval.report.references`) come last, in italics, without ranks or tests.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.table import Table
from rich.text import Text

from mmval.errors import UserError
from mmval.report.references import REFERENCE_HASH, Reference
from mmval.report.runs import (
    _MISSING,
    METRIC_LABELS,
    LeftOut,
    Metric,
    RunTree,
    headline_metrics,
    metric_columns,
    resolve_metric,
    setting_key,
)
from mmval.report.significance import (
    PairedPredictions,
    hierarchical_bootstrap,
    holm,
    paired_bootstrap,
    paired_t_test,
    wilcoxon_signed_rank,
)

COLUMNS = ["dataset", "method", "n_seeds", "acc_mean", "acc_std", "f1_mean", "f1_std"]
# the model's size and the multiply-accumulates of one evaluation forward of one sample
# (summary.json, `mmval.engine.cost`), in the CSV after the metrics
COST_COLUMNS = ["parameters", "macs_per_sample"]
COST_LEGEND = (
    "Cost: the parameters of the model that predicts and the multiply-accumulates (MACs) of "
    "one evaluation forward of one sample, counted by mmval with torch's FLOP counter "
    "(matrix products, convolutions and attention; a method's extra training passes and "
    "modules are not counted), per {group} in column order."
)
SEED_MARK, SAMPLE_MARK = "†", "‡"
MIN_SEEDS = 3  # below this many matched seeds the report warns
_P_COLUMNS = ("delta", "p_ttest", "p_wilcoxon", "p_bootstrap", "p_hierarchical")
_LATEX_MARKS = {SEED_MARK: r"\dagger", SAMPLE_MARK: r"\ddagger"}
_BOOTSTRAP_METRICS = ("acc", "f1")


@dataclass
class Cell:
    """One (row, data set, metric): mean and sample std over seeds; rank 1 (best) or 2
    (second) in its column, else 0; the difference to the baseline and its tests."""

    mean: float
    std: float
    n: int
    rank: int = 0
    delta: float = math.nan
    p_ttest: float = math.nan
    p_wilcoxon: float = math.nan
    p_bootstrap: float = math.nan
    p_hierarchical: float = math.nan
    marker: str = ""


@dataclass
class Comparison:
    """Everything every format shows."""

    tree: RunTree
    split: str
    metrics: list[Metric]
    datasets: list[str]
    rows: list[str]
    cells: dict[tuple[str, str, str], Cell]
    recipes: dict[tuple[str, str], str]  # (row, data set) -> settings hash
    versions: dict[str, str]  # row -> mmval version(s)
    long: pd.DataFrame  # one line per (data set, row): the CSV
    baseline: str | None = None
    baselines: dict[str, str] = field(default_factory=dict)  # data set -> baseline row
    # (data set, row) -> its baseline row: the baseline's row at the same grid point when the
    # baseline has several recipes there (`baseline_fields` say which fields are matched)
    row_baselines: dict[tuple[str, str], str] = field(default_factory=dict)
    baseline_fields: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # rows with no baseline at their point
    references: list[str] = field(default_factory=list)  # reference rows (published numbers)
    alpha: float = 0.05
    resamples: int = 1000
    holm: bool = False  # the markers read Holm-adjusted p-values (per data set and metric)
    # a table that is not the main comparison (`mmval report --robustness`): its own title,
    # what its column groups are, and the sentences that replace the first legend line
    title: str | None = None
    group_label: str = "data set"
    caption: list[str] | None = None
    delta_columns: bool = True  # False: the differences only in the CSV (wide tables)

    @property
    def left_out(self) -> list[LeftOut]:
        return self.tree.left_out


def summarize(runs: pd.DataFrame, split: str = "test") -> pd.DataFrame:
    """The short table (quickstart): COLUMNS, accuracy and macro-F1 in percent, mean and
    sample std over seeds, one line per data set and report row (method, with its recipe
    variant when it has several)."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    columns = metric_columns(runs)
    metrics = [resolve_metric(m, split, columns) for m in ("acc", "f1")]
    return _aggregate(runs, metrics).assign(method=lambda t: t["row"])[COLUMNS]  # classification


def compare(
    tree: RunTree,
    metrics: list[str] | None = None,
    *,
    split: str = "test",
    baseline: str | None = None,
    alpha: float = 0.05,
    resamples: int = 1000,
    holm: bool = False,
    references: list[Reference] | None = None,
) -> Comparison:
    """The comparison of every finished run below the tree's root on `metrics` (default
    accuracy and macro-F1) of `split`, at each run's selected epoch (`tree.select`); with
    `holm`, the markers read p-values Holm-corrected across the rows compared with the
    baseline; `references` (published numbers) as rows of their own."""
    runs = tree.runs
    if runs.empty:
        raise UserError(f"no finished runs (summary.json) below {tree.where}.")
    check_options(split, alpha, resamples)
    columns = metric_columns(runs)
    headline = headline_metrics(runs)
    shown = _unique([resolve_metric(m, split, columns) for m in (metrics or headline)])
    every = _unique([*(resolve_metric(m, split, columns) for m in headline), *shown])
    comparison = compare_metrics(
        tree,
        shown,
        every,
        split=split,
        baseline=baseline,
        alpha=alpha,
        resamples=resamples,
        holm=holm,
    )
    add_references(comparison, references or [])
    return comparison


def check_options(split: str, alpha: float, resamples: int) -> None:
    if split not in ("test", "val"):
        raise UserError(f"--split must be test or val, not {split!r}.")
    if not 0 < alpha < 1 or resamples < 1:
        raise UserError("--alpha must lie between 0 and 1 and --resamples be at least 1.")


def compare_metrics(
    tree: RunTree,
    shown: list[Metric],
    every: list[Metric],
    *,
    split: str,
    baseline: str | None,
    alpha: float,
    resamples: int,
    groups: list[str] | None = None,
    holm: bool = False,
) -> Comparison:
    """The comparison on resolved metrics: `shown` in the tables, `every` (a superset) in the
    CSV. The tree's runs table may be any table with the META columns and one column per
    metric, its `dataset` column naming the column groups (in `groups` order, default
    sorted): the robustness tables build their own."""
    long = _aggregate(tree.runs, every)
    present = set(long["dataset"])
    datasets = [g for g in groups if g in present] if groups else sorted(present)
    position = {d: i for i, d in enumerate(datasets)}
    long = long.sort_values("dataset", key=lambda s: s.map(position), kind="stable")
    long = long.reset_index(drop=True)
    found = _baselines(long, baseline, tree) if baseline else _Baselines()
    first = sorted(set(found.of_row.values()))
    rows = first + sorted(set(long["row"]) - set(first))
    cells: dict[tuple[str, str, str], Cell] = {}
    for line in long.to_dict("records"):  # metric keys need not be identifiers
        for m in every:
            cells[(line["row"], line["dataset"], m.key)] = Cell(
                line[f"{m.key}_mean"], line[f"{m.key}_std"], line["n_seeds"]
            )
    comparison = Comparison(
        tree=tree,
        split=split,
        metrics=shown,
        datasets=datasets,
        rows=rows,
        cells=cells,
        recipes={(r.row, r.dataset): r.settings_hash for r in long.itertuples(index=False)},
        versions={
            row: ", ".join(sorted(set(g["mmval_version"]))) for row, g in long.groupby("row")
        },
        long=long,
        baseline=baseline,
        baselines=found.single,
        row_baselines=found.of_row,
        baseline_fields=found.fields,
        unmatched=found.unmatched,
        alpha=alpha,
        resamples=resamples,
        holm=holm,
    )
    _rank(comparison, every)
    if baseline:
        _test_against_baseline(comparison, every)
    return comparison


def add_references(comparison: Comparison, references: list[Reference]) -> None:
    """Published numbers as rows of their own, after the ranks and tests: last, as given, no
    rank, no difference, no test; in the CSV with `reference` as their recipe hash and 0
    seeds. A reference whose data set, metric or name does not fit the table is refused."""
    by_key = {m.key: m for m in comparison.metrics}
    aliases = {name: m for m in comparison.metrics for name in (m.key, m.label.lower())}
    lines: dict[tuple[str, str], dict[str, object]] = {}
    for ref in references:
        dataset = ref.dataset
        if dataset is None:
            if len(comparison.datasets) != 1:
                raise UserError(
                    f"{ref.where}: the report has {len(comparison.datasets)} data sets "
                    f"({', '.join(comparison.datasets)}); name one as NAME@DATASET=VALUE."
                )
            dataset = comparison.datasets[0]
        if dataset not in comparison.datasets:
            raise UserError(
                f"{ref.where}: no data set {dataset!r} in the report "
                f"({', '.join(comparison.datasets)})."
            )
        metric = comparison.metrics[0] if ref.metric is None else aliases.get(ref.metric.lower())
        if metric is None:
            shown = ", ".join(by_key)
            raise UserError(f"{ref.where}: the report shows no metric {ref.metric} ({shown}).")
        if ref.name in comparison.rows and ref.name not in comparison.references:
            raise UserError(f"{ref.where}: {ref.name!r} is already a row of runs; rename it.")
        key = (ref.name, dataset)
        if (ref.name, dataset, metric.key) in comparison.cells:
            raise UserError(f"{ref.where}: {ref.name} on {dataset} has a {metric.key} twice.")
        comparison.cells[(ref.name, dataset, metric.key)] = Cell(ref.value, math.nan, 0)
        if ref.name not in comparison.references:
            comparison.references.append(ref.name)
            comparison.rows.append(ref.name)
            comparison.versions[ref.name] = "-"
        comparison.recipes[key] = REFERENCE_HASH
        line = lines.setdefault(
            key,
            {
                "dataset": dataset,
                "method": ref.name,
                "n_seeds": 0,
                "variant": "",
                "selection": "",
                "settings_hash": REFERENCE_HASH,
                "mmval_version": "-",
                "seeds": "",
                "row": ref.name,
            },
        )
        line[f"{metric.key}_mean"] = ref.value
    for name in comparison.references:
        for dataset in comparison.datasets:
            comparison.recipes[(name, dataset)] = REFERENCE_HASH
    if lines:
        added = pd.DataFrame(list(lines.values()))
        comparison.long = pd.concat([comparison.long, added], ignore_index=True)


def _unique(metrics: list[Metric]) -> list[Metric]:
    return list(dict.fromkeys(metrics))


def _aggregate(runs: pd.DataFrame, metrics: list[Metric]) -> pd.DataFrame:
    lines = []
    for (dataset, row), group in runs.groupby(["dataset", "row"], sort=True):
        line: dict[str, object] = {
            "dataset": dataset,
            "method": group["method"].iloc[0],
            "n_seeds": len(group),
        }
        for m in metrics:
            values = group[m.column].astype(np.float64) * (100 if m.percent else 1)
            pooled = m.over_seeds != "mean"
            line[f"{m.key}_mean"] = (
                values.mean()
                if not pooled
                else values.min()
                if m.over_seeds == "min"
                else values.max()
            )
            line[f"{m.key}_std"] = math.nan if pooled else values.std(ddof=1)
        line |= {cost: _one_value(group[cost]) for cost in COST_COLUMNS}
        line |= {
            "variant": group["variant"].iloc[0],
            "selection": group["selection"].iloc[0],
            "data_fingerprint": " ".join(sorted(set(group["data_fingerprint"]))),
            "settings_hash": group["settings_hash"].iloc[0],
            "mmval_version": group["mmval_version"].iloc[0],
            "seeds": " ".join(str(s) for s in sorted(group["seed"])),
            "row": row,
        }
        lines.append(line)
    return pd.DataFrame(lines).astype(dict.fromkeys(COST_COLUMNS if lines else [], "Int64"))


def _one_value(values: pd.Series) -> int | None:
    """The cost of a row's runs (one recipe, one mmval version: the same for every seed);
    None when no run recorded it (runs before mmval counted costs)."""
    known = values.dropna()
    return int(known.iloc[0]) if len(known) else None


@dataclass
class _Baselines:
    of_row: dict[tuple[str, str], str] = field(default_factory=dict)
    single: dict[str, str] = field(default_factory=dict)  # data sets with one baseline row
    fields: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)


def _baselines(long: pd.DataFrame, baseline: str, tree: RunTree) -> _Baselines:
    """Each row's baseline row on its data set: the row named `baseline`, else the one row of
    that method. When the method has several recipes there (the points of a `grid:` sweep),
    each row is compared with the baseline's recipe at the same grid point: the one with the
    row's values of the fields in which the baseline's recipes differ (a row lacking such a
    field matches on the others). A row matching none or several has no baseline."""
    found = _Baselines()
    fields: set[str] = set()
    ambiguous: list[str] = []
    for dataset, group in long.groupby("dataset"):
        dataset = str(dataset)
        named = group[group["row"] == baseline]
        if named.empty:
            named = group[group["method"] == baseline]
        bases = list(named["row"])
        if len(bases) == 1:
            found.single[dataset] = bases[0]
            found.of_row |= {(dataset, row): bases[0] for row in group["row"]}
            continue
        if not bases:
            continue
        settings = _row_settings(tree, dataset)
        keys = sorted(
            k
            for k in set().union(*(settings.get(b, {}) for b in bases))
            if len({setting_key(settings.get(b, {}).get(k, _MISSING)) for b in bases}) > 1
        )
        fields |= set(keys)
        matched = 0
        for row in group["row"]:
            mine = settings.get(row)
            if row in bases or mine is None:
                found.of_row[(dataset, row)] = row if row in bases else ""
                continue
            match = [
                b
                for b in bases
                if keys
                and all(
                    setting_key(settings.get(b, {}).get(k, _MISSING)) == setting_key(mine[k])
                    for k in keys
                    if k in mine
                )
            ]
            found.of_row[(dataset, row)] = match[0] if len(match) == 1 else ""
            matched += len(match) == 1
            if len(match) != 1:
                found.unmatched.append(row)
        if not matched:
            ambiguous.append(f"{dataset}: {', '.join(repr(b) for b in bases)}")
    found.of_row = {key: b for key, b in found.of_row.items() if b}
    if ambiguous:
        raise UserError(
            f"--baseline {baseline} has several recipes that no other row matches by its "
            f"settings ({'; '.join(ambiguous)}); name one of them."
        )
    if not found.of_row:
        raise UserError(f"--baseline {baseline}: no finished run of that method or row.")
    found.fields = sorted(fields)
    found.unmatched = list(dict.fromkeys(found.unmatched))
    return found


def _row_settings(tree: RunTree, dataset: str) -> dict[str, dict[str, object]]:
    """Each row's recipe settings on a data set (those of its first run)."""
    runs = tree.runs[tree.runs["dataset"] == dataset]
    return {
        row: tree.settings[run]
        for row, run in zip(runs["row"], runs["run"], strict=True)
        if run in tree.settings
    }


def _display(value: float, metric: Metric) -> str:
    return f"{value:.2f}" if metric.percent else f"{value:.4f}"


def _rank(comparison: Comparison, metrics: list[Metric]) -> None:
    """Best (1) in every column with two rows or more, second (2) with three or more; equal
    displayed values share a rank."""
    for dataset in comparison.datasets:
        for m in metrics:
            shown = {
                row: float(_display(cell.mean, m))
                for row in comparison.rows
                if (cell := comparison.cells.get((row, dataset, m.key))) is not None
                and not math.isnan(cell.mean)
            }
            order = sorted(set(shown.values()), reverse=m.higher_is_better)
            for row, value in shown.items():
                place = order.index(value) + 1
                if (place == 1 and len(shown) >= 2) or (place == 2 and len(shown) >= 3):
                    comparison.cells[(row, dataset, m.key)].rank = place


def _test_against_baseline(comparison: Comparison, metrics: list[Metric]) -> None:
    runs = comparison.tree.runs
    added: dict[str, object] = {
        "baseline": [
            comparison.row_baselines.get((d, r), "")
            for d, r in zip(comparison.long["dataset"], comparison.long["row"], strict=True)
        ],
        "matched_seeds": 0,
    }
    for m in metrics:
        for column in _P_COLUMNS:
            added[f"{m.key}_{column}"] = math.nan
        added[f"{m.key}_marker"] = ""
    index = comparison.long.index
    long = comparison.long = pd.concat([comparison.long, pd.DataFrame(added, index=index)], axis=1)
    predictions: dict[str, pd.DataFrame | None] = {}
    for index, line in long.iterrows():
        pairs: list[PairedPredictions] | None = None  # read once per line, for every metric
        base_row = comparison.row_baselines.get((line["dataset"], line["row"]))
        if base_row is None or base_row == line["row"]:
            continue
        on_dataset = runs[runs["dataset"] == line["dataset"]]
        mine = on_dataset[on_dataset["row"] == line["row"]].set_index("seed")
        base = on_dataset[on_dataset["row"] == base_row].set_index("seed")
        seeds = sorted(set(mine.index) & set(base.index))
        long.loc[index, "matched_seeds"] = len(seeds)
        for m in metrics:
            cell = comparison.cells[(line["row"], line["dataset"], m.key)]
            base_cell = comparison.cells[(base_row, line["dataset"], m.key)]
            scale = 100 if m.percent else 1
            diffs = (mine.loc[seeds, m.column] - base.loc[seeds, m.column]).to_numpy(
                np.float64
            ) * scale
            cell.delta = cell.mean - base_cell.mean
            if m.over_seeds == "mean":  # a minimum over seeds is one number: nothing to pair
                cell.p_ttest = paired_t_test(diffs)
                cell.p_wilcoxon = wilcoxon_signed_rank(diffs)
                if m.key in _BOOTSTRAP_METRICS and m.column == f"test_{m.key}":
                    if pairs is None:
                        pairs = _paired_predictions(comparison.tree, mine, base, seeds, predictions)
                    if pairs:
                        _, cell.p_bootstrap = paired_bootstrap(
                            pairs, m.key, resamples=comparison.resamples
                        )
                        _, cell.p_hierarchical = hierarchical_bootstrap(
                            pairs, m.key, resamples=comparison.resamples
                        )
    _mark(comparison, metrics)


def _compared(comparison: Comparison) -> pd.DataFrame:
    """The lines of the long table compared with a baseline row (not the baseline itself)."""
    long = comparison.long
    base = [
        comparison.row_baselines.get((d, r))
        for d, r in zip(long["dataset"], long["row"], strict=True)
    ]
    keep = [b is not None and b != r for b, r in zip(base, long["row"], strict=True)]
    return long[keep]


def _mark(comparison: Comparison, metrics: list[Metric]) -> None:
    """† from the t-test p and ‡ from the hierarchical bootstrap p of each compared row; with
    `holm`, from those p-values Holm-adjusted across the rows compared with a baseline (one
    family per data set, metric and test; the CSV keeps both)."""
    long = comparison.long
    compared = _compared(comparison)
    for dataset, lines in compared.groupby("dataset", sort=False):
        for m in metrics:
            if m.over_seeds != "mean":
                continue
            cells = [comparison.cells[(row, dataset, m.key)] for row in lines["row"]]
            seeds = [c.p_ttest for c in cells]
            samples = [c.p_hierarchical for c in cells]
            if comparison.holm:
                seeds, samples = holm(seeds), holm(samples)
                long.loc[lines.index, f"{m.key}_p_ttest_holm"] = seeds
                long.loc[lines.index, f"{m.key}_p_hierarchical_holm"] = samples
            for cell, p_seeds, p_samples in zip(cells, seeds, samples, strict=True):
                cell.marker = (SEED_MARK if p_seeds < comparison.alpha else "") + (
                    SAMPLE_MARK if p_samples < comparison.alpha else ""
                )
    for index, line in compared.iterrows():
        for m in metrics:
            cell = comparison.cells[(line["row"], line["dataset"], m.key)]
            for column in (*_P_COLUMNS, "marker"):
                long.loc[index, f"{m.key}_{column}"] = getattr(cell, column)


def few_seeds(comparison: Comparison) -> str | None:
    """The warning for rows compared with a baseline on fewer than 3 matched seeds (their
    seed spread is barely estimated, whatever the markers say), or None."""
    if not comparison.row_baselines or "matched_seeds" not in comparison.long:
        return None
    compared = _compared(comparison)
    few = compared[compared["matched_seeds"] < MIN_SEEDS]
    if few.empty:
        return None
    listed = ", ".join(
        f"{r.row} on {r.dataset} ({r.matched_seeds})" for r in few.itertuples(index=False)
    )
    return (
        f"Warning: fewer than {MIN_SEEDS} seeds matched with the baseline: {listed}; with so "
        "few seeds the spread between seeds is barely estimated, so read its markers with care "
        "(train more seeds)."
    )


def _paired_predictions(
    tree: RunTree,
    mine: pd.DataFrame,
    base: pd.DataFrame,
    seeds: list[int],
    cache: dict[str, pd.DataFrame | None],
) -> list[PairedPredictions]:
    """Matched seeds whose two runs both saved test predictions of the selected epoch (under
    `--select test-max` best.pt may be another epoch), on the samples common to all of them
    (so one bootstrap resample serves every seed)."""
    loaded = []
    for seed in seeds:
        if any(f.loc[seed, "best_epoch"] != f.loc[seed, "checkpoint_epoch"] for f in (mine, base)):
            continue
        a, b = (_cached(tree, str(frame.loc[seed, "run"]), cache) for frame in (mine, base))
        if a is not None and b is not None:
            loaded.append(_matched(a, b))
    if not loaded:
        return []
    common = functools.reduce(np.intersect1d, (ids for ids, _, _, _ in loaded))
    pairs = []
    for ids, labels, pred, pred_base in loaded:
        at = np.searchsorted(ids, common)  # `ids` sorted: `common` in their order
        pairs.append(PairedPredictions(labels[at], pred[at], pred_base[at]))
    return pairs if len(common) else []


def _matched(
    a: pd.DataFrame, b: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The samples two runs both predicted with the same label, sorted by sample id: (ids,
    labels, predictions of `a`, of `b`); sample ids are unique within a run's predictions."""
    ids, in_a, in_b = np.intersect1d(
        a["sample_id"].to_numpy(object), b["sample_id"].to_numpy(object), return_indices=True
    )
    labels, other = a["label"].to_numpy()[in_a], b["label"].to_numpy()[in_b]
    same = labels == other
    return (
        ids[same],
        labels[same],
        a["pred"].to_numpy()[in_a][same],
        b["pred"].to_numpy()[in_b][same],
    )


def _cached(tree: RunTree, run: str, cache: dict[str, pd.DataFrame | None]) -> pd.DataFrame | None:
    if run not in cache:
        cache[run] = tree.predictions(run)
    return cache[run]


# ---- formats -------------------------------------------------------------------------------


def value_text(cell: Cell | None, metric: Metric) -> str:
    """`mean ± std` (just the mean for one seed); `-` when the row has no such run."""
    if cell is None or math.isnan(cell.mean):
        return "-"
    if math.isnan(cell.std):
        return _display(cell.mean, metric)
    return f"{_display(cell.mean, metric)} ± {_display(cell.std, metric)}"


def delta_text(cell: Cell | None, metric: Metric) -> str:
    if cell is None or math.isnan(cell.delta):
        return ""
    return f"{cell.delta:+.2f}" if metric.percent else f"{cell.delta:+.4f}"


def header_columns(comparison: Comparison) -> list[tuple[str, Metric, bool]]:
    """The value columns of one data set group: (label, metric, is the Δ column)."""
    columns = []
    for m in comparison.metrics:
        columns.append((m.label, m, False))
        if comparison.baseline and comparison.delta_columns:
            columns.append((f"Δ {m.label}", m, True))
    return columns


def recipe_hashes(comparison: Comparison, row: str) -> list[str]:
    """The row's recipe hash on each column group, in column order; once when all are the
    same (the levels of one data set)."""
    hashes = [comparison.recipes.get((row, d), "-") for d in comparison.datasets]
    return hashes[:1] if len(set(hashes)) == 1 else hashes


def recipe_text(comparison: Comparison, row: str) -> str:
    return " / ".join(recipe_hashes(comparison, row))


def cost_text(comparison: Comparison, row: str) -> str:
    """`11.7M params, 1.82G MACs` on each column group (once when all are the same), `-`
    where the runs did not record it."""
    long = comparison.long[comparison.long["row"] == row].set_index("dataset")
    texts = []
    for dataset in comparison.datasets:
        cost = long.loc[dataset] if dataset in long.index else None
        if cost is None or pd.isna(cost["parameters"]) or pd.isna(cost["macs_per_sample"]):
            texts.append("-")
        else:
            params, macs = _si(cost["parameters"]), _si(cost["macs_per_sample"])
            texts.append(f"{params} params, {macs} MACs")
    return " / ".join(texts[:1] if len(set(texts)) == 1 else texts)


def _si(count: int) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if count >= scale:
            return f"{count / scale:.3g}{unit}"
    return str(int(count))


def selection_text(comparison: Comparison) -> str:
    runs = comparison.tree.runs
    chosen = sorted(set(runs["selected_on"])) if "selected_on" in runs else ["acc"]
    named = " or ".join(METRIC_LABELS.get(key, key) for key in chosen)
    if chosen == ["acc"]:
        named = "accuracy"
    if comparison.tree.select == "test-max":
        return (
            f"epoch with the best test {named} (test-max, as the papers' official code: "
            "chosen on test, not an honest estimate)"
        )
    return f"checkpoint with the best validation {named}"


def percent_text(metrics: list[Metric]) -> str:
    """`accuracy and F1`, or the names of the other metrics shown in percent."""
    names = [m.label for m in metrics if m.percent]
    if set(names) <= {"Acc", "F1"}:
        return "accuracy and F1"
    return ", ".join(dict.fromkeys(names))


def legend(comparison: Comparison) -> list[str]:
    """The sentences under every table (the fewer-than-3-seeds warning last)."""
    percent = any(m.percent for m in comparison.metrics)
    first = comparison.caption or [
        f"{comparison.split} split, {selection_text(comparison)}; mean ± sample std over seeds"
        + (f" ({percent_text(comparison.metrics)} in %)" if percent else "")
        + "; best bold, second underlined per column."
    ]
    lines = [
        *first,
        "Recipe: sha256 (12 hex) of the resolved recipe without seed, per "
        f"{comparison.group_label} in column order; rows with different recipes are never "
        "averaged together.",
    ]
    if comparison.baseline:
        bootstrap = any(m.key in _BOOTSTRAP_METRICS for m in comparison.metrics)
        delta = (
            f"Δ: mean difference to {comparison.baseline}. "
            if comparison.delta_columns
            else f"Against {comparison.baseline} (differences in the CSV): "
        )
        lines.append(
            f"{delta}{SEED_MARK} paired t-test over matched seeds, p < {comparison.alpha:g}"
            + (
                f"; {SAMPLE_MARK} hierarchical bootstrap over matched seeds and their test "
                f"samples (Saravanan et al. 2020; {comparison.resamples} resamples, runs with "
                f"saved predictions), p < {comparison.alpha:g}"
                if bootstrap
                else ""
            )
            + (
                "; p-values Holm-corrected across the rows compared with the baseline (per "
                "data set, metric and test)"
                if comparison.holm
                else ""
            )
            + ". The CSV has every p-value, the sample-only bootstrap p and the Wilcoxon "
            "signed-rank p."
        )
    if comparison.baseline_fields:
        lines.append(
            f"{comparison.baseline} has several recipes: each row is compared with the one at "
            f"its grid point (the same {', '.join(comparison.baseline_fields)})"
            + (
                f"; no single one for {', '.join(comparison.unmatched)}, not tested."
                if comparison.unmatched
                else "."
            )
        )
    if comparison.references:
        lines.append(
            f"In italics: published numbers, not run here ({', '.join(comparison.references)}); "
            "no ranks, no tests."
        )
    if comparison.tree.narrowed:
        lines.append(f"Runs shown: {comparison.tree.narrowed}.")
    warning = few_seeds(comparison) if comparison.baseline else None
    if warning:
        lines.append(warning)
    return lines


def left_out_lines(comparison: Comparison) -> list[str]:
    return describe_left_out(comparison.left_out, comparison.tree.root)


def describe_left_out(left_out: list[LeftOut], root: Path) -> list[str]:
    return [f"{_relative(x.run, root)}: {x.reason}" for x in left_out]


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def to_csv(comparison: Comparison) -> str:
    """The long table: COLUMNS, then any other metric's mean/std, COST_COLUMNS, variant,
    selection (the test-max label), settings_hash, mmval_version, seeds and, with a
    baseline, the differences and tests per metric."""
    return comparison.long.drop(columns="row").to_csv(index=False, float_format="%.6g")


def to_markdown(comparison: Comparison) -> str:
    columns = header_columns(comparison)
    header = ["Method"] + [f"{d} {label}" for d in comparison.datasets for label, _, _ in columns]
    header += ["Recipe", "mmval"]
    lines = [
        _md_row(header),
        _md_row([":--", *("--:" for _ in header[1:-2]), ":--", ":--"]),
    ]
    for row in comparison.rows:
        cells = [f"*{_md_escape(row)}*" if row in comparison.references else _md_escape(row)]
        for dataset in comparison.datasets:
            for _, m, is_delta in columns:
                cell = comparison.cells.get((row, dataset, m.key))
                cells.append(delta_text(cell, m) if is_delta else _md_value(cell, m))
        cells += [recipe_text(comparison, row), comparison.versions[row]]
        lines.append(_md_row(cells))
    lines += ["", *legend(comparison)]
    left = left_out_lines(comparison)
    if left:
        lines += ["", "Left out (not averaged):", "", *(f"- {_md_escape(x)}" for x in left)]
    return "\n".join(lines)


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _md_value(cell: Cell | None, metric: Metric) -> str:
    text = value_text(cell, metric)
    if cell is not None and cell.rank == 1:
        text = f"**{text}**"
    elif cell is not None and cell.rank == 2:
        text = f"<u>{text}</u>"
    return text + (cell.marker if cell is not None else "")


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "<": r"$<$",
    ">": r"$>$",
    "|": r"\textbar{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    SEED_MARK: r"$^{\dagger}$",
    SAMPLE_MARK: r"$^{\ddagger}$",
}


def latex_escape(text: str) -> str:
    """Text as LaTeX source: the special characters escaped, ± Δ † ‡ as math."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def to_latex(comparison: Comparison) -> str:
    """A booktabs tabular (\\usepackage{booktabs}) to \\input inside a table float. The
    legend (for the caption) and the runs left out are comments above it, so the fragment
    keeps its natural width."""
    columns = header_columns(comparison)
    width = len(columns)
    spec = "l" + "".join("c" * width for _ in comparison.datasets) + "ll"
    groups = " & ".join(
        rf"\multicolumn{{{width}}}{{c}}{{{latex_escape(d)}}}" for d in comparison.datasets
    )
    rules = " ".join(
        rf"\cmidrule(lr){{{2 + i * width}-{1 + (i + 1) * width}}}"
        for i in range(len(comparison.datasets))
    )
    names = " & ".join(latex_escape(label) for _ in comparison.datasets for label, _, _ in columns)
    lines = [f"% {latex_escape(sentence)}" for sentence in legend(comparison)]
    lines += [f"% left out (not averaged): {latex_escape(x)}" for x in left_out_lines(comparison)]
    lines += [
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        f" & {groups} & & \\\\",
        rules,
        f"Method & {names} & Recipe & mmval \\\\",
        r"\midrule",
    ]
    for row in comparison.rows:
        name = latex_escape(row)
        cells = [rf"\textit{{{name}}}" if row in comparison.references else name]
        for dataset in comparison.datasets:
            for _, m, is_delta in columns:
                cell = comparison.cells.get((row, dataset, m.key))
                delta = delta_text(cell, m)
                cells.append((f"${delta}$" if delta else "") if is_delta else _latex_value(cell, m))
        hashes = " / ".join(
            rf"\texttt{{{latex_escape(h)}}}" for h in recipe_hashes(comparison, row)
        )
        cells += [hashes, latex_escape(comparison.versions[row])]
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines)


def _latex_value(cell: Cell | None, metric: Metric) -> str:
    text = latex_escape(value_text(cell, metric))
    if cell is not None and cell.rank == 1:
        text = rf"\textbf{{{text}}}"
    elif cell is not None and cell.rank == 2:
        text = rf"\underline{{{text}}}"
    if cell is not None and cell.marker:
        text += "$^{" + "".join(_LATEX_MARKS[ch] for ch in cell.marker) + "}$"
    return text


def to_rich(comparison: Comparison) -> Table:
    """The terminal table: two-line headers (data set, metric), bold best, underlined
    second."""
    columns = header_columns(comparison)
    table = Table(
        title=comparison.title
        or f"{comparison.split} split, {selection_text(comparison)} ({comparison.tree.where})",
        caption="\n".join(legend(comparison)),
        caption_justify="left",
    )
    table.add_column("Method")
    for dataset in comparison.datasets:
        for label, _, _ in columns:
            table.add_column(f"{dataset}\n{label}", justify="right")
    table.add_column("Recipe")
    table.add_column("mmval")
    for row in comparison.rows:
        cells: list[Text | str] = [
            Text(row, style="italic" if row in comparison.references else "")
        ]
        for dataset in comparison.datasets:
            for _, m, is_delta in columns:
                cell = comparison.cells.get((row, dataset, m.key))
                if is_delta:
                    cells.append(Text(delta_text(cell, m)))
                    continue
                style = {1: "bold", 2: "underline"}.get(cell.rank if cell else 0, "")
                text = Text(value_text(cell, m), style=style)
                text.append(cell.marker if cell else "")
                cells.append(text)
        cells += [Text(recipe_text(comparison, row)), Text(comparison.versions[row])]
        table.add_row(*cells)
    return table
