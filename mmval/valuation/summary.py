"""Summaries of a contribution table (long form: sample_id, modality, contribution), for
`mmval value`, the quickstart and the report. Torch-free, so the report reads them without torch."""

from __future__ import annotations

import numpy as np
import pandas as pd


def mean_over_repeats(table: pd.DataFrame) -> pd.DataFrame:
    """A table valued under corruptions (`mmval value --corrupt`, a `repeat` column) as one row
    per (sample, modality), the contribution averaged over the repeats: each sample's expected
    contribution under the corruption. A table without repeats is returned as it is."""
    if "repeat" not in table:
        return table
    keys = ["sample_id", "modality"]
    return table.groupby(keys, sort=False, as_index=False)["contribution"].mean()


def contribution_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per modality: mean and std of the contribution; the share of samples in which it alone
    has the lowest contribution (ties count for no modality: under the `correct` benefit all
    modalities of a sample often tie); and its gap, the mean contribution of the other
    modalities minus its own (Wei et al.'s modality-level gap for M > 2; > 0: it lags)."""
    per_sample = table.groupby("sample_id")["contribution"]
    is_min = table["contribution"] == per_sample.transform("min")
    unique_min = is_min & (is_min.groupby(table["sample_id"]).transform("sum") == 1)
    summary = (
        table.assign(weakest=unique_min)
        .groupby("modality", sort=False)
        .agg(
            mean=("contribution", "mean"),
            std=("contribution", "std"),
            weakest_share=("weakest", "mean"),
        )
        .reset_index()
    )
    m = len(summary)
    others = (summary["mean"].sum() - summary["mean"]) / (m - 1) if m > 1 else np.nan
    summary["gap"] = others - summary["mean"]
    return summary


def contribution_gaps(table: pd.DataFrame) -> pd.DataFrame:
    """Mean contribution of the row modality minus that of the column modality."""
    means = table.groupby("modality", sort=False)["contribution"].mean()
    gaps = pd.DataFrame(
        means.to_numpy()[:, None] - means.to_numpy()[None, :],
        index=means.index,
        columns=means.index,
    )
    gaps.index.name = "modality"
    return gaps.reset_index()


def lowest_contributions(table: pd.DataFrame, modality: str, k: int) -> pd.DataFrame:
    """The k samples (or segments, for a per-segment table) in which `modality` contributes
    least, lowest first, ties broken by sample id: `rank`, the sample's columns and the
    modality's `contribution` (averaged over the repeats of a table valued under corruptions,
    whose per-repeat predictions are then left out)."""
    keys = [c for c in ("sample_id", "segment") if c in table]
    mine = table[table["modality"] == modality]
    if "repeat" in mine:
        fixed = [c for c in ("label", "class") if c in mine]
        per_sample = mine.groupby(keys, sort=False, as_index=False).agg(
            **{c: (c, "first") for c in fixed}, contribution=("contribution", "mean")
        )
    else:
        per_sample = mine.drop(columns=["modality"])
    lowest = per_sample.sort_values(["contribution", *keys], kind="stable").head(k)
    lowest = lowest.reset_index(drop=True)
    lowest.insert(0, "rank", range(1, len(lowest) + 1))
    return lowest
