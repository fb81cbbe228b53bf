"""UCI Multiple Features: six precomputed feature views of 2000 handwritten digits."""

from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from mmval.data.manifest import DatasetManifest
from mmval.data.shards import ModalitySpec, SplitSamples
from mmval.data.sources.base import BuiltData, standardize, stratified_split


class UciMfeatParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    standardize: Literal["train", "none"] = "train"
    dtype: Literal["float32"] = "float32"


def _read_view(file_name: str) -> tuple[np.ndarray, np.ndarray]:
    with (resources.files("mmval.resources") / "uci_mfeat" / file_name).open("rb") as raw:
        text = gzip.decompress(raw.read()).decode("ascii")
    table = np.loadtxt(text.splitlines()[1:], delimiter=",", dtype=np.float64)
    return table[:, :-1], table[:, -1].astype(np.int64)


class UciMfeatSource:
    name: ClassVar[str] = "uci_mfeat"
    needs_raw: ClassVar[bool] = False
    Params: ClassVar[type[BaseModel]] = UciMfeatParams

    def build(
        self, manifest: DatasetManifest, params: UciMfeatParams, raw: Path | None
    ) -> BuiltData:
        views: dict[str, np.ndarray] = {}
        labels: np.ndarray | None = None
        for entry in manifest.modalities:
            values, view_labels = _read_view(manifest.raw["files"][entry.name])
            if labels is not None and not np.array_equal(labels, view_labels):
                raise ValueError(f"view {entry.name} lists its digits in another order")
            views[entry.name], labels = values, view_labels
        assert labels is not None and manifest.splits is not None
        parts = stratified_split(labels, manifest.splits)
        if params.standardize == "train":
            views = {view: standardize(values, parts["train"]) for view, values in views.items()}
        splits = {
            name: SplitSamples(
                sample_ids=[f"digit{i:04d}" for i in rows],
                labels=labels[rows],
                sources=[f"row {i}" for i in rows],
                arrays={view: values[rows].astype(np.float32) for view, values in views.items()},
            )
            for name, rows in parts.items()
        }
        modalities = [
            ModalitySpec(
                name=entry.name,
                dtype="float32",
                shape=[views[entry.name].shape[1]],
                description=entry.description,
            )
            for entry in manifest.modalities
        ]
        extraction = {"split": manifest.splits.model_dump()}
        return BuiltData(manifest.classes, modalities, extraction, splits)
