"""AVE audio-visual event localisation (Tian et al., ECCV 2018) from the released features, read as
the official supervised baseline reads them (YapengTian/AVE-ECCV18 @
93f843fed72fb17394df76330df958b0c2dbde76, `supervised_main.py` 31-44 and `dataloader.py` 13-26).

Raw layout (the repository's `data/` folder plus the feature download its README names):
`Annotations.txt` (`Category&VideoID&Quality&StartTime&EndTime`, one line per row of the feature
files; the dataset zip's copy starts with that header line, the repository's does not),
`audio_feature.h5` [N, 10, 128] and `visual_feature.h5` [N, 10, 7, 7, 512] (h5 dataset
`avadataset`), `{train,val,test}_order.h5` (dataset `order`: row indices) and, optionally,
`labels.h5` [N, 10, 29] (one-hot per segment).

Labels are rebuilt from Annotations.txt: segment t of a 10-s clip is its event iff
`Start <= t < End`, classes numbered in order of first appearance in Annotations.txt, background
last (index 28 of `tagset_size` 29, `supervised_main.py` 59). Both rules were checked against the
repository's `labels_closs.h5` (event/background per segment) and `mil_labels.h5` (class per
clip) for all 4143 rows; where a `labels.h5` is given, every row that disagrees with the rebuilt
labels goes to the errors table. One real row (26, `Church bell&VWi2ENBuTbw&good&0&0`, in
train_order.h5) has an empty window: all its segments are background, as in labels_closs.h5, and
it is kept with its clip class. The order files need not be sorted; each row becomes one sample
`row-<index>-<VideoID>` (a video id can occur on several rows).

The visual maps alone are 4143 x 10 x 7 x 7 x 512 values (4.2 GB as float32; the download is
7.7 GB), so rows are read one at a time in the extraction workers (the per-item route), each
worker keeping its own open handles.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import h5py
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from mmval.data.extract import ExtractionError
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import TARGET, ModalitySpec, SampleRecord
from mmval.errors import UserError

HEADER = "Category&VideoID&Quality&StartTime&EndTime"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AveFeaturesRaw(_Strict):
    """The manifest's `raw` section: each file as alternatives (the first that exists is read),
    and the h5 dataset names inside them."""

    annotations: list[str] = Field(min_length=1, description="the Annotations.txt file")
    audio: list[str] = Field(min_length=1, description="audio features [N, T, D]")
    visual: list[str] = Field(min_length=1, description="visual features [N, T, H, W, C]")
    labels: list[str] = Field(
        default_factory=list, description="optional one-hot labels [N, T, classes + 1]"
    )
    orders: dict[str, list[str]] = Field(min_length=1, description="split -> its order file")
    feature_key: str = Field(default="avadataset", description="h5 dataset of features, labels")
    order_key: str = Field(default="order", description="h5 dataset of an order file")


class AveFeaturesParams(_Strict):
    audio_dtype: Literal["float32", "float16"] = Field(
        default="float32", description="stored dtype of the audio features"
    )
    visual_dtype: Literal["float32", "float16"] = Field(
        default="float16", description="stored dtype of the visual feature maps"
    )
    background: str = Field(default="background", description="name of the last class")
    rows_per_shard: int = Field(default=128, ge=1)


@dataclass(frozen=True)
class Annotation:
    category: str
    video: str
    start: float
    end: float


# ---------------------------------------------------------------------------- Annotations.txt
def parse_annotations(text: str) -> list[Annotation]:
    """One annotation per data line (the header, if any, skipped; trailing blank lines dropped):
    line i is row i of the feature files. An unreadable line is a ValueError naming it, since
    both the row alignment and the class numbering depend on every line."""
    lines = text.splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    skip = int(bool(lines) and lines[0].strip().lstrip("\ufeff").lower() == HEADER.lower())
    rows: list[Annotation] = []
    for number, line in enumerate(lines[skip:], 1 + skip):
        fields = [f.strip() for f in line.strip().split("&")]
        if len(fields) != 5:
            raise ValueError(f"line {number} {line.strip()!r} does not have 5 &-separated fields")
        category, video, _quality, start, end = fields
        try:
            rows.append(Annotation(category, video, float(start), float(end)))
        except ValueError:
            raise ValueError(
                f"line {number} {line.strip()!r}: StartTime and EndTime must be numbers"
            ) from None
    return rows


def first_appearance(rows: list[Annotation]) -> list[str]:
    """Event classes in order of first appearance, Tian's class numbering."""
    return list(dict.fromkeys(r.category for r in rows))


def segment_targets(row: Annotation, label: int, segments: int, background: int) -> np.ndarray:
    """[T] int16: the event class on segments t with start <= t < end, background elsewhere."""
    t = np.arange(segments)
    return np.where((row.start <= t) & (t < row.end), label, background).astype(np.int16)


# ---------------------------------------------------------------------------- files
def _find(raw: Path, paths: list[str], what: str) -> Path:
    for rel in paths:
        if (raw / rel).is_file():
            return raw / rel
    found = ", ".join(sorted(p.name for p in raw.iterdir())[:12]) or "nothing"
    raise UserError(f"the raw folder {raw} has no {what} ({' or '.join(paths)}; found: {found}).")


def _h5_shape(path: Path, key: str) -> tuple[int, ...]:
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise UserError(f"{path} has no h5 dataset {key!r} (it has {sorted(f)}).")
            return tuple(f[key].shape)
    except OSError as exc:
        raise UserError(f"cannot read {path} as HDF5: {exc}") from None


def _h5_read(path: Path, key: str) -> np.ndarray:
    _h5_shape(path, key)
    with h5py.File(path, "r") as f:
        return np.asarray(f[key][()])


def _order(path: Path, key: str) -> list[int]:
    values = _h5_read(path, key)
    if values.ndim != 1 or not (
        np.issubdtype(values.dtype, np.integer)
        or (np.issubdtype(values.dtype, np.floating) and np.all(values == np.round(values)))
    ):
        raise UserError(f"{path}: {key!r} must be a 1-d array of row indices, got {values.dtype}.")
    if (values < 0).any():
        raise UserError(f"{path}: negative row index {int(values.min())}.")
    return values.astype(np.int64).tolist()


def _row_problem(
    entry: Annotation | None, row: int, annotations: str, segments: int, feature_rows: int
) -> str:
    """Why row `row` cannot be a sample ("": it can), before its labels are compared."""
    if entry is None:
        return f"{annotations} has no line for row {row}"
    if not 0 <= entry.start <= entry.end <= segments:  # Start == End: no event segment
        return (
            f"event window [{entry.start:g}, {entry.end:g}) is not inside the {segments} segments"
        )
    if row >= feature_rows:
        return f"no features: row {row} is past the feature files' {feature_rows} rows"
    return ""


@functools.lru_cache(maxsize=8)
def _open(pid: int, path: str, key: str) -> h5py.Dataset:
    """The dataset `key` of `path`, opened once per worker process (`pid` keys the cache, so a
    forked process never uses its parent's handle)."""
    return h5py.File(path, "r")[key]


def extract_row(params: AveFeaturesParams, key: str, task: ClipTask) -> SampleRecord:
    """Row `inline["row"]` of the audio and visual features, and its segment targets."""
    row = task.inline["row"]
    values: dict[str, np.ndarray | list[bytes]] = {}
    for name, dtype in (("audio", params.audio_dtype), ("visual", params.visual_dtype)):
        try:
            stored = _open(os.getpid(), task.files[name], key)[row]
        except (OSError, KeyError) as exc:
            raise ExtractionError(f"{name} features of row {row} unreadable: {exc}") from None
        values[name] = np.asarray(stored, np.float32).astype(dtype)
    values[TARGET] = np.asarray(task.inline["target"], np.int16)
    return SampleRecord(task.sample_id, task.label, task.source, values)


# ---------------------------------------------------------------------------- the source
class AveFeaturesSource:
    Params: ClassVar[type[BaseModel]] = AveFeaturesParams
    name: ClassVar[str] = "ave_features"
    needs_raw: ClassVar[bool] = True

    def plan(
        self,
        manifest: DatasetManifest,
        params: AveFeaturesParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        """One task per row listed in an order file. Rows without a readable annotation, beyond
        the feature files, or whose labels.h5 row disagrees with the rebuilt labels, are
        planning errors; a labels.h5 that disagrees on most rows is refused (another class
        order or annotation file, not a few bad rows). Feature shapes come from the files."""
        layout = AveFeaturesRaw.model_validate(manifest.raw)
        annotations_path = _find(raw, layout.annotations, "Annotations.txt")
        try:
            rows = parse_annotations(annotations_path.read_text(encoding="utf-8-sig"))
        except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
            raise UserError(f"cannot read {annotations_path}: {exc}") from None
        events = first_appearance(rows)
        if not events:
            raise UserError(f"{annotations_path} holds no annotation line.")
        if params.background in events:
            raise UserError(f"background class name {params.background!r} is an event category.")
        classes = [*events, params.background]
        class_of = {name: i for i, name in enumerate(events)}

        audio_path = _find(raw, layout.audio, "audio features")
        visual_path = _find(raw, layout.visual, "visual features")
        audio_shape = _h5_shape(audio_path, layout.feature_key)
        visual_shape = _h5_shape(visual_path, layout.feature_key)
        if len(audio_shape) != 3 or len(visual_shape) != 5 or audio_shape[1] != visual_shape[1]:
            raise UserError(
                f"expected audio features [N, T, D] and visual features [N, T, H, W, C] with the "
                f"same T; {audio_path.name} is {list(audio_shape)}, {visual_path.name} "
                f"{list(visual_shape)}."
            )
        segments = audio_shape[1]
        feature_rows = min(audio_shape[0], visual_shape[0])
        background = len(events)

        orders = {
            split: _order(_find(raw, paths, f"{split} order file"), layout.order_key)
            for split, paths in layout.orders.items()
        }
        seen: dict[int, str] = {}
        for split, indices in orders.items():
            for row in indices:
                if row in seen:
                    raise UserError(
                        f"row {row} is listed twice (in the {seen[row]} and {split} order "
                        "files): every row must be one sample of one split."
                    )
                seen[row] = split
        if only_splits is not None:
            unknown = sorted(set(only_splits) - set(orders))
            if unknown:
                raise UserError(
                    f"--splits: {manifest.name} has no split(s) {unknown}; it has {sorted(orders)}."
                )
            orders = {s: v for s, v in orders.items() if s in only_splits}

        stored_labels = None
        if layout.labels and any((raw / p).is_file() for p in layout.labels):
            labels_path = _find(raw, layout.labels, "labels file")
            stored_labels = _h5_read(labels_path, layout.feature_key)
            if stored_labels.ndim != 3 or stored_labels.shape[1:] != (segments, len(classes)):
                raise UserError(
                    f"{labels_path} is {list(stored_labels.shape)}; with {len(events)} event "
                    f"classes in {annotations_path.name} it must be [N, {segments}, "
                    f"{len(classes)}] (one-hot, background last)."
                )

        width = max(5, len(str(max(len(rows), 1) - 1)))
        files = {"audio": str(audio_path), "visual": str(visual_path)}
        splits: dict[str, list[ClipTask]] = {}
        errors: list[tuple[str, str]] = []
        compared = disagreed = 0
        for split, indices in orders.items():
            splits[split] = []
            for row in indices[:limit]:
                entry = rows[row] if row < len(rows) else None
                video = entry.video if entry is not None else "unknown"
                sample = f"row-{row:0{width}d}-{video}"
                problem = _row_problem(entry, row, annotations_path.name, segments, feature_rows)
                if problem or entry is None:
                    errors.append((sample, problem))
                    continue
                label = class_of[entry.category]
                target = segment_targets(entry, label, segments, background)
                if stored_labels is not None:
                    if row >= len(stored_labels):
                        errors.append((sample, f"labels.h5 has no row {row}"))
                        continue
                    compared += 1
                    stored = stored_labels[row]
                    rebuilt = np.eye(len(classes))[target]
                    if not np.array_equal(stored, rebuilt):
                        disagreed += 1
                        errors.append(
                            (
                                sample,
                                f"labels.h5 row {row} (segment classes "
                                f"{np.argmax(stored, axis=1).tolist()}) differs from the labels "
                                f"rebuilt from {annotations_path.name} ({target.tolist()})",
                            )
                        )
                        continue
                splits[split].append(
                    ClipTask(
                        sample, label, sample, files, inline={"row": row, "target": target.tolist()}
                    )
                )
        if 2 * disagreed > compared:  # [ours]: a few bad rows are errors, most a wrong file
            raise UserError(
                f"labels.h5 disagrees on {disagreed} of {compared} rows with the labels rebuilt "
                f"from {annotations_path.name} (classes in order of first appearance, segments "
                "Start <= t < End): it belongs to another annotation file or class order."
            )
        if not any(splits.values()):
            raise UserError(f"no row of the order files under {raw} could be prepared.")
        return PrepPlan(
            classes=classes,
            modalities=[
                ModalitySpec(
                    name="audio",
                    dtype=params.audio_dtype,
                    shape=list(audio_shape[1:]),
                    description=f"{audio_path.name}: one embedding per 1-s segment (VGGish)",
                ),
                ModalitySpec(
                    name="visual",
                    dtype=params.visual_dtype,
                    shape=list(visual_shape[1:]),
                    description=f"{visual_path.name}: one feature map per 1-s segment "
                    "(VGG-19 pool5)",
                ),
            ],
            extraction={
                "annotations": annotations_path.name,
                "annotation_rows": len(rows),
                "feature_rows": feature_rows,
                "labels_checked": compared,
                "unlisted_rows": len(set(range(len(rows))) - set(seen)),
            },
            splits=splits,
            extractor=functools.partial(extract_row, params, layout.feature_key),
            rows_per_shard=params.rows_per_shard,
            errors=errors,
            task="localisation",
            target=ModalitySpec(
                name=TARGET,
                dtype="int16",
                shape=[segments],
                description=f"class of each segment (events 0..{background - 1}, "
                f"{params.background} {background})",
            ),
        )
