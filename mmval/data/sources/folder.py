"""Your own files: `mmval prep folder --raw DIR --labels FILE` (clips, sounds, images, or
image-text posts listed in a CSV, TSV or JSONL file), extracted as the built-in data sets are.

The labels file has a `path` column (relative to --raw), a `label` column and optionally `split`
(train/val/test) and `id` (default: the path); or, for image-text, `image`, `text` and `label`
(and optional `split`, `id`). The plan is the one `av_clips` and `image_text` build from their
raw layouts, here read from the labels file, and extraction is theirs unchanged
(`extract_clip`, `extract_post`, `image_frames`): the same file gives the same tensors as in a
built-in data set with the same parameters.

The first rows' files decide the modalities (`media: auto`): a video with a sound track gives
frames and a filterbank (Kinetics-Sounds' extraction), a silent video frames (+ optical flow
with `flow: true`, UCF-101's), a sound file a filterbank, an image file an image (the image-text
sets' form). They must agree (else exit 2, or choose with `--set media=...`); a later file that
cannot give those modalities (a silent clip among clips with sound, an image among clips) is an
error of errors.parquet, as a broken file is. Without a split column, each class is cut into
`split.ratios` after a seeded permutation [ours].
"""

from __future__ import annotations

import csv
import functools
import json
import multiprocessing
import posixpath
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmval.data.extract import ExtractionError
from mmval.data.extract.video import open_media
from mmval.data.manifest import DatasetManifest
from mmval.data.pipeline import ClipTask, PrepPlan
from mmval.data.shards import ROWS_PER_SHARD, SampleRecord, sha256_file
from mmval.data.sources.av_clips import (
    AVParams,
    FbankParams,
    FlowParams,
    FramesParams,
    extract_clip,
    modality_spec,
)
from mmval.data.sources.base import SPLITS, SplitShares, stratified_fractions
from mmval.data.sources.image_text import (
    ImageParams,
    ImageTextParams,
    Post,
    TextParams,
    image_frames,
    image_modality,
    plan_posts,
)
from mmval.errors import UserError

Media = Literal["video+audio", "video", "audio", "image"]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp"}
AUDIO_SUFFIXES = {".wav", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".wma"}
DECIDING_ROWS = 5  # the first readable files that decide the modalities
_DESCRIBE = {
    "video+audio": "a video with sound",
    "video": "a video without sound",
    "audio": "a sound file",
    "image": "an image",
}
_PLURAL = {
    "video+audio": "videos with sound",
    "video": "videos",
    "audio": "sound files",
    "image": "images",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FolderParams(_Strict):
    labels: str = Field(description="the labels file, CSV/TSV/JSONL (set by --labels)")
    name: str | None = Field(
        default=None, description="the prepared data set's name [default: the --out folder's]"
    )
    media: Literal["auto", "video+audio", "video", "audio", "image"] = Field(
        default="auto", description="auto: what the first rows' files are"
    )
    frames: FramesParams = Field(default_factory=FramesParams, description="of videos")
    fbank: FbankParams = Field(default_factory=FbankParams, description="of sound")
    flow: bool = Field(default=False, description="also optical flow of videos")
    flow_params: FlowParams = Field(default_factory=FlowParams, description="with flow: true")
    image: ImageParams = Field(default_factory=ImageParams, description="of images")
    text: TextParams = Field(default_factory=TextParams, description="of image-text posts")
    split: SplitShares = Field(default_factory=SplitShares, description="without a split column")
    rows_per_shard: int = Field(default=ROWS_PER_SHARD, ge=1)
    min_seconds: float = Field(default=0.5, description="shorter clips are errors")

    @model_validator(mode="after")
    def _labels_file(self) -> FolderParams:
        if not Path(self.labels).is_file():
            raise ValueError(f"no labels file {self.labels}")
        return self


# ---------------------------------------------------------------------------- labels file
@dataclass
class _Row:
    line: int  # in the labels file, for messages
    sample_id: str
    label: str
    path: str  # raw-relative: the file, or the post's image
    text: str | None
    split: str | None


def _records(path: Path) -> tuple[list[tuple[int, dict[str, str]]], list[str]]:
    """(line, {column: cell}) per row and the columns of the first row (CSV: the header)."""
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"labels file {path} is not UTF-8 text: {exc}") from None
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for line, content in enumerate(text.splitlines(), 1):
            if not content.strip():
                continue
            try:
                entry = json.loads(content)
            except json.JSONDecodeError as exc:
                raise UserError(f"labels file {path} line {line} is not JSON: {exc}") from None
            if not isinstance(entry, dict):
                raise UserError(f"labels file {path} line {line} is not a JSON object.")
            rows.append((line, {str(k): "" if v is None else str(v) for k, v in entry.items()}))
        return rows, list(rows[0][1]) if rows else []
    if suffix not in (".csv", ".tsv"):
        raise UserError(f"labels file {path}: write it as .csv, .tsv or .jsonl, not {suffix!r}.")
    reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
    columns = [c.strip() for c in reader.fieldnames or []]
    reader.fieldnames = columns
    rows = []
    for entry in reader:
        if None in entry:
            raise UserError(
                f"labels file {path} line {reader.line_num} has more cells than the header."
            )
        if any((v or "").strip() for v in entry.values()):
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in entry.items()}))
    return rows, columns


def _inside(path: str, where: str) -> str:
    """`path` normalised, refused when it is absolute or leaves the raw folder."""
    norm = posixpath.normpath(path.replace("\\", "/"))
    if posixpath.isabs(norm) or norm == ".." or norm.startswith("../"):
        raise UserError(f"{where}: {path!r} is not a path inside --raw (write it relative to it).")
    return norm


def read_labels(path: Path) -> tuple[list[_Row], bool]:
    """The rows of the labels file and whether they are image-text posts; every mistake in the
    file is a UserError naming its line."""
    records, columns = _records(path)
    if not records:
        raise UserError(f"labels file {path} lists no rows.")
    posts = "text" in columns
    needed = ["image", "text", "label"] if posts else ["path", "label"]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise UserError(
            f"labels file {path} has no column {', '.join(missing)} (it has {', '.join(columns)})"
            ": files need `path` and `label`, image-text posts `image`, `text` and `label`; "
            "`split` and `id` are optional."
        )
    has_split, has_id = "split" in columns, "id" in columns
    rows: list[_Row] = []
    seen: dict[str, int] = {}
    for line, entry in records:
        where = f"labels file {path} line {line}"
        for column in [*needed, *(["split"] if has_split else []), *(["id"] if has_id else [])]:
            if column != "text" and not entry.get(column, "").strip():
                raise UserError(f"{where} has no {column}.")
        file = _inside(entry["image" if posts else "path"].strip(), where)
        split = entry["split"].strip() if has_split else None
        if split is not None and split not in SPLITS:
            raise UserError(f"{where}: split {split!r} is not one of {', '.join(SPLITS)}.")
        sample_id = entry["id"].strip() if has_id else file
        if sample_id in seen:
            raise UserError(
                f"{where}: id {sample_id!r} is already on line {seen[sample_id]}"
                + ("" if has_id else " (the same file twice; add an id column)")
                + "."
            )
        seen[sample_id] = line
        text = entry.get("text", "") if posts else None
        rows.append(_Row(line, sample_id, entry["label"].strip(), file, text, split))
    return rows, posts


def class_names(labels: list[str]) -> list[str]:
    """The distinct labels sorted: as numbers when all are integers (so 0..C-1 keep their
    index), else as text."""
    names = set(labels)
    try:
        return sorted(names, key=int)
    except ValueError:
        return sorted(names)


def _split(rows: list[_Row], index: dict[str, int], params: FolderParams) -> dict[str, list[_Row]]:
    if rows[0].split is not None:
        return {name: [r for r in rows if r.split == name] for name in SPLITS}
    shares = params.split.fractions()
    parts = stratified_fractions(
        [r.sample_id for r in rows],
        [index[r.label] for r in rows],
        {name: share for name, share in shares.items() if share > 0},
        params.split.seed,
    )
    by_id = {r.sample_id: r for r in rows}
    return {name: [by_id[k] for k in keys] for name, keys in parts.items()}


# ------------------------------------------------------------------------- what a file is
def file_kind(path: Path) -> Media:
    """Images and sound files by their suffix; any other file by its streams (a cover picture
    attached to a sound file is not a video)."""
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return "image"
    if suffix in AUDIO_SUFFIXES:
        return "audio"
    with open_media(path) as container:
        attached = 1024  # AV_DISPOSITION_ATTACHED_PIC
        video = any(not s.disposition & attached for s in container.streams.video)
        audio = bool(container.streams.audio)
    if video:
        return "video+audio" if audio else "video"
    if audio:
        return "audio"
    raise ExtractionError("neither a video nor a sound stream")


def _kind_or_reason(path: str) -> str:
    try:
        return file_kind(Path(path))
    except ExtractionError as exc:
        return f"unreadable: {exc}"


def _gives(kind: Media, media: Media) -> bool:
    """Whether a file of `kind` has what a data set of `media` extracts from it."""
    if media == "video":
        return kind in ("video", "video+audio")
    if media == "audio":
        return kind in ("audio", "video+audio")
    return kind == media


def _decide(rows: list[_Row], raw: Path, labels: Path) -> Media:
    """What the first readable files are (read in a child process: the parent must decode
    nothing before the extraction workers are forked); they must agree."""
    first = [r for r in rows if (raw / r.path).is_file()][:DECIDING_ROWS]
    if not first:
        raise UserError(f"none of the files listed in {labels} was found under {raw}.")
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        kinds = list(pool.map(_kind_or_reason, [str(raw / r.path) for r in first]))
    found = [(r, k) for r, k in zip(first, kinds, strict=True) if k in _DESCRIBE]
    if not found:
        reasons = "; ".join(f"{r.path}: {k}" for r, k in zip(first, kinds, strict=True))
        raise UserError(f"the first files listed in {labels} cannot be read ({reasons}).")
    if len({k for _, k in found}) > 1:
        listed = ", ".join(f"line {r.line} {r.path} ({_DESCRIBE[k]})" for r, k in found)
        raise UserError(
            f"the first files listed in {labels} give different modalities: {listed}. All files "
            "of a data set must give the same ones; list them in separate labels files, or "
            "choose with --set media=video+audio|video|audio|image."
        )
    return cast(Media, found[0][1])


# ------------------------------------------------------------------------------ extraction
def extract_file(
    media: Media, clip: AVParams | None, image: ImageParams, task: ClipTask
) -> SampleRecord:
    """Check that the file gives the data set's modalities, then extract them as the built-in
    data sets do."""
    path = Path(next(iter(task.files.values())))
    kind = file_kind(path)
    if not _gives(kind, media):
        raise ExtractionError(
            f"{_DESCRIBE[kind]}, in a data set of {_PLURAL[media]} (set by its first rows)"
        )
    if clip is None:
        frames = image_frames(image, path)
        return SampleRecord(
            task.sample_id, task.label, task.source, {image.name: frames}, {image.name: [0.0]}
        )
    return extract_clip(clip, task)


def _clip_params(media: Media, params: FolderParams) -> AVParams:
    modalities: list = []
    if media in ("video+audio", "video"):
        modalities.append(params.frames)
    if media in ("video+audio", "audio"):
        modalities.append(params.fbank)
    if params.flow:
        modalities.append(params.flow_params)
    names = [m.name for m in modalities]
    if len(set(names)) < len(names):
        raise UserError(f"the modalities of a folder data set need distinct names, not {names}.")
    return AVParams(
        modalities=modalities,
        rows_per_shard=params.rows_per_shard,
        min_seconds=params.min_seconds,
    )


class FolderSource:
    name: ClassVar[str] = "folder"
    needs_raw: ClassVar[bool] = True
    Params: ClassVar[type[BaseModel]] = FolderParams

    def input_files(self, params: FolderParams) -> dict[str, object]:
        """The labels file's path and sha256 (recorded in the settings: an edited labels file
        is another data set, not one to resume)."""
        return {"labels": {"path": params.labels, "sha256": sha256_file(Path(params.labels))}}

    def plan(
        self,
        manifest: DatasetManifest,
        params: FolderParams,
        raw: Path,
        *,
        limit: int | None = None,
        only_splits: list[str] | None = None,
    ) -> PrepPlan:
        labels = Path(params.labels)
        rows, posts = read_labels(labels)
        classes = class_names([r.label for r in rows])
        index = {name: i for i, name in enumerate(classes)}
        splits = {name: items for name, items in _split(rows, index, params).items() if items}
        if posts:
            as_posts = {
                name: [Post(r.sample_id, r.label, r.text or "", r.path, name) for r in items]
                for name, items in splits.items()
            }
            text_params = ImageTextParams(
                image=params.image, text=params.text, rows_per_shard=params.rows_per_shard
            )
            plan = plan_posts(
                labels.name, classes, as_posts, text_params, raw, [], limit, only_splits
            )
            plan.extraction |= {"media": "image+text"}
            return plan
        if params.media != "auto":
            media: Media = params.media
        else:
            media = _decide(rows, raw, labels)
        if params.flow and media not in ("video+audio", "video"):
            raise UserError(f"flow: true needs videos; the files of {labels} are {media}.")
        clip = None if media == "image" else _clip_params(media, params)
        if only_splits is not None:
            unknown = sorted(set(only_splits) - set(splits))
            if unknown:
                raise UserError(
                    f"--splits: {labels} has no split(s) {unknown}; it has {sorted(splits)}."
                )
            splits = {name: items for name, items in splits.items() if name in only_splits}
        roles = {"video+audio": ("video", "audio"), "video": ("video",), "audio": ("audio",)}
        tasks: dict[str, list[ClipTask]] = {}
        errors: list[tuple[str, str]] = []
        for name, items in splits.items():
            tasks[name] = []
            for row in sorted(items, key=lambda r: r.sample_id)[:limit]:
                file = raw / row.path
                if not file.is_file():
                    errors.append((row.path, "file not found"))
                    continue
                files = {role: str(file) for role in roles.get(media, ("image",))}
                tasks[name].append(ClipTask(row.sample_id, index[row.label], row.path, files))
        modalities = (
            [image_modality(params.image)]
            if clip is None
            else [modality_spec(m) for m in clip.modalities]
        )
        return PrepPlan(
            classes=classes,
            modalities=modalities,
            extraction={"media": media},
            splits=tasks,
            extractor=functools.partial(extract_file, media, clip, params.image),
            rows_per_shard=params.rows_per_shard,
            errors=errors,
        )
