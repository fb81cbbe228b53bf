"""Reference rows: published numbers shown beside the runs (`mmval report --reference`,
`--references FILE`), as given, in italics, without ranks or tests (they have no seeds or
predictions to test, and were not run under the report's protocol).

On the command line, `NAME=VALUE` is the value of the first shown metric on the report's one
data set; `NAME@DATASET=VALUE` names the data set, `NAME@DATASET:METRIC=VALUE` the metric too
(`'OGM-GE (paper)@crema-d:f1=61.7'`). A references file is YAML, per data set:

```yaml
crema-d:
  OGM-GE (paper): 62.2              # the first shown metric
  PMR (paper): {acc: 61.1, f1: 60.3}
kinetics-sounds:
  OGM-GE (paper): {acc: 62.3}
```

Values are in the unit the table shows: percent for accuracy, F1 and the other percent
metrics, as published tables print them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mmval.errors import UserError
from mmval.overrides import load_yaml

REFERENCE_HASH = "reference"  # what a reference row shows (and the CSV holds) as its recipe


@dataclass(frozen=True)
class Reference:
    """One published number: the row it goes in, its data set and metric (None: the report's
    only data set, its first shown metric) and its value in the unit the table shows."""

    name: str
    value: float
    dataset: str | None = None
    metric: str | None = None
    where: str = ""  # how the user gave it, for messages


def parse_reference(text: str) -> Reference:
    """`NAME=VALUE`, `NAME@DATASET=VALUE` or `NAME@DATASET:METRIC=VALUE`."""
    target, sep, number = text.rpartition("=")
    name, at, place = target.partition("@") if "@" in target else (target, "", "")
    dataset, colon, metric = place.rpartition(":") if ":" in place else (place, "", "")
    name = name.strip()
    if not sep or not name or (at and not dataset.strip()) or (colon and not metric.strip()):
        raise UserError(
            f"--reference {text!r}: write NAME=VALUE, NAME@DATASET=VALUE or "
            "NAME@DATASET:METRIC=VALUE ('OGM-GE (paper)=62.2')."
        )
    return Reference(
        name,
        _number(number, f"--reference {text!r}"),
        dataset.strip() or None,
        metric.strip() or None,
        f"--reference {text}",
    )


def load_references(path: Path) -> list[Reference]:
    """The references of a YAML file: data set -> row name -> value, or -> metric -> value."""
    try:
        raw = load_yaml(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"--references {path}: cannot be read ({exc.strerror}).") from None
    except yaml.YAMLError:
        raise UserError(f"--references {path}: not valid YAML.") from None
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise UserError(
            f"--references {path}: give a mapping of data set -> row name -> value (or -> "
            "metric -> value)."
        )
    found = []
    for dataset, rows in raw.items():
        for name, given in rows.items():
            where = f"--references {path}: {dataset}.{name}"
            values = given if isinstance(given, dict) else {None: given}
            for metric, value in values.items():
                found.append(
                    Reference(
                        str(name),
                        _number(value, where),
                        str(dataset),
                        None if metric is None else str(metric),
                        where,
                    )
                )
    return found


def _number(value: Any, where: str) -> float:
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"{where}: the value {value!r} is not a finite number.")
    return number
