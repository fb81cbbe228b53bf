"""A user's own multi-view table (`mmval prep table --view NAME=PATH ... --labels PATH`): one
file per view, one row per sample, all files in the same sample order. It generalises
`uci_mfeat` (a fixed table shipped with mmval) to any such files, with the same conventions:
a stratified split and z-scores fitted on the train split.

Rows are counted from 1 in every message, in the `source` column and in the default sample ids
(the row numbers); for a CSV/TSV file the message also gives the line, header and blank lines
included.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import SMALL_COLUMNS, ModalitySpec, SplitSamples, sha256_file
from mmval.data.sources.base import (
    SPLITS,
    BuiltData,
    SplitShares,
    standardize,
    stratified_positions,
)
from mmval.errors import UserError

VIEW_SUFFIXES = (".csv", ".tsv", ".npy", ".npz", ".parquet")
COLUMN_SUFFIXES = (".csv", ".tsv", ".txt", ".npy")  # labels, ids, split file
HINT_NAN = "pass --set nan=drop to drop such samples from every view, or --set nan=zero"


class TableParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    views: dict[str, str] = Field(
        min_length=1,
        description="view name -> absolute path of its file (.csv, .tsv, .npy, .npz, .parquet; "
        "`file.npz:key` picks one array of an .npz); one row per sample, in label order",
    )
    labels: str = Field(
        description="absolute path of the label file (.csv/.tsv/.txt: one value per row, a "
        "header naming a `label` column optional; or .npy): integers or class names"
    )
    ids: str | None = Field(
        default=None,
        description="absolute path of a file of unique sample ids, one per row (.csv/.tsv/.txt "
        "with an optional `id` header, or .npy); default: the row numbers from 1",
    )
    split_file: str | None = Field(
        default=None,
        description="absolute path of a file holding train, val or test for each row (an "
        "optional `split` header); default: a stratified split by `split`",
    )
    split: SplitShares = Field(
        default_factory=SplitShares, description="the stratified split made without a split file"
    )
    standardize: Literal["train", "none"] = Field(
        default="train",
        description="train: z-score each feature with the mean and std of the train split "
        "(constant features -> 0; a sequence view per feature over all its steps); none: as read",
    )
    nan: Literal["error", "drop", "zero"] = Field(
        default="error",
        description="what a NaN or Inf value (or an empty CSV cell) does: stop the prep, drop "
        "the sample from every view (listed in errors.parquet), or become 0",
    )
    name: str | None = Field(
        default=None,
        description="the data set name recorded in the prepared data (and so in runs and "
        "reports); default: the name of the --out folder",
    )
    dtype: Literal["float32"] = Field(default="float32", description="stored dtype of the views")

    @field_validator("views")
    @classmethod
    def _view_names(cls, views: dict[str, str]) -> dict[str, str]:
        for name in views:
            if not name or name in SMALL_COLUMNS:
                raise ValueError(
                    f"view name {name!r} is empty or one of the reserved columns "
                    f"{', '.join(SMALL_COLUMNS)}"
                )
        return views

    @field_validator("name")
    @classmethod
    def _name(cls, name: str | None) -> str | None:
        if name is not None and not name.strip():
            raise ValueError("the data set name is empty")
        return name


@dataclass
class Read:
    """One file as messages name it (with its :key), the line of each row of a CSV/TSV/TXT
    file, and for a view its values."""

    label: str
    values: np.ndarray = field(default_factory=lambda: np.zeros(0))
    lines: list[int] | None = None

    def row(self, r: int) -> str:
        """Row r (from 0) as a message names it: counted from 1, with its line in a CSV."""
        return f"row {r + 1}" + (f" (line {self.lines[r]})" if self.lines else "")


def _existing(spec: str, role: str, suffixes: tuple[str, ...]) -> tuple[Path, str | None]:
    """The file of `spec` (`file.npz:key` picks an array), refused when missing or of an
    unknown kind."""
    head, sep, key = spec.rpartition(":")
    path, picked = (Path(head), key) if sep and "/" not in key else (Path(spec), None)
    if picked is not None and path.suffix.lower() != ".npz":
        raise UserError(f"{role} {spec}: a :KEY picks an array of an .npz file only.")
    if path.suffix.lower() not in suffixes:
        raise UserError(
            f"{role} {spec}: unknown file type {path.suffix or '(no extension)'!r}; "
            f"give one of {', '.join(suffixes)}."
        )
    if not path.is_file():
        raise UserError(f"{role} {spec}: no such file.")
    return path, picked


def _text_rows(path: Path, delimiter: str | None) -> tuple[list[list[str]], list[int]]:
    """The non-blank rows of a CSV/TSV (`delimiter`) or a text file of one value per line
    (None), with the line each row ends on."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path} as UTF-8 text: {exc}") from None
    rows: list[list[str]] = []
    lines: list[int] = []
    if delimiter is None:
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append([line.strip()])
                lines.append(number)
        return rows, lines
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        for row in reader:
            if any(cell.strip() for cell in row):
                rows.append(row)
                lines.append(reader.line_num)
    except csv.Error as exc:
        raise UserError(f"{path}: line {reader.line_num} is not valid CSV ({exc}).") from None
    return rows, lines


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _read_delimited(path: Path, delimiter: str) -> Read:
    """A CSV/TSV of numeric columns; a first row that is not all numbers is a header. An empty
    cell is a missing value (NaN)."""
    rows, lines = _text_rows(path, delimiter)
    if rows and not all(_is_number(c) for c in rows[0] if c.strip()):
        rows, lines = rows[1:], lines[1:]
    read = Read(str(path), np.zeros((len(rows), len(rows[0]) if rows else 0)), lines)
    for r, row in enumerate(rows):
        if len(row) != read.values.shape[1]:
            raise UserError(
                f"{path}: {read.row(r)} has {len(row)} cells, {read.row(0)} has "
                f"{read.values.shape[1]}; every row needs one value per column."
            )
        try:
            read.values[r] = np.asarray(row, dtype=np.float64)
        except ValueError:
            for c, cell in enumerate(row):
                if not cell.strip():
                    read.values[r, c] = np.nan
                elif not _is_number(cell):
                    raise UserError(
                        f"{path}: {read.row(r)}, column {c + 1} holds {cell.strip()!r}, not a "
                        "number; a view file holds numeric columns only (a header row is "
                        "recognised only as the first row)."
                    ) from None
                else:
                    read.values[r, c] = float(cell)
    return read


def _numeric_array(array: np.ndarray, label: str) -> np.ndarray:
    if array.dtype.kind not in "biuf":
        raise UserError(
            f"{label} holds {array.dtype} values; a view holds numbers (ints, floats or bools)."
        )
    return array.astype(np.float64)


def _read_npz(path: Path, key: str | None) -> Read:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            if key is None and len(keys) != 1:
                raise UserError(
                    f"{path} holds {len(keys)} arrays ({', '.join(keys) or 'none'}); name one "
                    f"with --view NAME={path}:KEY."
                )
            if key is not None and key not in keys:
                raise UserError(f"{path} has no array {key!r}; it holds: {', '.join(keys)}.")
            chosen = key if key is not None else keys[0]
            return Read(f"{path}:{chosen}", _numeric_array(archive[chosen], f"{path}:{chosen}"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {path} as a NumPy .npz archive: {exc}") from None


def _parquet_column(column: pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    """A numeric column as floats (nulls -> NaN), or the first row that is not a number."""
    kind = column.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind):
        return column.cast(pa.float64()).to_numpy(zero_copy_only=False)
    for r, value in enumerate(column.to_pylist()):
        if value is not None and not (isinstance(value, str) and _is_number(value)):
            raise UserError(
                f"{path}: row {r + 1}, column {name!r} holds {value!r}, not a number; a view "
                "holds numeric columns, or one list column."
            )
    raise UserError(
        f"{path}: column {name!r} is of type {kind}, not numeric; store numbers as numbers."
    )


def _parquet_list(column: pa.ChunkedArray, name: str, path: Path) -> np.ndarray:
    """One list column (of numbers: [N, D]; of lists of numbers: [N, T, D]); every row of the
    same length."""
    array = column.combine_chunks()
    shape = [len(array)]
    while pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        if array.null_count:
            r = int(np.flatnonzero(array.is_null().to_numpy(zero_copy_only=False))[0])
            raise UserError(f"{path}: row {r + 1} of column {name!r} is empty (null).")
        lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
        if len(lengths) and (lengths != lengths[0]).any():
            r = int(np.flatnonzero(lengths != lengths[0])[0])
            row = r // int(np.prod(shape[1:], dtype=np.int64))
            raise UserError(
                f"{path}: row {row + 1} of column {name!r} holds a list of {lengths[r]} values "
                f"where row 1 holds {lengths[0]}; every row needs the same length."
            )
        shape.append(int(lengths[0]) if len(lengths) else 0)
        array = pc.list_flatten(array)
    flat = _parquet_column(pa.chunked_array([array]), name, path)
    return flat.reshape(shape)


def _read_parquet(path: Path) -> Read:
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise UserError(f"cannot read {path} as Parquet: {exc}") from None
    lists = [
        f.name for f in table.schema if pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
    ]
    if lists:
        if table.num_columns != 1:
            raise UserError(
                f"{path} mixes a list column ({lists[0]!r}) with other columns; a view is either "
                "numeric columns or one list column."
            )
        return Read(str(path), _parquet_list(table.column(0), lists[0], path))
    columns = [_parquet_column(table.column(i), f.name, path) for i, f in enumerate(table.schema)]
    values = np.stack(columns, axis=1) if columns else np.zeros((table.num_rows, 0))
    return Read(str(path), values)


def read_view(spec: str, view: str) -> Read:
    """A view file as [N, D] or [N, T, D] floats."""
    path, key = _existing(spec, f"--view {view}", VIEW_SUFFIXES)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        read = _read_delimited(path, "," if suffix == ".csv" else "\t")
    elif suffix == ".npz":
        read = _read_npz(path, key)
    elif suffix == ".parquet":
        read = _read_parquet(path)
    else:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} as a NumPy .npy file: {exc}") from None
        read = Read(str(path), _numeric_array(array, str(path)))
    if read.values.ndim not in (2, 3):
        raise UserError(
            f"{read.label} holds an array of shape {list(read.values.shape)}; a view is "
            "[N, D] (one row of D values per sample) or [N, T, D] (a sequence per sample)."
        )
    if read.values.size == 0:
        raise UserError(
            f"{read.label} is an empty view (shape {list(read.values.shape)}): it needs at "
            "least one row and one value per row."
        )
    return read


def read_column(spec: str, role: str, header: str) -> tuple[list[str], Read]:
    """A file of one value per row (labels, ids, splits) as strings; in a CSV/TSV/TXT file with
    several columns the header must name the `header` column."""
    path, _ = _existing(spec, role, COLUMN_SUFFIXES)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} as a NumPy .npy file: {exc}") from None
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise UserError(
                f"{path} holds shape {list(array.shape)}; a {role} file holds one value per row."
            )
        if array.dtype.kind == "f":
            bad = ~np.isfinite(array) | (array != np.round(array))
            if bad.any():
                r = int(np.flatnonzero(bad)[0])
                raise UserError(
                    f"{path}: row {r + 1} holds {array[r]}; a {role} file holds integers or names."
                )
            array = array.astype(np.int64)
        if array.dtype.kind not in "iuUSb":
            raise UserError(
                f"{path} holds {array.dtype} values; a {role} file holds integers or names."
            )
        values = [v.decode() if isinstance(v, bytes) else str(v) for v in array.tolist()]
        return values, Read(str(path))
    delimiter = {".csv": ",", ".tsv": "\t"}.get(suffix)
    rows, lines = _text_rows(path, delimiter)
    column = 0
    if rows and header in [c.strip().lower() for c in rows[0]]:
        column = [c.strip().lower() for c in rows[0]].index(header)
        rows, lines = rows[1:], lines[1:]
    elif rows and len(rows[0]) != 1:
        raise UserError(
            f"{path} has {len(rows[0])} columns and no header naming a {header!r} column; "
            f"give one value per row, or a header row with a column named {header}."
        )
    read = Read(str(path), lines=lines)
    values = []
    for r, row in enumerate(rows):
        cell = row[column].strip() if column < len(row) else ""
        if not cell:
            raise UserError(f"{path}: {read.row(r)} has no {header} value.")
        values.append(cell)
    if not values:
        raise UserError(f"{path} holds no {header} values.")
    return values, read


def encode_labels(names: list[str]) -> tuple[np.ndarray, list[str], dict[str, int] | None]:
    """Class indices, class names and, for integer labels other than 0..C-1, the mapping
    value -> index. Integers are ordered by value, names by string order."""
    try:
        numbers = [int(v) for v in names]
    except ValueError:
        classes = sorted(set(names))
        index = {name: i for i, name in enumerate(classes)}
        return np.array([index[v] for v in names], dtype=np.int64), classes, None
    distinct = sorted(set(numbers))
    index = {value: i for i, value in enumerate(distinct)}
    mapping = {str(v): i for v, i in index.items()}
    if distinct == list(range(len(distinct))):
        mapping = None
    encoded = np.array([index[v] for v in numbers], dtype=np.int64)
    return encoded, [str(v) for v in distinct], mapping


def _same_rows(label: str, rows: int, n: int, labels: str) -> None:
    """Refuse a file whose row count differs from the labels file's."""
    if rows != n:
        raise UserError(
            f"{label} has {rows} rows but the labels file {labels} has {n} (row "
            f"{min(rows, n) + 1} is the first that one of them lacks); every file holds one row "
            "per sample, in the same order."
        )


def _bad_values(read: Read) -> tuple[np.ndarray, str]:
    """Rows of `read` with a NaN or Inf, and where the first one is."""
    flat = read.values.reshape(len(read.values), -1)
    finite = np.isfinite(flat)
    bad = ~finite.all(axis=1)
    if not bad.any():
        return bad, ""
    r = int(np.flatnonzero(bad)[0])
    k = int(np.flatnonzero(~finite[r])[0])
    at = np.unravel_index(k, read.values.shape[1:])
    where = f"column {at[-1] + 1}" if len(at) == 1 else f"step {at[0] + 1}, column {at[1] + 1}"
    return bad, f"{read.label}: {read.row(r)}, {where} is {flat[r, k]}"


class TableSource:
    """Reads a user's view files, labels and optional ids and split file."""

    name: ClassVar[str] = "table"
    needs_raw: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = TableParams

    def input_files(self, params: TableParams) -> dict[str, object]:
        """Each input file's path and sha256, in the layout of the parameters (views by name):
        recorded in the prepared data, so a number can be traced to its files, and a changed
        file is a changed setting. Missing files and unknown kinds are refused here, before
        anything is written."""

        def record(spec: str, role: str, suffixes: tuple[str, ...]) -> dict[str, str]:
            path, _ = _existing(spec, role, suffixes)
            return {"path": spec, "sha256": sha256_file(path)}

        views = {v: record(s, f"--view {v}", VIEW_SUFFIXES) for v, s in params.views.items()}
        files: dict[str, object] = {
            "views": views,
            "labels": record(params.labels, "--labels", COLUMN_SUFFIXES),
        }
        if params.ids is not None:
            files["ids"] = record(params.ids, "--ids", COLUMN_SUFFIXES)
        if params.split_file is not None:
            files["split_file"] = record(params.split_file, "--splits", COLUMN_SUFFIXES)
        return files

    def build(self, manifest: DatasetManifest, params: TableParams, raw: Path | None) -> BuiltData:
        names, _ = read_column(params.labels, "--labels", "label")
        n = len(names)
        views = {view: read_view(spec, view) for view, spec in params.views.items()}
        for read in views.values():
            _same_rows(read.label, len(read.values), n, params.labels)
        ids = [str(r + 1) for r in range(n)]
        if params.ids is not None:
            ids, id_read = read_column(params.ids, "--ids", "id")
            _same_rows(id_read.label, len(ids), n, params.labels)
            first: dict[str, int] = {}
            for r, sample in enumerate(ids):
                if sample in first:
                    raise UserError(
                        f"{params.ids}: id {sample!r} is on {id_read.row(first[sample])} and "
                        f"{id_read.row(r)}; sample ids must be unique."
                    )
                first[sample] = r
        keep = np.ones(n, dtype=bool)
        errors: list[tuple[str, str]] = []
        for view, read in views.items():
            bad, first_bad = _bad_values(read)
            if not bad.any():
                continue
            if params.nan == "error":
                raise UserError(
                    f"{first_bad} (view {view}; {int(bad.sum())} row(s) hold NaN or Inf, an "
                    f"empty CSV cell counts as NaN); {HINT_NAN}."
                )
            if params.nan == "zero":
                read.values[~np.isfinite(read.values)] = 0.0
                continue
            for r in np.flatnonzero(bad & keep):
                errors.append(
                    (
                        f"row {r + 1}",
                        f"NaN or Inf in view {view} ({read.label}, {read.row(r)}); "
                        "dropped from every view",
                    )
                )
            keep &= ~bad
        rows = np.flatnonzero(keep)
        if not len(rows):
            raise UserError(f"every row holds a NaN or Inf in some view: {len(errors)} dropped.")
        labels, classes, mapping = encode_labels([names[r] for r in rows])
        parts = self._parts(params, [ids[r] for r in rows], labels, classes, n, keep)
        arrays = {view: read.values[rows] for view, read in views.items()}
        if params.standardize == "train":
            if not len(parts["train"]):
                raise UserError("the train split is empty; standardize=train needs train samples.")
            arrays = {view: _standardize(a, parts["train"]) for view, a in arrays.items()}
        splits = {
            split: SplitSamples(
                sample_ids=[ids[rows[i]] for i in chosen],
                labels=labels[chosen],
                sources=[f"row {rows[i] + 1}" for i in chosen],
                arrays={view: a[chosen].astype(np.float32) for view, a in arrays.items()},
            )
            for split, chosen in parts.items()
        }
        modalities = [
            ModalitySpec(
                name=view,
                dtype="float32",
                shape=list(read.values.shape[1:]),
                description=Path(read.label).name,
            )
            for view, read in views.items()
        ]
        extraction: dict = {
            "split": {"file": params.split_file}
            if params.split_file is not None
            else params.split.model_dump(),
            "rows": n,
            "dropped": len(errors),
        }
        if mapping is not None:
            extraction["label_map"] = mapping
        return BuiltData(classes, modalities, extraction, splits, errors)

    def _parts(
        self,
        params: TableParams,
        ids: list[str],
        labels: np.ndarray,
        classes: list[str],
        n: int,
        keep: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Positions (in the kept samples) of each split: from the split file, or stratified."""
        if params.split_file is not None:
            values, read = read_column(params.split_file, "--splits", "split")
            _same_rows(read.label, len(values), n, params.labels)
            for r, value in enumerate(values):
                if value not in SPLITS:
                    raise UserError(
                        f"{params.split_file}: {read.row(r)} holds {value!r}, not one of "
                        f"{', '.join(SPLITS)}."
                    )
            kept = [values[r] for r in np.flatnonzero(keep)]
            return {s: np.array([i for i, v in enumerate(kept) if v == s], int) for s in SPLITS}
        fractions = params.split.fractions()
        parts = stratified_positions(ids, labels, params.split)
        for c, name in enumerate(classes):
            counts = {s: int((labels[parts[s]] == c).sum()) for s in SPLITS}
            empty = [s for s in SPLITS if fractions[s] > 0 and counts[s] == 0]
            if empty:
                raise UserError(
                    f"class {name!r} has {int((labels == c).sum())} samples ({params.labels}), "
                    f"too few for split.ratios {params.split.ratios}: its "
                    f"{' and '.join(empty)} share rounds to 0 samples ({counts}). Give more "
                    "samples of it, other --set split.ratios, or a --splits file."
                )
        return parts


def _standardize(values: np.ndarray, train: np.ndarray) -> np.ndarray:
    """z-scores with train statistics; a sequence view [N, T, D] per feature over all steps."""
    if values.ndim == 2:
        return standardize(values, train)
    n, t, d = values.shape
    steps = (train[:, None] * t + np.arange(t)).ravel()
    return standardize(values.reshape(n * t, d), steps).reshape(n, t, d)
