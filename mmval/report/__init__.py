"""`mmval report`: paper-ready comparison tables, paired significance tests against a
baseline, figures and a self-contained HTML report over any tree of run folders.

`runs` finds and reads the runs, `tables` builds the comparison and its text formats,
`significance` holds the tests, `robustness` the noise and missing-modality tables (`--robustness`),
`figures` draws the figures (PNG, PDF, SVG and their numbers as CSV; imported only where
figures are drawn, as it imports matplotlib), `references` reads published numbers shown beside
the runs, and `html` writes the report page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmval.errors import UserError
from mmval.report.html import page, to_html
from mmval.report.references import Reference, load_references, parse_reference
from mmval.report.robustness import Robustness, robustness, to_long_csv
from mmval.report.runs import LeftOut, Narrowing, RunTree, collect_runs, find_runs
from mmval.report.tables import (
    COLUMNS,
    Comparison,
    compare,
    describe_left_out,
    latex_escape,
    summarize,
    to_csv,
    to_latex,
    to_markdown,
    to_rich,
)

if TYPE_CHECKING:
    from mmval.report.figures import ReportFigure

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


def render_robustness(result: Robustness, fmt: str, figures: list[ReportFigure]) -> str:
    """Every robustness table in one file format, the left-out evaluations once at the end."""
    left = describe_left_out(result.left_out, result.tree.root)
    if fmt == "csv":
        return to_long_csv(result)
    if fmt == "html":
        intro = (
            f"mmval robustness report; {len(result.tree.runs)} finished runs, "
            f"{len(result.tables)} evaluation table(s)."
        )
        return page(result.tree.where, intro, result.comparisons, left, figures)
    if fmt == "md":
        parts = [f"### {c.title}\n\n{to_markdown(c)}" for c in result.comparisons]
        if left:
            parts.append("Left out (not averaged):\n\n" + "\n".join(f"- {x}" for x in left))
        return "\n\n".join(parts) + "\n"
    if fmt == "latex":
        parts = [f"% {latex_escape(c.title or '')}\n{to_latex(c)}" for c in result.comparisons]
        parts += [f"% left out (not averaged): {latex_escape(x)}" for x in left]
        return "\n\n".join(parts) + "\n"
    raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}.")


__all__ = [
    "COLUMNS",
    "FORMATS",
    "SUFFIX_FORMATS",
    "Comparison",
    "LeftOut",
    "Narrowing",
    "Reference",
    "Robustness",
    "RunTree",
    "collect_runs",
    "compare",
    "find_runs",
    "load_references",
    "parse_reference",
    "render",
    "render_robustness",
    "robustness",
    "summarize",
    "to_rich",
]
