"""Multi-view feature sets stored as one MATLAB .mat file (`caltech101-20`): a cell `X` of one
[N, d_v] matrix per view and labels `Y` [N, 1] counted from 1, the layout the multi-view
clustering and classification code reads with `scipy.io.loadmat` (`X = mat['X'][0]`,
`y = mat['Y']`). Some copies store the cell as 6 x 1 or each view transposed ([d_v, N]); a view
is taken as transposed when its columns, not its rows, match the label count and its rows the
view's feature size, and the prepared data records which views were.

Normalisation follows TMC (Han et al., ICLR 2021; hanmenghan/TMC
@08d0ca4c4461b6de1cf73514d8c621598bc2b504, `TMC ICLR/data.py` `normalize`: sklearn's
MinMaxScaler to [0, 1] per feature), except that TMC fits a scaler on each split separately
while mmval fits it on the train split only and applies it to all three [ours], so that no
statistic of the test samples enters the inputs (val/test values may then fall outside
[0, 1]). The split is stratified 70/10/20 per class with seed 0 [ours]: TMC ships its sets
pre-split 80/20, and Wei et al. (CVPR 2024) give no code or split for Caltech101-20.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import scipy.io
import scipy.sparse
from pydantic import BaseModel, ConfigDict, Field

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import ModalitySpec, SplitSamples, sha256_file
from mmval.data.sources.base import BuiltData, SplitShares, standardize, stratified_positions
from mmval.errors import UserError


class MultiviewMatRaw(BaseModel):
    """The manifest's `raw` section: the file and what it holds."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(description="the .mat file in the --raw folder")
    views: str = Field(default="X", description="key of the cell of view matrices")
    labels: list[str] = Field(
        default=["Y"], min_length=1, description="keys that may hold the labels, tried in order"
    )
    dims: dict[str, int] = Field(description="view name -> feature size, in the cell's order")


class MultiviewMatParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    file: str | None = Field(
        default=None,
        description="the .mat file name in the --raw folder; default: the manifest's raw.file",
    )
    normalize: Literal["minmax", "zscore", "none"] = Field(
        default="minmax",
        description="minmax: each feature to [0, 1] with the min and max of the train split "
        "(TMC's MinMaxScaler, fitted on train only [ours]); zscore: mean and std of the train "
        "split, as uci-mfeat; constant features become 0 in both; none: as stored",
    )
    split: SplitShares = Field(
        default_factory=SplitShares,
        description="stratified train/val/test shares per class and the permutation seed",
    )
    dtype: Literal["float32"] = Field(default="float32", description="stored dtype of the views")


def load_mat(path: Path) -> dict[str, Any]:
    """The variables of a MATLAB v5/v7 file; a damaged or unreadable file is a user error."""
    try:
        return scipy.io.loadmat(str(path))
    except NotImplementedError:  # scipy's answer to a v7.3 (HDF5) file
        raise UserError(
            f"{path} is a MATLAB v7.3 (HDF5) file, which scipy cannot read; save it again with "
            "save(..., '-v7') in MATLAB or Octave."
        ) from None
    except (OSError, ValueError, LookupError, TypeError, scipy.io.matlab.MatReadError) as exc:
        raise UserError(
            f"{path} cannot be read as a MATLAB .mat file ({type(exc).__name__}: {exc}); it may "
            "be truncated or damaged: copy it again."
        ) from None


def _cell(mat: dict[str, Any], key: str, count: int, path: Path) -> list[Any]:
    """The view matrices of a 1 x V or V x 1 cell."""
    if key not in mat:
        shown = ", ".join(k for k in mat if not k.startswith("__")) or "none"
        raise UserError(f"{path} has no variable {key!r} (the views); it holds: {shown}.")
    cell = mat[key]
    if not isinstance(cell, np.ndarray) or cell.dtype != object or cell.size != count:
        shape = list(getattr(cell, "shape", []))
        raise UserError(
            f"{path}: {key} is not a cell of {count} view matrices (found "
            f"{getattr(cell, 'dtype', type(cell).__name__)} of shape {shape})."
        )
    return list(cell.ravel())


def _label_values(mat: dict[str, Any], keys: list[str], path: Path) -> tuple[str, np.ndarray]:
    for key in keys:
        if key in mat:
            values = np.asarray(mat[key])
            if values.ndim > 2 or (values.ndim == 2 and 1 not in values.shape):
                raise UserError(
                    f"{path}: {key} has shape {list(values.shape)}; one label per sample "
                    "([N, 1]) was expected."
                )
            if values.dtype.kind not in "biuf":
                raise UserError(f"{path}: {key} holds {values.dtype} values, not class numbers.")
            return key, values.astype(np.float64).ravel()
    shown = ", ".join(k for k in mat if not k.startswith("__")) or "none"
    raise UserError(f"{path} has no labels ({' or '.join(keys)}); it holds: {shown}.")


def _view(value: Any, name: str, dim: int, n: int, path: Path) -> tuple[np.ndarray, bool]:
    """A view as [N, dim] floats, and whether it was stored transposed."""
    if scipy.sparse.issparse(value):
        value = value.toarray()
    array = np.asarray(value)
    if array.ndim != 2 or array.dtype.kind not in "biuf":
        raise UserError(
            f"{path}: view {name} is {array.dtype} of shape {list(array.shape)}, not a numeric "
            "matrix."
        )
    if array.shape == (n, dim):
        return array.astype(np.float64), False
    if array.shape == (dim, n):
        return array.T.astype(np.float64), True
    raise UserError(
        f"{path}: view {name} has shape {list(array.shape)}; [{n}, {dim}] (or [{dim}, {n}] "
        f"stored transposed) was expected: {n} samples as the labels, {dim} {name} features."
    )


def _classes(labels: np.ndarray, count: int, key: str, path: Path) -> tuple[np.ndarray, int]:
    """Class indices 0..count-1 and the offset subtracted: labels counted from 1 (the
    official layout) or, as some copies store them, from 0."""
    if (labels != np.round(labels)).any():
        r = int(np.flatnonzero(labels != np.round(labels))[0])
        raise UserError(f"{path}: {key} row {r + 1} holds {labels[r]}, not a class number.")
    values = labels.astype(np.int64)
    for offset in (1, 0):
        if values.min() >= offset and values.max() < count + offset:
            return values - offset, offset
    raise UserError(
        f"{path}: {key} holds labels {values.min()}..{values.max()}; the manifest lists "
        f"{count} classes, labelled 1..{count} (or 0..{count - 1})."
    )


def _minmax(values: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
    """Each feature to [0, 1] with the min and max of `fit_rows` only; constant -> 0."""
    low = values[fit_rows].min(axis=0)
    span = values[fit_rows].max(axis=0) - low
    span[span == 0] = 1.0
    return (values - low) / span


class MultiviewMatSource:
    """Reads one .mat of views and labels, drops rows with non-finite values, splits and
    normalises."""

    name: ClassVar[str] = "multiview_mat"
    needs_raw: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = MultiviewMatParams

    def build(
        self, manifest: DatasetManifest, params: MultiviewMatParams, raw: Path | None
    ) -> BuiltData:
        assert raw is not None
        layout = MultiviewMatRaw.model_validate(manifest.raw)
        names = [entry.name for entry in manifest.modalities]
        if names != list(layout.dims):
            raise ValueError(f"{manifest.name}: raw.dims must name {names} in the same order")
        path = Path(raw) / (params.file or layout.file)
        if not path.is_file():
            found = sorted(p.name for p in Path(raw).iterdir() if p.suffix.lower() == ".mat")
            raise UserError(
                f"{Path(raw)} has no {path.name}; .mat files there: "
                f"{', '.join(found) or 'none'} (pick one with --set file=NAME)."
            )
        mat = load_mat(path)
        label_key, stored = _label_values(mat, layout.labels, path)
        n = len(stored)
        cell = _cell(mat, layout.views, len(names), path)
        views: dict[str, np.ndarray] = {}
        transposed: list[str] = []
        for name, value in zip(names, cell, strict=True):
            views[name], flipped = _view(value, name, layout.dims[name], n, path)
            if flipped:
                transposed.append(name)
        keep = np.isfinite(stored)
        errors: list[tuple[str, str]] = []
        for r in np.flatnonzero(~keep):
            errors.append((f"row {r + 1}", f"{label_key} is {stored[r]}, not a class number"))
        for name, values in views.items():
            bad = ~np.isfinite(values).all(axis=1)
            for r in np.flatnonzero(bad & keep):
                column = int(np.flatnonzero(~np.isfinite(values[r]))[0])
                errors.append(
                    (
                        f"row {r + 1}",
                        f"view {name}, feature {column + 1} is {values[r, column]}; "
                        "dropped from every view",
                    )
                )
            keep &= ~bad
        rows = np.flatnonzero(keep)
        if not len(rows):
            raise UserError(f"{path}: every row holds a NaN or Inf label or feature.")
        labels, offset = _classes(stored[rows], len(manifest.classes), label_key, path)
        ids = [f"row{r + 1:04d}" for r in rows]
        parts = stratified_positions(ids, labels, params.split)
        if not len(parts["train"]):
            raise UserError(f"{path}: the train split is empty; {len(rows)} usable rows.")
        arrays = {name: values[rows] for name, values in views.items()}
        if params.normalize == "minmax":
            arrays = {name: _minmax(a, parts["train"]) for name, a in arrays.items()}
        elif params.normalize == "zscore":
            arrays = {name: standardize(a, parts["train"]) for name, a in arrays.items()}
        splits = {
            split: SplitSamples(
                sample_ids=[ids[i] for i in members],
                labels=labels[members],
                sources=[f"{path.name}:row {rows[i] + 1}" for i in members],
                arrays={name: a[members].astype(np.float32) for name, a in arrays.items()},
            )
            for split, members in parts.items()
        }
        modalities = [
            ModalitySpec(
                name=entry.name,
                dtype="float32",
                shape=[layout.dims[entry.name]],
                description=entry.description,
            )
            for entry in manifest.modalities
        ]
        extraction = {
            "file": path.name,
            "sha256": sha256_file(path),
            "rows": n,
            "dropped": len(errors),
            "labels_key": label_key,
            "label_offset": offset,
            "transposed": transposed,
            "class_counts": np.bincount(labels, minlength=len(manifest.classes)).tolist(),
            "split": params.split.model_dump(),
        }
        return BuiltData(manifest.classes, modalities, extraction, splits, errors)
