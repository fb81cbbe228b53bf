"""The report's figures (matplotlib; PNG in the HTML page, PNG, PDF and SVG with the plotted
numbers as CSV in a `--figures` folder): accuracy and per-modality unimodal accuracy per
epoch, the distribution of per-sample modality contributions (`mmval value` tables) and its
evolution over training (contrib_epoch<k>.parquet), and how often each modality is the
weakest. One figure per data set; curves are means over seeds, bands one std (IQR for
contributions).

Figures are drawn on `matplotlib.figure.Figure` objects, never through pyplot, so no GUI
backend or global figure state is involved.
"""

from __future__ import annotations

import io
import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import get_args

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.axes import Axes
from matplotlib.cbook import boxplot_stats
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mmval.artifacts.layout import CONTRIB_EPOCH, CONTRIB_GLOB, error_line
from mmval.atomic import write_atomic, write_text_atomic
from mmval.report.robustness import EvaluationTable, Robustness, robustness
from mmval.report.runs import LeftOut, RunTree, TableFile, table_files
from mmval.report.tables import Comparison
from mmval.valuation.config import MethodName
from mmval.valuation.summary import contribution_summary, mean_over_repeats

_DPI = 100
FIGURE_FORMATS = ("png", "pdf", "svg")
# no creation date in PDF and SVG files, so the same runs give the same files
_NO_DATE = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}


@dataclass(frozen=True)
class ReportFigure:
    """A finished figure: file stem, title, what it shows, the drawing and the numbers it
    plots (one row per plotted point, bar or cell)."""

    name: str
    title: str
    caption: str
    figure: Figure
    data: pd.DataFrame

    @cached_property
    def png(self) -> bytes:
        return _rendered(self.figure, "png")


@dataclass(frozen=True)
class ValueTable:
    """A `mmval value` table in long form (sample_id, modality, contribution), with where it
    came from."""

    path: Path
    dataset: str
    source: str  # the report row (and seed) or the file name
    split: str
    method: str
    table: pd.DataFrame
    benefit: str = "?"  # `mmval.benefit` of the table's metadata ("?" in tables without it)
    mask: str = "?"  # `mmval.mask`

    @property
    def label(self) -> str:
        """How figures name it: the run, then how it was valued (tables of one run folder
        valued otherwise are told apart)."""
        return f"{self.source} ({self.method}, {self.benefit}, mask {self.mask}, {self.split})"


def make_figures(comparison: Comparison) -> list[ReportFigure]:
    """Every figure the runs below the comparison's root have data for."""
    tree, split = comparison.tree, comparison.split
    figures: list[ReportFigure] = []
    histories = {run: tree.history(run) for run in tree.runs["run"]}
    files = table_files(tree)  # their footers read once for both kinds of figure
    tables = find_value_tables(tree, files)
    for dataset in comparison.datasets:
        runs = tree.runs[tree.runs["dataset"] == dataset]
        rows = [r for r in comparison.rows if r in set(runs["row"])]
        figures += _accuracy_curves(dataset, runs, rows, histories, split)
        figures += _unimodal_curves(dataset, runs, rows, histories, split)
        figures += _contribution_epochs(dataset, runs, rows)
        on_dataset = [t for t in tables if t.dataset == dataset]
        figures += _contribution_distribution(dataset, on_dataset)
        figures += _weakest_share(dataset, on_dataset)
    evaluated = robustness(tree, split=split, required=False, files=files)
    return figures + robustness_figures(evaluated)


def write_figures(figures: list[ReportFigure], folder: Path) -> list[Path]:
    """Each figure as `folder/<name>.png`, `.pdf` and `.svg` (for papers: vector), with the
    numbers it plots in `folder/<name>.csv`; each file atomically (a full disk leaves none
    torn)."""
    paths = []
    for figure in figures:
        for kind in FIGURE_FORMATS:
            path = folder / f"{figure.name}.{kind}"
            data = figure.png if kind == "png" else _rendered(figure.figure, kind)
            write_atomic(path, lambda tmp, data=data: tmp.write_bytes(data))
            paths.append(path)
        path = folder / f"{figure.name}.csv"
        write_text_atomic(path, figure.data.to_csv(index=False, float_format="%.6g"))
        paths.append(path)
    return paths


def find_value_tables(tree: RunTree, files: list[TableFile] | None = None) -> list[ValueTable]:
    """`mmval value` contribution tables anywhere below the root, recognised by their
    `mmval.method` metadata (training-time tables are plotted per epoch instead; subsets and
    dcor tables hold no per-modality contributions). A table inside a finished run folder is
    named after that run's row and seed. A table that cannot be read is added to the tree's
    left-out list, which the report prints. `files`: the tree's `table_files`, if read."""
    by_run = {Path(r.run): r for r in tree.runs.itertuples(index=False)}
    found = []
    for file in table_files(tree) if files is None else files:
        path, info = file.path, file.info
        if info is None:
            if file.run is not None:  # elsewhere it may be anything
                _leave_out(tree, path, f"damaged: {file.damaged}")
            continue
        if info.get("mmval.method") not in get_args(MethodName):
            continue
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError, pa.ArrowException) as exc:
            _leave_out(tree, path, f"damaged: the value table cannot be read ({error_line(exc)})")
            continue
        run = by_run.get(path.parent)
        dataset = info.get("mmval.dataset") or (run.dataset if run is not None else "?")
        source = f"{run.row} seed{run.seed}" if run is not None else path.stem
        found.append(
            ValueTable(
                path=path,
                dataset=dataset,
                source=source,
                split=info.get("mmval.split", "?"),
                method=info["mmval.method"],
                table=_long(frame, info),
                benefit=info.get("mmval.benefit", "?"),
                mask=info.get("mmval.mask", "?"),
            )
        )
    return found


def _leave_out(tree: RunTree, path: Path, reason: str) -> None:
    if all(x.run != path for x in tree.left_out):
        tree.left_out.append(LeftOut(path, reason))


def _long(frame: pd.DataFrame, info: dict[str, str]) -> pd.DataFrame:
    """A `--wide` table back to one row per (sample, modality); a table valued under
    corruptions averaged over its repeats (`mean_over_repeats`)."""
    keys = [k for k in ("repeat", "sample_id") if k in frame.columns]
    if "modality" in frame.columns:
        return mean_over_repeats(frame[[*keys, "modality", "contribution"]])
    modalities = json.loads(info["mmval.modalities"])
    long = frame.melt(
        id_vars=keys, value_vars=modalities, var_name="modality", value_name="contribution"
    )
    return mean_over_repeats(long)


def _rendered(fig: Figure, kind: str) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=kind, dpi=_DPI, bbox_inches="tight", metadata=_NO_DATE.get(kind))
    return buffer.getvalue()


def _grid(count: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list[Axes]]:
    cols = min(3, count)
    rows = math.ceil(count / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for extra in axes[count:]:
        extra.set_visible(False)
    return fig, axes[:count]


def _seed_curves(histories: list[pd.DataFrame], column: str) -> pd.DataFrame | None:
    """Epoch x seed values of `column` (epochs without an evaluation dropped)."""
    parts = [
        h.set_index("epoch")[column].dropna().rename(i)
        for i, h in enumerate(histories)
        if column in h
    ]
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, axis=1) if parts else None


def _epochs_axis(ax: Axes, title: str, ylabel: str) -> None:
    ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _plot_mean_std(
    ax: Axes, curves: pd.DataFrame, label: str, scale: float, **style
) -> pd.DataFrame:
    """The mean curve over seeds with a band of one std; returns what it plots (epoch, mean,
    std, seeds)."""
    mean = curves.mean(axis=1) * scale
    std = curves.std(axis=1, ddof=1).fillna(0) * scale
    (line,) = ax.plot(mean.index, mean.to_numpy(), label=label, **style)
    if curves.shape[1] > 1:
        ax.fill_between(
            mean.index,
            (mean - std).to_numpy(),
            (mean + std).to_numpy(),
            alpha=0.15,
            lw=0,
            color=line.get_color(),
        )
    return pd.DataFrame(
        {
            "epoch": mean.index.to_numpy(),
            "mean": mean.to_numpy(),
            "std": curves.std(axis=1, ddof=1).to_numpy() * scale,
            "seeds": curves.notna().sum(axis=1).to_numpy(),
        }
    )


def _accuracy_curves(
    dataset: str,
    runs: pd.DataFrame,
    rows: list[str],
    histories: dict[str, pd.DataFrame],
    split: str,
) -> list[ReportFigure]:
    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.subplots()
    drawn = []
    for row in rows:
        curves = _seed_curves(
            [histories[r] for r in runs[runs["row"] == row]["run"]], f"{split}_acc"
        )
        if curves is not None:
            drawn.append(_plot_mean_std(ax, curves, row, 100).assign(row=row))
    if not drawn:
        return []
    _epochs_axis(ax, dataset, f"{split} accuracy (%)")
    ax.legend(fontsize="small", loc="lower right")
    return [
        ReportFigure(
            f"accuracy-{_slug(dataset)}",
            f"{dataset}: {split} accuracy per epoch",
            f"{split} accuracy of the fused prediction after every evaluated epoch, mean over "
            "seeds with a band of one standard deviation.",
            fig,
            _first(pd.concat(drawn, ignore_index=True), "row"),
        )
    ]


def _unimodal_curves(
    dataset: str,
    runs: pd.DataFrame,
    rows: list[str],
    histories: dict[str, pd.DataFrame],
    split: str,
) -> list[ReportFigure]:
    """Rows whose fusion has per-modality logits log `<split>_acc_<modality>`; a single
    modality (unimodal baselines) has nothing to compare and is skipped."""
    prefix = f"{split}_acc_"
    panels = []
    for row in rows:
        row_histories = [histories[r] for r in runs[runs["row"] == row]["run"]]
        modalities = list(
            dict.fromkeys(
                c.removeprefix(prefix) for h in row_histories for c in h if c.startswith(prefix)
            )
        )
        if len(modalities) >= 2:
            panels.append((row, row_histories, modalities))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    drawn = []
    for ax, (row, row_histories, modalities) in zip(axes, panels, strict=True):
        for modality in modalities:
            curves = _seed_curves(row_histories, prefix + modality)
            if curves is not None:
                part = _plot_mean_std(ax, curves, modality, 100)
                drawn.append(part.assign(row=row, modality=modality))
        fused = _seed_curves(row_histories, f"{split}_acc")
        if fused is not None:
            part = _plot_mean_std(ax, fused, "fused", 100, color="black", ls="--")
            drawn.append(part.assign(row=row, modality="fused"))
        _epochs_axis(ax, row, f"{split} accuracy (%)")
        ax.legend(fontsize="x-small")
    return [
        ReportFigure(
            f"unimodal-{_slug(dataset)}",
            f"{dataset}: unimodal accuracy per epoch",
            f"{split} accuracy of each modality's own logits inside the trained model (fusions "
            "with per-modality logits), mean over seeds; dashed: the fused prediction.",
            fig,
            _first(pd.concat(drawn, ignore_index=True), "row", "modality"),
        )
    ]


def _contribution_epochs(dataset: str, runs: pd.DataFrame, rows: list[str]) -> list[ReportFigure]:
    """Training-time valuation: per row, each modality's mean contribution per epoch (pooled
    over seeds), with its interquartile range."""
    panels = []
    for row in rows:
        frames = []
        for run in runs[runs["row"] == row]["run"]:
            for path in Path(run).glob(CONTRIB_GLOB):
                match = CONTRIB_EPOCH.search(path.name)
                if match:
                    part = pd.read_parquet(path, columns=["modality", "contribution"])
                    frames.append(part.assign(epoch=int(match.group(1))))
        if frames:
            panels.append((row, pd.concat(frames, ignore_index=True)))
    if not panels:
        return []
    fig, axes = _grid(len(panels))
    drawn = []
    for ax, (row, frame) in zip(axes, panels, strict=True):
        stats = frame.groupby(["modality", "epoch"], sort=False)["contribution"]
        summary = stats.agg(
            mean="mean", q1=lambda x: x.quantile(0.25), q3=lambda x: x.quantile(0.75)
        ).reset_index()
        drawn.append(summary.sort_values(["modality", "epoch"]).assign(row=row))
        for modality, part in summary.groupby("modality", sort=False):
            part = part.sort_values("epoch")
            (line,) = ax.plot(part["epoch"], part["mean"], marker="o", ms=3, label=modality)
            ax.fill_between(
                part["epoch"], part["q1"], part["q3"], alpha=0.12, lw=0, color=line.get_color()
            )
        _epochs_axis(ax, row, "contribution")
        ax.legend(fontsize="x-small")
    return [
        ReportFigure(
            f"contribution-epochs-{_slug(dataset)}",
            f"{dataset}: modality contribution during training",
            "Per-sample contribution of each modality from the training-time valuation "
            "(contrib_epoch<k>.parquet of the recipe's valuation section): mean over the valued "
            "samples and seeds, band from the first to the third quartile.",
            fig,
            _first(pd.concat(drawn, ignore_index=True), "row", "modality"),
        )
    ]


def _grouped(tables: list[ValueTable]) -> list[tuple[str, pd.DataFrame]]:
    """One (label, table) per value table, never pooled: two tables of one run folder valued
    with another benefit or mask are two settings, and pooling them gave numbers of neither.
    Labels that would coincide (the same setting in two files) get the file name."""
    counts: dict[str, int] = {}
    for t in tables:
        counts[t.label] = counts.get(t.label, 0) + 1
    return [
        (t.label if counts[t.label] == 1 else f"{t.label} {t.path.name}", t.table) for t in tables
    ]


def _contribution_distribution(dataset: str, tables: list[ValueTable]) -> list[ReportFigure]:
    groups = _grouped(tables)
    if not groups:
        return []
    fig, axes = _grid(len(groups), width=max(4.2, 0.9 * _most_modalities(groups)))
    boxes = []
    for ax, (label, frame) in zip(axes, groups, strict=True):
        modalities = list(dict.fromkeys(frame["modality"]))
        data = [frame.loc[frame["modality"] == m, "contribution"].to_numpy() for m in modalities]
        ax.boxplot(data, tick_labels=modalities, showmeans=True, flierprops={"ms": 2})
        for modality, values, box in zip(modalities, data, boxplot_stats(data), strict=True):
            boxes.append(
                {
                    "table": label,
                    "modality": modality,
                    "samples": len(values),
                    "mean": box["mean"],
                    "q1": box["q1"],
                    "median": box["med"],
                    "q3": box["q3"],
                    "whisker_low": box["whislo"],
                    "whisker_high": box["whishi"],
                    "outliers": len(box["fliers"]),
                }
            )
        ax.set(title=label, ylabel="contribution")
        ax.title.set_fontsize("small")
        ax.grid(alpha=0.3, axis="y")
    return [
        ReportFigure(
            f"contribution-{_slug(dataset)}",
            f"{dataset}: distribution of per-sample modality contributions",
            "Per-sample contribution of each modality from `mmval value` tables below the "
            "report folder (box: quartiles, whiskers 1.5 IQR, triangle: mean).",
            fig,
            pd.DataFrame(boxes),
        )
    ]


def weakest_shares(tables: list[ValueTable]) -> pd.DataFrame:
    """What the weakest-modality chart plots: per table (`label`) and modality, the percentage
    of valued samples in which that modality alone has the lowest contribution."""
    rows = [
        {"label": label, "modality": m, "weakest_percent": 100 * float(share)}
        for label, frame in _grouped(tables)
        for m, share in contribution_summary(frame)[["modality", "weakest_share"]].itertuples(
            index=False
        )
    ]
    return pd.DataFrame(rows, columns=["label", "modality", "weakest_percent"])


def _weakest_share(dataset: str, tables: list[ValueTable]) -> list[ReportFigure]:
    data = weakest_shares(tables)
    if data.empty:
        return []
    labels = list(dict.fromkeys(data["label"]))
    modalities = list(dict.fromkeys(data["modality"]))
    fig = Figure(figsize=(max(6.0, 1.6 * len(labels) + 0.5 * len(modalities)), 4.0))
    fig.set_layout_engine("constrained")
    ax = fig.subplots()
    width = 0.8 / len(modalities)
    x = np.arange(len(labels))
    bars = data.pivot(index="label", columns="modality", values="weakest_percent")
    for i, modality in enumerate(modalities):
        heights = bars.reindex(labels)[modality].fillna(0.0).to_numpy()
        ax.bar(x + (i - (len(modalities) - 1) / 2) * width, heights, width, label=modality)
    ax.set_xticks(x, labels, fontsize="x-small", rotation=10)
    ax.set(ylabel="samples where it is the weakest (%)", title=dataset)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), title="modality")
    return [
        ReportFigure(
            f"weakest-{_slug(dataset)}",
            f"{dataset}: how often each modality is the weakest",
            "Share of valued samples in which the modality alone has the lowest contribution "
            "(samples where several modalities tie for the lowest count for none); one group "
            "of bars per value table, labelled run (valuation method, benefit, mask, split).",
            fig,
            data.rename(columns={"label": "table"}),
        )
    ]


def _first(frame: pd.DataFrame, *columns: str) -> pd.DataFrame:
    """The frame with `columns` (what a row of numbers belongs to) first."""
    return frame[[*columns, *(c for c in frame.columns if c not in columns)]]


def _most_modalities(groups: list[tuple[str, pd.DataFrame]]) -> int:
    return max(frame["modality"].nunique() for _, frame in groups)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)


def robustness_figures(result: Robustness) -> list[ReportFigure]:
    """Accuracy against the noise level per corruption, and the feature-mask heatmaps."""
    figures = [_noise_curves(c) for c in result.noise]
    masked = [t for t in result.tables if t.method == "feature-mask"]
    runs = result.tree.runs.set_index("run")
    for dataset in sorted({runs.loc[t.run, "dataset"] for t in masked}):
        on_dataset = [t for t in masked if runs.loc[t.run, "dataset"] == dataset]
        figures.append(_feature_mask_heatmaps(dataset, on_dataset, runs))
    return figures


def _noise_curves(comparison: Comparison) -> ReportFigure:
    levels = comparison.datasets  # `level 5`, or `level 5/10` when the levels differ
    single = all("/" not in level for level in levels)
    x = [float(level.removeprefix("level ")) if single else i for i, level in enumerate(levels)]
    fig = Figure(figsize=(7.0, 4.2), layout="constrained")
    ax = fig.subplots()
    plotted = []
    for row in comparison.rows:
        avg = [comparison.cells.get((row, level, "avg")) for level in levels]
        worst = [comparison.cells.get((row, level, "worst")) for level in levels]
        points = [(xi, a, w) for xi, a, w in zip(x, avg, worst, strict=True) if a is not None]
        xs = [p[0] for p in points]
        mean = np.array([p[1].mean for p in points])
        std = np.nan_to_num(np.array([p[1].std for p in points]))
        (line,) = ax.plot(xs, mean, marker="o", ms=4, label=row)
        ax.fill_between(xs, mean - std, mean + std, alpha=0.15, lw=0, color=line.get_color())
        ax.plot(xs, [p[2].mean for p in points], ls=":", color=line.get_color())
        plotted += [
            {
                "row": row,
                "level": level,
                "avg_mean": a.mean,
                "avg_std": a.std,
                "worst": w.mean if w is not None else math.nan,
            }
            for level, a, w in zip(levels, avg, worst, strict=True)
            if a is not None
        ]
    if not single:
        ax.set_xticks(x, [level.removeprefix("level ") for level in levels])
    ax.set(xlabel="noise level", ylabel=f"{comparison.split} accuracy (%)")
    ax.set_title(comparison.title or "", fontsize="small")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return ReportFigure(
        f"noise-{_slug(comparison.title or 'noise')}",
        comparison.title or "accuracy under noise",
        "Accuracy on all modalities against the noise level: Avg. (mean over seeds of each "
        "run's mean over noise draws, band one std over seeds) solid, Worst. (lowest of any "
        "seed and draw) dotted.",
        fig,
        pd.DataFrame(plotted),
    )


def _feature_mask_heatmaps(
    dataset: str, tables: list[EvaluationTable], runs: pd.DataFrame
) -> ReportFigure:
    """Per report row: accuracy by (modality, ratio of its feature dimensions masked), mean
    over repeats and seeds."""
    per_row: dict[str, list[pd.DataFrame]] = {}
    for table in tables:
        accuracy = table.frame.groupby(["modality", "ratio"], sort=False)["correct"].mean()
        per_row.setdefault(runs.loc[table.run, "row"], []).append(accuracy.rename(table.run))
    fig, axes = _grid(len(per_row), width=5.0, height=2.6)
    cells = []
    for ax, (row, parts) in zip(axes, sorted(per_row.items()), strict=True):
        mean = pd.concat(parts, axis=1).mean(axis=1) * 100
        cells.append(mean.rename("accuracy").reset_index().assign(row=row, seeds=len(parts)))
        grid = mean.unstack("ratio")
        image = ax.imshow(grid.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(grid.shape[1]), [f"{r:g}" for r in grid.columns], fontsize="small")
        ax.set_yticks(range(grid.shape[0]), list(grid.index), fontsize="small")
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize="x-small", color="w")
        ax.set(title=row, xlabel="ratio of feature dimensions masked")
        ax.title.set_fontsize("small")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
    return ReportFigure(
        f"feature-mask-{_slug(dataset)}",
        f"{dataset}: accuracy with feature dimensions masked",
        "IMML's probe (`mmval value --method feature-mask`): accuracy of the frozen model when a "
        "random share of one modality's feature dimensions is set to zero before fusion, mean "
        "over the draws and seeds.",
        fig,
        _first(pd.concat(cells, ignore_index=True), "row"),
    )
