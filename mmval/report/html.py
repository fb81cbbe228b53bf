"""The HTML report: one self-contained file (styles inline, figures as base64 PNG data URIs,
no script, nothing fetched) that opens in any browser."""

from __future__ import annotations

import base64
from html import escape
from typing import TYPE_CHECKING

from mmval import __version__
from mmval.report.tables import (
    COST_LEGEND,
    Comparison,
    cost_text,
    delta_text,
    header_columns,
    left_out_lines,
    legend,
    recipe_text,
    value_text,
)

if TYPE_CHECKING:
    from mmval.report.figures import ReportFigure

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222;
  padding: 0 1em; }
div.scroll { overflow-x: auto; }
table.results { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 1em 0; }
table.results th, table.results td { padding: 0.3em 0.7em; white-space: nowrap; }
table.results thead tr:first-child th { border-top: 2px solid #222; }
table.results thead tr:last-child th { border-bottom: 1px solid #222; }
table.results tbody tr:last-child > * { border-bottom: 2px solid #222; }
table.results td { text-align: right; }
table.results td.text { white-space: normal; }
table.results th[scope=row], table.results td.text { text-align: left; }
table.results th.group { border-bottom: 1px solid #888; }
td.text code { font-size: 0.85em; }
p.legend { font-size: 0.9em; color: #444; margin: 0.2em 0; }
figure { margin: 2em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #444; }
"""


def to_html(comparison: Comparison, figures: list[ReportFigure]) -> str:
    tree = comparison.tree
    intro = (
        f"mmval {__version__}; {len(tree.runs)} finished runs, {len(comparison.datasets)} data "
        f"set(s), {len(comparison.rows)} row(s)."
    )
    return page(tree.where, intro, [comparison], left_out_lines(comparison), figures)


def page(
    root: str,
    intro: str,
    comparisons: list[Comparison],
    left_out: list[str],
    figures: list[ReportFigure],
) -> str:
    """The report page: the tables (each under its title when it has one), the runs left out,
    the figures."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>mmval report: {escape(root)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>mmval report: {escape(root)}</h1>",
        f"<p>{escape(intro)}</p>",
    ]
    for comparison in comparisons:
        if comparison.title:
            parts.append(f"<h2>{escape(comparison.title)}</h2>")
        parts.append(_table(comparison))
        lines = [*legend(comparison), COST_LEGEND.format(group=comparison.group_label)]
        parts += [f'<p class="legend">{escape(line)}</p>' for line in lines]
    if left_out:
        parts += [
            "<h2>Left out (not averaged)</h2>",
            '<ul class="left-out">',
            *(f"<li>{escape(line)}</li>" for line in left_out),
            "</ul>",
        ]
    if figures:
        parts.append("<h2>Figures</h2>")
    for figure in figures:
        data = base64.b64encode(figure.png).decode("ascii")
        parts += [
            f'<figure id="{escape(figure.name)}">',
            f'<img src="data:image/png;base64,{data}" alt="{escape(figure.title)}">',
            f"<figcaption><b>{escape(figure.title)}.</b> {escape(figure.caption)}</figcaption>",
            "</figure>",
        ]
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


def _table(comparison: Comparison) -> str:
    columns = header_columns(comparison)
    head = ['<th rowspan="2">Method</th>']
    head += [
        f'<th class="group" colspan="{len(columns)}">{escape(d)}</th>' for d in comparison.datasets
    ]
    head += ['<th rowspan="2">Cost</th>', '<th rowspan="2">Recipe</th>']
    head.append('<th rowspan="2">mmval</th>')
    names = [f"<th>{escape(label)}</th>" for _ in comparison.datasets for label, _, _ in columns]
    body = []
    for row in comparison.rows:
        name = f"<em>{escape(row)}</em>" if row in comparison.references else escape(row)
        cells = [f'<th scope="row">{name}</th>']
        for dataset in comparison.datasets:
            for _, m, is_delta in columns:
                cell = comparison.cells.get((row, dataset, m.key))
                if is_delta:
                    cells.append(f"<td>{escape(delta_text(cell, m))}</td>")
                    continue
                text = escape(value_text(cell, m))
                if cell is not None and cell.rank == 1:
                    text = f"<b>{text}</b>"
                elif cell is not None and cell.rank == 2:
                    text = f"<u>{text}</u>"
                if cell is not None and cell.marker:
                    text += f"<sup>{escape(cell.marker)}</sup>"
                cells.append(f"<td>{text}</td>")
        cells.append(f'<td class="text">{escape(cost_text(comparison, row))}</td>')
        cells.append(f'<td class="text"><code>{escape(recipe_text(comparison, row))}</code></td>')
        cells.append(f'<td class="text">{escape(comparison.versions[row])}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(
        [
            '<div class="scroll"><table class="results">',
            "<thead>",
            "<tr>" + "".join(head) + "</tr>",
            "<tr>" + "".join(names) + "</tr>",
            "</thead>",
            "<tbody>",
            *body,
            "</tbody>",
            "</table></div>",
        ]
    )
