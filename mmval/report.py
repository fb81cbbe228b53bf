"""`mmval report`: aggregate finished runs into a comparison table (test split, checkpoint
chosen on validation accuracy)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mmval.engine.train import RECIPE_FILE, SUMMARY

COLUMNS = ["dataset", "method", "n_seeds", "acc_mean", "acc_std", "f1_mean", "f1_std"]


def collect_runs(root: Path) -> pd.DataFrame:
    """One row per finished run found anywhere below `root`."""
    rows = []
    for path in sorted(Path(root).rglob(SUMMARY)):
        summary = json.loads(path.read_text(encoding="utf-8"))
        if summary.get("finished"):
            rows.append(
                {k: v for k, v in summary.items() if k != "recipe"} | {"run": str(path.parent)}
            )
    return pd.DataFrame(rows)


def unfinished_runs(root: Path) -> list[Path]:
    """Run folders that were started but have no summary: never averaged in silently."""
    return sorted(
        p.parent for p in Path(root).rglob(RECIPE_FILE) if not (p.parent / SUMMARY).is_file()
    )


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds, in percent, one row per (data set, method)."""
    if runs.empty:
        return pd.DataFrame(columns=COLUMNS)
    grouped = runs.groupby(["dataset", "method"], sort=True)
    table = grouped.agg(
        n_seeds=("seed", "count"),
        acc_mean=("test_acc", "mean"),
        acc_std=("test_acc", "std"),
        f1_mean=("test_f1", "mean"),
        f1_std=("test_f1", "std"),
    ).reset_index()
    for col in ("acc_mean", "acc_std", "f1_mean", "f1_std"):
        table[col] = (table[col] * 100).round(2)
    return table[COLUMNS]


def to_markdown(table: pd.DataFrame) -> str:
    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = [
        "| " + " | ".join(_cell(v) for v in row) + " |" for row in table.itertuples(index=False)
    ]
    return "\n".join([header, rule, *body])


def to_latex(table: pd.DataFrame) -> str:
    spec = "l" * 2 + "r" * (len(table.columns) - 2)
    lines = [
        f"\\begin{{tabular}}{{{spec}}}",
        "\\toprule",
        " & ".join(c.replace("_", "\\_") for c in table.columns) + " \\\\",
        "\\midrule",
    ]
    lines += [
        " & ".join(_cell(v).replace("_", "\\_") for v in row) + " \\\\"
        for row in table.itertuples(index=False)
    ]
    lines += ["\\bottomrule", "\\end{tabular}"]
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return "-" if pd.isna(value) else f"{value:.2f}"
    return str(value)
