"""Audio-visual clip data sets (Kinetics-Sounds, CREMA-D, AVE, UCF-101, VGGSound, MELD, ...).

The manifest's `raw` section says where the split lists are and how to parse them, and where
each clip's video and audio files are; its `params` say what to extract per modality. Planning
reads only the lists and the folder tree; extraction runs per clip in worker processes. A list
may also carry a text column (MELD's utterances): a `text` modality tokenizes it while planning,
with a tokenizer fitted on the training split, as the image-text data sets do.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from mmval.data.extract import ExtractionError
from mmval.data.extract.audio import AudioDecoder, kaldi_fbank, read_audio, stft_spectrogram
from mmval.data.extract.flow import flow_pair_frames, optical_flow
from mmval.data.extract.psd import log_psd
from mmval.data.extract.text import (
    HFTokenizer,
    TextCleaning,
    TokenizerConfig,
    WordTokenizer,
    WordTokenizerConfig,
    build_tokenizer,
    clean_text,
)
from mmval.data.extract.video import encode_jpeg, open_media, read_video_frames
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import ROWS_PER_SHARD, ModalitySpec, SampleRecord, sha256_text
from mmval.errors import UserError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- raw layout
Column = int | str  # a position in a line, or a field name of a json entry


class RowFilter(_Strict):
    """Keep only the rows whose `column` equals `equals`: one list with a split column (VGGSound's
    csv, MM-Debiased's json) then serves several splits."""

    column: Column
    equals: str


class ListSpec(_Strict):
    """A split list file and how to read the clip id, label and event window from each row.

    Line formats give positional columns; `json` reads an object `{key: {field: value}}`, one
    row per entry, whose columns are field names and whose column 0 is the entry's key.
    """

    path: str | list[str] = Field(
        description="relative to the raw folder; or alternatives, the first that exists is read"
    )
    format: Literal["csv", "whitespace", "ampersand", "json"] = "csv"
    encoding: str = Field(default="utf-8-sig", description="utf-8-sig also strips a BOM")
    header: bool = False
    id: Column | list[Column] = Field(
        default=0, description="column of the clip id, or columns joined with '_'"
    )
    id_format: str | None = Field(
        default=None,
        description="the id from the id columns by Python format, {0} the first: "
        "'train/dia{0}_utt{1}' (default: the columns joined with '_')",
    )
    video: list[str] | None = Field(
        default=None,
        description="this list's video paths instead of media.video: patterns with {id} and "
        "the id columns {0}, {1}, ..., tried in order (MELD keeps each split in its own folder, "
        "where its archive was unpacked)",
    )
    text: Column | None = Field(default=None, description="column of the text (`text` modality)")
    label: Column | None = Field(default=1, description="column of the label (None: `folder`)")
    label_kind: Literal["index", "index1", "name", "folder"] = "name"
    window: tuple[Column, Column] | None = Field(default=None, description="event start/end")
    where: RowFilter | None = None

    @property
    def id_columns(self) -> list[Column]:
        return self.id if isinstance(self.id, list) else [self.id]

    @model_validator(mode="after")
    def _columns_fit_format(self) -> ListSpec:
        if isinstance(self.id, list) and not self.id:
            raise ValueError("id needs at least one column")
        columns = [*self.id_columns, self.label, self.text, *(self.window or ())]
        columns.append(self.where.column if self.where else None)
        if self.format == "json":
            bad = [c for c in columns if isinstance(c, int) and c != 0]
            rule = "json columns are field names (0 is the entry's key)"
        else:
            bad = [c for c in columns if isinstance(c, str)]
            rule = f"{self.format} columns are positions"
        if bad:
            raise ValueError(f"{rule}, not {bad}")
        return self


class SplitSpec(_Strict):
    lists: list[ListSpec] = Field(default_factory=list)
    carve_from: str | None = Field(
        default=None, description="take a stratified `fraction` of this split instead of lists"
    )
    fraction: float = Field(default=0.1, gt=0, lt=1)
    seed: int = 0


class MediaSpec(_Strict):
    video: str | None = Field(default=None, description="path pattern with {id}")
    audio: str | None = Field(default=None, description="path pattern with {id}, or 'video'")
    match: Literal["path", "youtube-start"] = Field(
        default="path",
        description="youtube-start: find the file by 11-char YouTube id + start second (an id "
        "without a start: the file of that YouTube id, if there is only one)",
    )
    search: str = Field(default="**/*.mp4", description="files indexed for youtube-start")


class RegroupSpec(_Strict):
    """Re-split all listed clips so that no group (e.g. CREMA-D actor) spans two splits."""

    pattern: str = Field(description="regex whose first group is the group key of a clip id")
    fractions: dict[str, float]
    seed: int = 0


class ClassesFile(_Strict):
    """Class names read from a raw file column, in order of first appearance (or sorted)."""

    path: str
    format: Literal["csv", "whitespace", "ampersand", "json"] = "whitespace"
    column: Column = 1
    order: Literal["first", "sorted"] = "first"


class AVRaw(_Strict):
    splits: dict[str, SplitSpec]
    media: MediaSpec
    regroup: RegroupSpec | None = None
    classes_file: ClassesFile | None = None
    class_subset: list[str] | None = Field(
        default=None, description="keep only clips of these classes (relabelled in this order)"
    )


# ------------------------------------------------------------------------ extraction params
class FramesParams(_Strict):
    kind: Literal["frames"] = "frames"
    name: str = "visual"
    fps: float = 1.0
    position: Literal["start", "center"] = "start"
    max_frames: int | None = 10
    size: tuple[int, int] = Field(default=(224, 224), description="(height, width) stored")
    jpeg_quality: int = Field(default=90, ge=1, le=100)
    pick: int = Field(default=3, ge=1, description="frames the loader picks by segments")
    within_window: bool = False
    count: int | None = Field(
        default=None, description="instead of fps: this many frames spread evenly over the clip"
    )


class FbankParams(_Strict):
    kind: Literal["fbank"] = "fbank"
    name: str = "audio"
    sample_rate: int | None = 16000
    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    target_frames: int = 1024
    mean: float = -4.503877
    std: float = 5.141276
    within_window: bool = False


class StftParams(_Strict):
    kind: Literal["stft"] = "stft"
    name: str = "audio"
    sample_rate: int = 22050
    n_fft: int = 512
    hop_length: int = 353
    seconds: float = 3.0
    offset: float = Field(
        default=0.0, ge=0, description="seconds of the tiled wave skipped before `seconds` kept"
    )
    tile: bool = True
    repeat: Literal["all", "last_second"] = Field(
        default="all",
        description="what tiling repeats: the whole wave (OGM-GE) or its last partial second "
        "(GeWu-Lab AV_preprocess_tool)",
    )
    pad_mode: Literal["constant", "reflect"] = Field(
        default="constant", description="padding of the centred STFT's ends"
    )
    log: bool = Field(default=True, description="log(|S| + 1e-7); false: the magnitude |S|")
    within_window: bool = False

    @model_serializer(mode="wrap")
    def _omit_default_reference(self, handler: SerializerFunctionWrapHandler) -> dict:
        """At their defaults (OGM-GE's), `repeat`, `pad_mode` and `log` dump as before they
        existed, so a data set prepared earlier still matches its settings on a re-run."""
        dump = handler(self)
        for name in ("repeat", "pad_mode", "log"):
            if getattr(self, name) == type(self).model_fields[name].default:
                dump.pop(name, None)
        return dump


class PsdParams(_Strict):
    kind: Literal["psd"] = "psd"
    name: str = "audio"
    sample_rate: int = 22050
    nperseg: int = 512
    noverlap: int = 353
    samples: int = Field(default=160000, description="tiled / cropped to this many samples")
    within_window: bool = False


class FlowParams(_Strict):
    kind: Literal["flow", "rgb_diff"] = "flow"
    name: str = "flow"
    pairs: int = Field(default=10, ge=1, description="consecutive-frame pairs stored per clip")
    method: Literal["dis", "farneback", "tvl1"] = "dis"
    bound: float = 20.0
    size: tuple[int, int] = (224, 224)
    jpeg_quality: int = Field(default=95, ge=1, le=100)
    pick: int = Field(default=3, ge=1)


class TextParams(_Strict):
    """Token ids of the list's text column, cleaned and tokenized while planning (the tokenizer
    is fitted on the training split's texts only, or read from a local path)."""

    kind: Literal["text"] = "text"
    name: str = "text"
    cleaning: TextCleaning = Field(default_factory=TextCleaning)
    tokenizer: TokenizerConfig = Field(default_factory=WordTokenizerConfig)


ModalityParams = Annotated[
    FramesParams | FbankParams | StftParams | PsdParams | FlowParams, Field(discriminator="kind")
]
ClipModalityParams = Annotated[
    FramesParams | FbankParams | StftParams | PsdParams | FlowParams | TextParams,
    Field(discriminator="kind"),
]


class AVParams(_Strict):
    modalities: list[ClipModalityParams]
    rows_per_shard: int = Field(default=ROWS_PER_SHARD, ge=1)
    min_seconds: float = Field(default=0.5, description="shorter clips are errors")

    @model_validator(mode="after")
    def _one_text(self) -> AVParams:
        if sum(isinstance(m, TextParams) for m in self.modalities) > 1:
            raise ValueError("at most one text modality: a list has one text column")
        return self

    @property
    def text(self) -> TextParams | None:
        return next((m for m in self.modalities if isinstance(m, TextParams)), None)


# ---------------------------------------------------------------------------- planning
_YT = re.compile(r"^(?P<yt>[A-Za-z0-9_-]{11})(?:_(?P<start>\d+)(?:_\d+)?)?$")

Row = dict[Column, str]


def _youtube_key(stem: str) -> tuple[str, int | None] | None:
    """(YouTube id, start second or None) of `{ytid}`, `{ytid}_{start}` or
    `{ytid}_{start}_{end}`, with or without zero padding."""
    match = _YT.match(stem)
    if match is None:
        return None
    return match["yt"], None if match["start"] is None else int(match["start"])


def _list_path(root: Path, spec: ListSpec) -> str:
    """The split list's file: `path`, or the first of its alternatives that exists."""
    paths = [spec.path] if isinstance(spec.path, str) else spec.path
    found = next((rel for rel in paths if (root / rel).is_file()), None)
    if found is None:
        raise UserError(f"the raw folder {root} has no split list {' or '.join(paths)}.")
    return found


def _read_rows(root: Path, spec: ListSpec) -> list[Row]:
    rel = _list_path(root, spec)
    text = (root / rel).read_text(encoding=spec.encoding)
    if spec.format == "json":
        return _json_rows(text, rel)
    if spec.format == "csv":
        # rows, not lines: a quoted field may hold a line break, and str.splitlines would also
        # break at U+0085 (MELD's utterances keep cp1252's ellipsis byte as that character)
        cells = [r for r in csv.reader(io.StringIO(text)) if r and (len(r) > 1 or r[0].strip())]
        return [dict(enumerate(row)) for row in cells[1 if spec.header else 0 :]]
    lines = [line for line in text.splitlines() if line.strip()]
    if spec.header:
        lines = lines[1:]
    if spec.format == "ampersand":
        cells = [line.split("&") for line in lines]
    else:
        cells = [line.split() for line in lines]
    return [dict(enumerate(row)) for row in cells]


def _json_rows(text: str, name: str) -> list[Row]:
    try:
        entries = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"split list {name} is not valid JSON: {exc}") from None
    if not isinstance(entries, dict) or not all(isinstance(v, dict) for v in entries.values()):
        raise UserError(f"split list {name} must be a JSON object {{id: {{field: value}}}}.")
    return [{0: key, **{k: str(v) for k, v in entry.items()}} for key, entry in entries.items()]


def _cell(row: Row, column: Column, spec: ListSpec, strip: bool = True) -> str:
    if column not in row:
        raise UserError(f"a row of {spec.path} has no column {column!r}: {list(row.values())}")
    return row[column].strip() if strip else row[column]


def _label_of(row: Row, clip_id: str, spec: ListSpec, class_index: dict[str, int]) -> int:
    if spec.label_kind == "folder":
        name = clip_id.split("/")[0]
    else:
        assert spec.label is not None
        name = _cell(row, spec.label, spec)
        if spec.label_kind in ("index", "index1"):
            return int(name) - (1 if spec.label_kind == "index1" else 0)
    if name not in class_index:
        raise UserError(f"label {name!r} in {spec.path} is not one of the manifest's classes.")
    return class_index[name]


@dataclasses.dataclass
class _Listed:
    clip_id: str
    label: int
    window: tuple[float, float] | None
    videos: list[str] | None = None  # the list's own video paths (raw-relative), in order
    text: str | None = None


def _list_split(root: Path, split: SplitSpec, class_index: dict[str, int]) -> list[_Listed]:
    listed: dict[str, _Listed] = {}
    for spec in split.lists:
        for row in _read_rows(root, spec):
            if spec.where is not None and _cell(row, spec.where.column, spec) != spec.where.equals:
                continue
            window = None
            if spec.window is not None:
                start, end = (float(_cell(row, c, spec)) for c in spec.window)
                window = (start, end)
            ids = [_cell(row, c, spec) for c in spec.id_columns]
            clip_id = "_".join(ids) if spec.id_format is None else spec.id_format.format(*ids)
            videos = None
            if spec.video is not None:
                videos = [pattern.format(*ids, id=clip_id) for pattern in spec.video]
            # unstripped: str.strip drops U+0085, MELD's ellipsis (the cleaning trims the text)
            text = None if spec.text is None else _cell(row, spec.text, spec, strip=False)
            label = _label_of(row, clip_id, spec, class_index)
            listed[clip_id] = _Listed(clip_id, label, window, videos, text)
    return list(listed.values())


def _carve(items: list[_Listed], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified: from each class, a seeded `fraction` (at least one sample of every class that
    has two) goes to the carved split."""
    rng = np.random.default_rng(seed)
    by_label: dict[int, list[_Listed]] = defaultdict(list)
    for item in sorted(items, key=lambda it: it.clip_id):
        by_label[item.label].append(item)
    kept, carved = [], []
    for label in sorted(by_label):
        members = by_label[label]
        take = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        chosen = set(rng.permutation(len(members))[:take].tolist())
        for i, item in enumerate(members):
            (carved if i in chosen else kept).append(item)
    return kept, carved


def _regroup(splits: dict[str, list[_Listed]], spec: RegroupSpec) -> dict[str, list[_Listed]]:
    pattern = re.compile(spec.pattern)
    groups: dict[str, list[_Listed]] = defaultdict(list)
    for item in (it for items in splits.values() for it in items):
        match = pattern.search(item.clip_id)
        if match is None:
            raise UserError(f"clip id {item.clip_id!r} does not match regroup.pattern.")
        groups[match.group(1)].append(item)
    keys = sorted(groups)
    order = [keys[i] for i in np.random.default_rng(spec.seed).permutation(len(keys))]
    total = sum(spec.fractions.values())
    out: dict[str, list[_Listed]] = {name: [] for name in spec.fractions}
    start = 0.0
    for name, share in spec.fractions.items():
        lo, hi = round(start / total * len(order)), round((start + share) / total * len(order))
        for key in order[lo:hi]:
            out[name].extend(groups[key])
        start += share
    return out


class _MediaIndex:
    def __init__(self, root: Path, media: MediaSpec) -> None:
        self.root, self.media = root, media
        self.by_key: dict[tuple[str, int | None], Path] = {}
        self.by_video: dict[str, list[Path]] = defaultdict(list)
        if media.match == "youtube-start":
            for path in sorted(root.glob(media.search)):
                key = _youtube_key(path.stem)
                if key is not None:
                    self.by_key.setdefault(key, path)
                    self.by_video[key[0]].append(path)

    def video(self, clip_id: str) -> Path | None:
        if self.media.match == "youtube-start":
            key = _youtube_key(Path(clip_id).name)
            if key is None:
                return None
            found = self.by_key.get(key)
            if found is None and key[1] is None:  # MM-Debiased lists some clips by video id only
                clips = self.by_video.get(key[0], [])
                found = clips[0] if len(clips) == 1 else None
            return found
        if self.media.video is None:
            return None
        return self.root / self.media.video.format(id=clip_id)

    def files(
        self, clip_id: str, videos: list[str] | None = None
    ) -> tuple[dict[str, str], str | None]:
        """The files of a clip (its list's own `videos` first), or why it cannot be extracted."""
        files: dict[str, str] = {}
        if videos is not None:
            found = next((self.root / v for v in videos if (self.root / v).is_file()), None)
            if found is None:
                return files, f"video file not found ({' or '.join(videos)})"
            files["video"] = str(found)
        elif self.media.video is not None or self.media.match == "youtube-start":
            video = self.video(clip_id)
            if video is None or not video.is_file():
                clips = len(self.by_video.get(Path(clip_id).name, []))
                if clips > 1:  # a bare video id, several clips of that video
                    return files, f"{clips} clips of this YouTube video; the id gives no start"
                return files, "video file not found"
            files["video"] = str(video)
        if self.media.audio == "video":
            if "video" in files:
                files["audio"] = files["video"]
        elif self.media.audio is not None:
            audio = self.root / self.media.audio.format(id=clip_id)
            if not audio.is_file():
                return files, f"audio file not found ({audio.relative_to(self.root)})"
            files["audio"] = str(audio)
        return files, None


def modality_spec(params: ModalityParams) -> ModalitySpec:
    """How a modality of `params` is stored (dtype, shape, encoding)."""
    if isinstance(params, FramesParams):
        h, w = params.size
        return ModalitySpec(
            name=params.name,
            dtype="uint8",
            shape=[params.pick, h, w, 3],
            encoding="jpeg",
            description=f"RGB frames at {params.fps} fps",
        )
    if isinstance(params, FlowParams):
        h, w = params.size
        if params.kind == "flow":
            return ModalitySpec(
                name=params.name,
                dtype="uint8",
                shape=[params.pick, h, w, 2],
                encoding="jpeg-uv",
                description=f"{params.method} optical flow",
            )
        return ModalitySpec(
            name=params.name,
            dtype="uint8",
            shape=[params.pick, h, w, 3],
            encoding="jpeg",
            description="RGB difference of consecutive frames",
        )
    if isinstance(params, FbankParams):
        return ModalitySpec(
            name=params.name,
            dtype="float16",
            shape=[params.target_frames, params.num_mel_bins],
            description="Kaldi log-mel filterbank (AST style)",
        )
    if isinstance(params, PsdParams):
        frames = (params.samples - params.noverlap) // (params.nperseg - params.noverlap)
        return ModalitySpec(
            name=params.name,
            dtype="float16",
            shape=[params.nperseg // 2 + 1, frames],
            description="log power spectral density, z-normalised per sample",
        )
    frames = int(params.seconds * params.sample_rate) // params.hop_length + 1
    return ModalitySpec(
        name=params.name,
        dtype="float16",
        shape=[params.n_fft // 2 + 1, frames],
        description="log STFT magnitude" if params.log else "STFT magnitude",
    )


def _fit_tokenizer(
    name: str, params: TextParams, listed: dict[str, list[_Listed]]
) -> WordTokenizer | HFTokenizer:
    """The tokenizer of the text modality: fitted on the cleaned texts of the whole training
    split (before --limit and --splits, so a partial prep tokenizes as the full one)."""
    items = [it for items in listed.values() for it in items]
    if any(it.text is None for it in items):
        raise UserError(
            f"{name} has a text modality, but a split list of its manifest names no `text` column."
        )
    train = listed.get("train")
    if not train:
        raise UserError(f"{name}: the training split is empty; no text to fit a tokenizer on.")
    return build_tokenizer(
        params.tokenizer, [clean_text(it.text or "", params.cleaning) for it in train]
    )


def _text_spec(params: TextParams, tokenizer: WordTokenizer | HFTokenizer | None) -> ModalitySpec:
    assert tokenizer is not None
    return ModalitySpec(
        name=params.name,
        dtype="int32",
        shape=[params.tokenizer.max_length],
        encoding="tokens",
        description=f"{params.tokenizer.kind} token ids",
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        vocab_file=f"tokenizer-{params.name}.json",
    )


# -------------------------------------------------------------------------- extraction
def _in_window(task: ClipTask, use: bool) -> tuple[float, float | None]:
    return task.window if use and task.window is not None else (0.0, None)


def _probe(path: Path) -> tuple[float, float]:
    """(duration in seconds, frame rate) of the first video stream, from its metadata."""
    with open_media(path) as container:
        if not container.streams.video:
            raise ExtractionError("no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        if stream.duration is not None and stream.time_base is not None:
            return float(stream.duration * stream.time_base), rate
        return (container.duration or 0) / 1_000_000, rate


def _flow_like(params: FlowParams, path: str) -> tuple[list[bytes], np.ndarray]:
    _, rate = _probe(Path(path))
    video = read_video_frames(Path(path), fps=rate, size=params.size)  # every frame
    n = len(video.frames)
    if n < 2:
        raise ExtractionError("need at least 2 frames for optical flow")
    starts = np.unique(np.linspace(0, n - 2, params.pairs).round().astype(int))
    times = video.times[starts]
    if params.kind == "flow":
        planes = [
            flow_pair_frames(
                optical_flow(video.frames[[s, s + 1]], method=params.method, bound=params.bound)
            )
            for s in starts
        ]
        return encode_jpeg(np.concatenate(planes), params.jpeg_quality), times
    diff = video.frames[starts + 1].astype(np.int16) - video.frames[starts].astype(np.int16)
    return encode_jpeg((diff // 2 + 128).astype(np.uint8), params.jpeg_quality), times


_SOUND = (FbankParams, StftParams, PsdParams)


def _sound_with_frames(
    params: AVParams, task: ClipTask
) -> tuple[FramesParams, FbankParams | StftParams | PsdParams, AudioDecoder] | None:
    """When the first frames and the first sound come from one file, in that order, the sound
    is decoded in the pass that indexes the frames (one opening and one demux of the file
    instead of two of each: about 3 ms of a 10-s clip's 60): the two modalities and the decoder
    that rides along."""
    frames = next((s for s in params.modalities if isinstance(s, FramesParams)), None)
    sound = next((s for s in params.modalities if isinstance(s, _SOUND)), None)
    if frames is None or sound is None or task.files.get("audio") != task.files.get("video"):
        return None
    if params.modalities.index(sound) < params.modalities.index(frames):
        return None
    start, end = _in_window(task, sound.within_window)
    return frames, sound, AudioDecoder(start=start, end=end)


def extract_clip(params: AVParams, task: ClipTask) -> SampleRecord:
    values: dict[str, np.ndarray | list[bytes]] = {}
    times: dict[str, np.ndarray] = {}
    texts: dict[str, str] = {}
    together = _sound_with_frames(params, task)
    for spec in params.modalities:
        if isinstance(spec, TextParams):  # tokenized while planning
            values[spec.name], texts[spec.name] = task.inline["ids"], task.inline["text"]
        elif isinstance(spec, FramesParams):
            start, end = _in_window(task, spec.within_window)
            video = read_video_frames(
                Path(task.files["video"]),
                fps=spec.fps,
                position=spec.position,
                max_frames=spec.max_frames,
                size=spec.size,
                start=start,
                end=end,
                also=together[2] if together is not None and spec is together[0] else None,
            )
            if video.duration < params.min_seconds:
                raise ExtractionError(f"too short: {video.duration:.2f} s < {params.min_seconds} s")
            values[spec.name] = encode_jpeg(video.frames, spec.jpeg_quality)
            times[spec.name] = video.times
        elif isinstance(spec, FlowParams):
            values[spec.name], times[spec.name] = _flow_like(spec, task.files["video"])
        else:
            if "audio" not in task.files:
                raise ExtractionError("no audio file")
            if together is not None and spec is together[1]:
                wave, rate = together[2].wave(sample_rate=spec.sample_rate, mono=True)
            else:
                start, end = _in_window(task, spec.within_window)
                wave, rate = read_audio(
                    Path(task.files["audio"]), sample_rate=spec.sample_rate, start=start, end=end
                )
            if wave.shape[-1] < params.min_seconds * rate:
                raise ExtractionError(
                    f"too short: audio {wave.shape[-1] / rate:.2f} s < {params.min_seconds} s"
                )
            if isinstance(spec, PsdParams):
                feats = log_psd(
                    wave, rate, nperseg=spec.nperseg, noverlap=spec.noverlap, samples=spec.samples
                )
            elif isinstance(spec, FbankParams):
                feats = kaldi_fbank(
                    wave,
                    rate,
                    num_mel_bins=spec.num_mel_bins,
                    frame_shift_ms=spec.frame_shift_ms,
                    target_frames=spec.target_frames,
                    mean=spec.mean,
                    std=spec.std,
                )
            else:
                feats = stft_spectrogram(
                    wave,
                    rate,
                    n_fft=spec.n_fft,
                    hop_length=spec.hop_length,
                    seconds=spec.seconds,
                    offset=spec.offset,
                    tile=spec.tile,
                    repeat=spec.repeat,
                    pad_mode=spec.pad_mode,
                    log=spec.log,
                )
            values[spec.name] = feats.astype(np.float16)
    return SampleRecord(task.sample_id, task.label, task.source, values, times, texts)


class AVClipsSource:
    name: ClassVar[str] = "av_clips"
    needs_raw: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = AVParams

    def plan(
        self,
        manifest: DatasetManifest,
        params: AVParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        layout = AVRaw.model_validate(manifest.raw)
        classes = self._classes(manifest, layout, raw)
        class_index = {name: i for i, name in enumerate(classes)}
        listed = {
            name: _list_split(raw, split, class_index)
            for name, split in layout.splits.items()
            if split.carve_from is None
        }
        for name, split in layout.splits.items():
            if split.carve_from is not None:
                listed[split.carve_from], listed[name] = _carve(
                    listed[split.carve_from], split.fraction, split.seed
                )
        if layout.regroup is not None:
            listed = _regroup(listed, layout.regroup)
        if layout.class_subset is not None:
            unknown = [c for c in layout.class_subset if c not in class_index]
            if unknown:
                raise UserError(f"class_subset of {manifest.name} names unknown classes {unknown}.")
            keep = {class_index[c]: i for i, c in enumerate(layout.class_subset)}
            listed = {
                name: [
                    dataclasses.replace(it, label=keep[it.label])
                    for it in items
                    if it.label in keep
                ]
                for name, items in listed.items()
            }
            classes = list(layout.class_subset)
        tokenizer = (
            None if params.text is None else _fit_tokenizer(manifest.name, params.text, listed)
        )
        if only_splits is not None:
            unknown = sorted(set(only_splits) - set(listed))
            if unknown:
                raise UserError(
                    f"--splits: {manifest.name} has no split(s) {unknown}; it has {sorted(listed)}."
                )
            listed = {name: items for name, items in listed.items() if name in only_splits}
        index = _MediaIndex(raw, layout.media)
        splits: dict[str, list[ClipTask]] = {}
        errors: list[tuple[str, str]] = []
        for name, items in listed.items():
            items = sorted(items, key=lambda it: it.clip_id)[:limit]
            splits[name] = []
            for item in items:
                files, problem = index.files(item.clip_id, item.videos)
                if problem is not None:
                    errors.append((item.clip_id, problem))
                    continue
                source = str(Path(files.get("video") or files["audio"]).relative_to(raw))
                inline = {}
                if params.text is not None and tokenizer is not None:
                    text = clean_text(item.text or "", params.text.cleaning)
                    inline = {"text": text, "ids": tokenizer.encode(text)}
                splits[name].append(
                    ClipTask(item.clip_id, item.label, source, files, item.window, inline)
                )
        planned = sum(len(tasks) for tasks in splits.values())
        if planned == 0:
            example = layout.media.video or layout.media.audio or layout.media.search
            raise UserError(
                f"no clip listed in the split files of {manifest.name} was found under {raw} "
                f"(expected files like {example}); found at the top level: "
                f"{', '.join(sorted(p.name for p in raw.iterdir())[:12]) or 'nothing'}."
            )
        modalities = [
            modality_spec(m) if not isinstance(m, TextParams) else _text_spec(m, tokenizer)
            for m in params.modalities
        ]
        extraction: dict = {}
        files: dict[str, bytes] = {}
        if params.text is not None and tokenizer is not None:
            vocab_file = f"tokenizer-{params.text.name}.json"
            files[vocab_file] = tokenizer.to_bytes()
            extraction["files"] = {vocab_file: sha256_text(files[vocab_file].decode("utf-8"))}
        return PrepPlan(
            classes=classes,
            modalities=modalities,
            extraction=extraction,
            splits=splits,
            extractor=functools.partial(extract_clip, params),
            rows_per_shard=params.rows_per_shard,
            errors=errors,
            files=files,
        )

    @staticmethod
    def _classes(manifest: DatasetManifest, layout: AVRaw, raw: Path) -> list[str]:
        spec = layout.classes_file
        if spec is None:
            return list(manifest.classes)
        listing = ListSpec(path=spec.path, format=spec.format, label=spec.column)
        rows = _read_rows(raw, listing)
        names = list(dict.fromkeys(_cell(row, spec.column, listing) for row in rows))
        return sorted(names) if spec.order == "sorted" else names
