"""NVIDIA Dynamic Hand Gesture (nvGesture_v1; Molchanov et al., CVPR 2016): RGB, depth and
infrared videos of 25 hand gestures, read through the official split lists.

Raw layout (the nvGesture_v1 archive unpacked): `nvgesture_train_correct_cvpr2016_v2.lst`,
`nvgesture_test_correct_cvpr2016_v2.lst` and `Video_data/class_XX/subjectYY_rZ/{sk_color,
sk_depth, duo_left}.avi`. A list line names the sample folder and, per sensor, its video and the
gesture's frame window: `path:./Video_data/class_01/subject13_r0 depth:sk_depth:138:218
color:sk_color:138:218 duo_left:duo_left:161:254 label:1`.

The reading follows `load_split_nvgesture` and `load_data_from_file` of the readdata.py shipped
with nvGesture_v1 (a copy with the same list parsing and window slicing:
basavaraj-hampiholi/Multimodal-Action-Recognition @ da4cdfa96d37b0c3c1b76cc3fd7f5cbb133b9136,
nvgesture/readdata.py): the video of sensor s is `<path>/<folder>.avi`; labels are `label - 1`;
frames `range(start, end)` counted from the first frame (OpenCV's CAP_PROP_POS_FRAMES), at most
80, into a zero-initialised 80-frame container (a short window leaves zero frames at the end);
`color` keeps three channels, the other sensors channel 0 of OpenCV's BGR frame (blue: the
grey level of the depth and infrared videos). Frames are stored as JPEGs; the loader then picks
`pick` of them by segments, as for the other video sets. The frame size is [ours].
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import ClassVar, Literal

import av
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmval.data.extract import ExtractionError
from mmval.data.extract.video import encode_jpeg, open_media
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import ROWS_PER_SHARD, ModalitySpec, SampleRecord
from mmval.data.sources.base import stratified_fractions
from mmval.data.sources.image_text import CarveSpec
from mmval.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class NvGestureRaw(_Strict):
    splits: dict[str, list[str]] = Field(
        description="split -> its list file (relative to the raw folder), or alternatives: the "
        "first that exists is read"
    )
    carve: dict[str, CarveSpec] = Field(
        default_factory=dict, description="splits taken stratified from another split"
    )


class StreamParams(_Strict):
    name: str = Field(description="modality name")
    sensor: str = Field(description="the list's sensor key: color, depth or duo_left")
    channels: Literal[1, 3] = Field(
        description="3: RGB; 1: channel 0 of the BGR frame, as readdata.py keeps for non-color"
    )


def _default_streams() -> list[StreamParams]:
    return [
        StreamParams(name="rgb", sensor="color", channels=3),
        StreamParams(name="depth", sensor="depth", channels=1),
        StreamParams(name="ir", sensor="duo_left", channels=1),
    ]


class NvGestureParams(_Strict):
    streams: list[StreamParams] = Field(default_factory=_default_streams)
    frames: int = Field(default=80, ge=1, description="frames stored per stream (readdata: 80)")
    sampling: Literal["first", "uniform"] = Field(
        default="first",
        description="first: the first `frames` of [start, end) (readdata.py); uniform: `frames` "
        "indices spread evenly over [start, end) [ours]",
    )
    pad: bool = Field(
        default=True,
        description="fill a short window with black frames up to `frames` (readdata's zero "
        "container); false: store only the window's frames",
    )
    size: tuple[int, int] = Field(default=(112, 112), description="(height, width) stored")
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    pick: int = Field(default=8, ge=1, description="frames the loader picks by segments")
    rows_per_shard: int = Field(default=ROWS_PER_SHARD, ge=1)

    @model_validator(mode="after")
    def _distinct(self) -> NvGestureParams:
        names = [s.name for s in self.streams]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"streams need distinct modality names, got {names}")
        return self


# ---------------------------------------------------------------------------- the lists
Entry = tuple[str, int, dict[str, tuple[str, int, int]]]  # folder, label, sensor -> window


def parse_line(line: str) -> Entry:
    """(sample folder, 0-based label, sensor -> (video folder name, start, end)) of a list line,
    as `load_split_nvgesture` reads it (`path:` first, then `key:...` fields)."""
    fields = line.split()
    if not fields or not fields[0].startswith("path:"):
        raise ValueError("the line does not start with path:")
    folder = fields[0].split(":", 1)[1]
    label: int | None = None
    sensors: dict[str, tuple[str, int, int]] = {}
    for field in fields[1:]:
        parts = field.split(":")
        if parts[0] == "label":
            label = int(parts[1]) - 1
        elif len(parts) == 4:
            sensors[parts[0]] = (parts[1], int(parts[2]), int(parts[3]))
    if label is None:
        raise ValueError("no label: field")
    return folder, label, sensors


def _read_list(raw: Path, paths: list[str], classes: int) -> list[Entry]:
    rel = next((p for p in paths if (raw / p).is_file()), None)
    if rel is None:
        found = ", ".join(sorted(p.name for p in raw.iterdir())[:12]) or "nothing"
        raise UserError(
            f"the raw folder {raw} has no split list {' or '.join(paths)} (found: {found})."
        )
    entries = []
    for number, line in enumerate((raw / rel).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = parse_line(line)
        except ValueError as exc:
            raise UserError(f"{raw / rel} line {number}: {exc}: {line.strip()!r}") from None
        if not 0 <= entry[1] < classes:
            raise UserError(
                f"{raw / rel} line {number}: label {entry[1] + 1} is outside 1..{classes}."
            )
        entries.append(entry)
    return entries


# ---------------------------------------------------------------------------- extraction
def window_indices(start: int, end: int, params: NvGestureParams) -> list[int]:
    """Frame indices (0-based, decode order) read from the window [start, end)."""
    if params.sampling == "first":
        return list(range(start, min(end, start + params.frames)))
    return np.linspace(start, end - 1, params.frames).round().astype(int).tolist()


def read_indexed_frames(
    path: Path, indices: list[int], size: tuple[int, int]
) -> tuple[dict[int, np.ndarray], float]:
    """The RGB frames [H, W, 3] at `indices` (counted from the first decoded frame, as OpenCV
    numbers them) that the video has, resized to `size`, and its frame rate."""
    wanted = set(indices)
    last = max(indices)
    height, width = size
    kept: dict[int, np.ndarray] = {}
    try:
        with open_media(path) as container:
            if not container.streams.video:
                raise ExtractionError("no video stream")
            stream = container.streams.video[0]
            rate = float(stream.average_rate or stream.guessed_rate or 30)
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    kept[i] = frame.to_ndarray(
                        width=width, height=height, format="rgb24", interpolation="AREA"
                    )
                if i >= last:
                    break
    except av.FFmpegError as exc:
        raise ExtractionError(f"undecodable: {exc.strerror or exc}") from exc
    return kept, rate


def extract_gesture(params: NvGestureParams, task: ClipTask) -> SampleRecord:
    values: dict[str, np.ndarray | list[bytes]] = {}
    times: dict[str, np.ndarray] = {}
    for stream in params.streams:
        start, end = task.inline[stream.sensor]
        indices = window_indices(start, end, params)
        path = Path(task.files[stream.sensor])
        try:
            kept, rate = read_indexed_frames(path, indices, params.size)
        except ExtractionError as exc:
            raise ExtractionError(f"{stream.name} ({path.name}): {exc}") from None
        if not kept:
            raise ExtractionError(
                f"{stream.name} ({path.name}): no frame in the window [{start}, {end})"
            )
        h, w = params.size
        blank = np.zeros((h, w, 3), np.uint8)  # readdata: frames it cannot read stay zero
        order = indices if params.pad else [i for i in indices if i in kept]
        if params.pad and params.sampling == "first":
            order = order + [order[-1] + 1 + k for k in range(params.frames - len(order))]
        frames = np.stack([kept.get(i, blank) for i in order])
        if stream.channels == 1:
            frames = frames[..., 2:3]  # OpenCV's channel 0 is blue
        values[stream.name] = encode_jpeg(frames, params.jpeg_quality)
        times[stream.name] = np.asarray(order, np.float32) / rate
    return SampleRecord(task.sample_id, task.label, task.source, values, times)


def _modality(stream: StreamParams, params: NvGestureParams) -> ModalitySpec:
    h, w = params.size
    what = "RGB" if stream.channels == 3 else "grey (channel 0 of the BGR frame)"
    return ModalitySpec(
        name=stream.name,
        dtype="uint8",
        shape=[params.pick, h, w, stream.channels],
        encoding="jpeg",
        description=f"{stream.sensor} video, {what} frames of the gesture window",
    )


class NvGestureSource:
    Params: ClassVar[type[BaseModel]] = NvGestureParams
    name: ClassVar[str] = "nvgesture"
    needs_raw: ClassVar[bool] = True

    def plan(
        self,
        manifest: DatasetManifest,
        params: NvGestureParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        """One task per list line; a sample whose list line lacks a sensor, or whose video file
        is missing, is a planning error; carved splits are cut from theirs by class."""
        layout = NvGestureRaw.model_validate(manifest.raw)
        classes = list(manifest.classes)
        listed = {
            split: _read_list(raw, paths, len(classes)) for split, paths in layout.splits.items()
        }
        for name, carve in layout.carve.items():
            if carve.carve_from not in listed:
                raise UserError(f"carve: {name} is cut from an unknown split {carve.carve_from!r}.")
            by_folder = {entry[0]: entry for entry in listed[carve.carve_from]}
            parts = stratified_fractions(
                list(by_folder),
                [entry[1] for entry in by_folder.values()],
                {"kept": 1 - carve.fraction, name: carve.fraction},
                carve.seed,
            )
            listed[carve.carve_from] = [by_folder[f] for f in parts["kept"]]
            listed[name] = [by_folder[f] for f in parts[name]]
        if only_splits is not None:
            unknown = sorted(set(only_splits) - set(listed))
            if unknown:
                raise UserError(
                    f"--splits: {manifest.name} has no split(s) {unknown}; it has {sorted(listed)}."
                )
            listed = {s: entries for s, entries in listed.items() if s in only_splits}
        splits: dict[str, list[ClipTask]] = {}
        errors: list[tuple[str, str]] = []
        for split, entries in listed.items():
            splits[split] = []
            for folder, label, sensors in sorted(entries)[:limit]:
                sample = folder.removeprefix("./")
                task = self._task(raw, sample, label, sensors, params)
                if isinstance(task, str):
                    errors.append((sample, task))
                else:
                    splits[split].append(task)
        if not any(splits.values()):
            raise UserError(
                f"no sample listed in the split files of {manifest.name} has its videos under "
                f"{raw} (expected Video_data/class_XX/subjectYY_rZ/sk_color.avi etc.)."
            )
        return PrepPlan(
            classes=classes,
            modalities=[_modality(s, params) for s in params.streams],
            extraction={},
            splits=splits,
            extractor=functools.partial(extract_gesture, params),
            rows_per_shard=params.rows_per_shard,
            errors=errors,
        )

    @staticmethod
    def _task(
        raw: Path,
        sample: str,
        label: int,
        sensors: dict[str, tuple[str, int, int]],
        params: NvGestureParams,
    ) -> ClipTask | str:
        """The task of one list line, or why it cannot be extracted."""
        files: dict[str, str] = {}
        windows: dict[str, tuple[int, int]] = {}
        for stream in params.streams:
            if stream.sensor not in sensors:
                return f"the list line has no {stream.sensor}: field"
            video, start, end = sensors[stream.sensor]
            if end <= start or start < 0:
                return f"empty {stream.sensor} window [{start}, {end})"
            path = raw / sample / f"{video}.avi"
            if not path.is_file():
                return f"video file not found ({sample}/{video}.avi)"
            files[stream.sensor] = str(path)
            windows[stream.sensor] = (start, end)
        return ClipTask(sample, label, sample, files, inline=windows)
