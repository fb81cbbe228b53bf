"""`mmval report`: paper-ready comparison tables, paired significance tests against a
baseline, figures and a self-contained HTML report over any tree of run folders.

`runs` finds and reads the runs, `tables` builds the comparison and its text formats,
`significance` holds the tests, `figures` draws the PNGs and `html` writes the report page.
"""

from __future__ import annotations

from mmval.errors import UserError
from mmval.report.figures import ReportFigure, make_figures, write_figures
from mmval.report.html import to_html
from mmval.report.runs import LeftOut, RunTree, collect_runs, find_runs
from mmval.report.tables import (
    COLUMNS,
    Comparison,
    compare,
    summarize,
    to_csv,
    to_latex,
    to_markdown,
    to_rich,
)

FORMATS = ("table", "md", "csv", "latex", "html")
SUFFIX_FORMATS = {".md": "md", ".csv": "csv", ".tex": "latex", ".html": "html", ".htm": "html"}


def render(comparison: Comparison, fmt: str, figures: list[ReportFigure] | None = None) -> str:
    """The comparison as text in one of the file formats (`table` is printed by the CLI with
    `to_rich`); only HTML shows figures."""
    if fmt == "md":
        return to_markdown(comparison) + "\n"
    if fmt == "csv":
        return to_csv(comparison)
    if fmt == "latex":
        return to_latex(comparison) + "\n"
    if fmt == "html":
        return to_html(comparison, figures or [])
    raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")


__all__ = [
    "COLUMNS",
    "FORMATS",
    "SUFFIX_FORMATS",
    "Comparison",
    "LeftOut",
    "ReportFigure",
    "RunTree",
    "collect_runs",
    "compare",
    "find_runs",
    "make_figures",
    "render",
    "summarize",
    "to_rich",
    "write_figures",
]
