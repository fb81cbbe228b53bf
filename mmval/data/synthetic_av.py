"""Small synthetic audio-visual raw data sets in the real ones' layouts (docs/data.md#raw-layouts).

Tests run `mmval prep <dataset> --raw DIR` on these instead of downloading gigabytes, so the
file names, containers, codecs and split lists copy the real distributions (Kinetics-Sounds as
CVDF Kinetics + OGM-GE lists, CREMA-D, AVE, UCF-101 split 1, VGGSound, MM-Debiased, MELD),
including their quirks (CRLF lists, unpadded start seconds in the OGM-GE test list, event windows
in AVE, quoted class names with commas in vggsound.csv, three id forms in MM-Debiased.json,
cp1252 punctuation kept as C1 characters in MELD's utterances).

Content: class c has a visual cue (a square of colour `class_rgb(c)` moving in direction
2*pi*c/n over noisy grey) and an audio cue (a tone at `tone_hz(c)` over noise). Per clip and
modality, the own class's cue is shown with probability visual_signal / audio_signal, else the
cue of a uniformly random class, so the two modalities differ in how informative they are and
the clips whose cue was swapped are known (RawClip.visual_cue / audio_cue). The same parameters
give byte-identical files: one numpy generator, bit-exact muxing (no encoder strings or
timestamps), single-threaded deterministic encoders (same PyAV/FFmpeg build assumed).
"""

from __future__ import annotations

import colorsys
import csv
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import av
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmval.atomic import atomic_path, write_atomic, write_text_atomic
from mmval.data.manifest import load_dataset_manifest
from mmval.errors import UserError
from mmval.overrides import apply_overrides
from mmval.validation import format_validation_error

Layout = Literal[
    "kinetics-sounds", "crema-d", "ave", "ucf101", "vggsound", "vggsound-mm-debiased", "meld"
]
LAYOUTS: tuple[str, ...] = get_args(Layout)

_AUDIO_CHUNK = 1024  # AAC frame size; PCM accepts any
_TONE_BASE_HZ = 300.0
_TONE_RATIO = 1.25
_TONE_MAX_FRACTION = 0.3  # of the sample rate: well below Nyquist and the AAC low-pass
_YTID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_YTID_LAST = "AEIMQUYcgkosw048"  # a real id's 11th character carries only 4 of its 6 bits
_KS_CLIP_SECONDS = 10  # CVDF stems say start + 10 whatever the file holds
_CREMAD_ACTORS = range(1001, 1092)
_CREMAD_SENTENCES = (
    "IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI",
)  # fmt: skip
# Only "It's eleven o'clock" (IEO) was recorded at several intensities; the rest are XX.
_CREMAD_TAKES = tuple(("IEO", level) for level in ("LO", "MD", "HI", "XX")) + tuple(
    (sentence, "XX") for sentence in _CREMAD_SENTENCES[1:]
)
_CREMAD_MIN_ACTORS = 6
_UCF_GROUPS = {"train": range(8, 26), "test": range(1, 8)}  # split 1
_MM_DEBIASED_SUBSETS = {"train": "training", "val": "validation", "test": "testing"}


class SyntheticAVParams(BaseModel):
    """What to generate; every field is part of the determinism contract."""

    model_config = ConfigDict(extra="forbid")
    layout: Layout
    classes: list[str] = Field(min_length=1, description="class names in label order")
    clips_per_class: int = Field(default=4, ge=1, description="per split of the layout")
    seconds: float = Field(default=3.0, gt=0)
    fps: int = Field(default=10, ge=1)
    size: tuple[int, int] = (64, 80)  # (height, width)
    sample_rate: int = Field(default=16000, ge=8000)
    visual_signal: float = Field(default=0.9, ge=0, le=1)
    audio_signal: float = Field(default=0.6, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _fits_layout(self) -> SyntheticAVParams:
        if len(set(self.classes)) != len(self.classes) or not all(self.classes):
            raise ValueError("classes must be distinct, non-empty names")
        if any(side < 16 or side % 2 for side in self.size):
            raise ValueError("size sides must be even and at least 16 (yuv420p, H.263)")
        forbidden = {
            "kinetics-sounds": "\r\n",
            "crema-d": "_, \t\r\n",
            "ave": "&\r\n",
            "ucf101": "/_ \t\r\n",
            "vggsound": "\r\n",
            "vggsound-mm-debiased": "\r\n",
            "meld": "\r\n",
        }[self.layout]
        bad = [name for name in self.classes if any(ch in forbidden for ch in name)]
        if bad:
            raise ValueError(f"{self.layout} class names cannot contain {forbidden!r}: {bad}")
        if self.layout == "ave" and self.seconds < 1:
            raise ValueError("ave needs seconds >= 1 (event windows are whole seconds)")
        takes = len(_CREMAD_ACTORS) * len(_CREMAD_TAKES)
        if self.layout == "crema-d" and 2 * self.clips_per_class > takes:
            raise ValueError(f"crema-d has at most {takes} distinct stems per emotion")
        return self


@dataclass
class RawClip:
    """One written clip, for tests to check against (paths are absolute)."""

    split: str
    label: int
    video: Path | None
    audio: Path | None
    clip_id: str  # as the layout's split list names it
    visual_cue: int  # class whose visual cue the clip shows (== label unless swapped)
    audio_cue: int | None  # None where the layout has no audio


@dataclass
class _Media:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    wave: np.ndarray  # [S] float32 in [-1, 1]
    visual_cue: int
    audio_cue: int


@dataclass(frozen=True)
class _Format:
    container: str
    video_codec: str | None = None
    audio_codec: str | None = None
    video_options: dict[str, str] = field(default_factory=dict)
    codec_tag: str | None = None


_MP4 = _Format("mp4", "libx264", "aac", {"crf": "23", "sc_threshold": "0"})
_FLV = _Format("flv", "flv")  # Sorenson H.263, as CREMA-D's VideoFlash
_AVI = _Format("avi", "mpeg4", codec_tag="XVID")  # UCF-101 files are Xvid
_WAV = _Format("wav", audio_codec="pcm_s16le")
# one thread: x264 output depends on the thread count, which would follow the machine
_REPRODUCIBLE = {"flags": "+bitexact", "threads": "1"}


def class_rgb(label: int, n_classes: int) -> tuple[int, int, int]:
    """Saturated colour of a class's square: hues spread evenly so classes stay apart."""
    r, g, b = colorsys.hsv_to_rgb(label / n_classes, 1.0, 1.0)
    return round(255 * r), round(255 * g), round(255 * b)


def tone_hz(label: int, n_classes: int, sample_rate: int) -> float:
    """Tone of a class: 300 Hz * 1.25^c, the ratio shrunk when many classes would pass 0.3 sr."""
    top = _TONE_MAX_FRACTION * sample_rate / _TONE_BASE_HZ
    ratio = _TONE_RATIO if n_classes == 1 else min(_TONE_RATIO, top ** (1 / (n_classes - 1)))
    return _TONE_BASE_HZ * ratio**label


def write_synthetic_raw(out: Path, params: SyntheticAVParams) -> list[RawClip]:
    """Write the raw files and split lists of `params.layout` under `out` (best new or empty:
    files of an earlier, different run are not removed); returns the clips written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    writer = _WRITERS[params.layout]
    return writer(out, params, np.random.default_rng(params.seed))


def _cue(rng: np.random.Generator, label: int, n_classes: int, signal: float) -> int:
    """The class whose cue a modality shows: the own one with probability `signal`."""
    return label if rng.random() < signal else int(rng.integers(n_classes))


def _in_window(t: np.ndarray, window: tuple[int, int] | None) -> np.ndarray:
    return np.ones(t.shape, bool) if window is None else (t >= window[0]) & (t < window[1])


def _render(
    p: SyntheticAVParams,
    rng: np.random.Generator,
    label: int,
    window: tuple[int, int] | None = None,
) -> _Media:
    """Frames and waveform of one clip; the cues appear only inside `window` (seconds)."""
    n = len(p.classes)
    visual_cue = _cue(rng, label, n, p.visual_signal)
    audio_cue = _cue(rng, label, n, p.audio_signal)
    h, w = p.size
    t = np.arange(max(1, round(p.seconds * p.fps))) / p.fps
    noise = rng.normal(0.0, 4.0, (len(t), h, w, 3))
    frames = np.clip(128.0 + noise, 0, 255).astype(np.uint8)
    side = max(min(h, w) // 4, 2)
    speed = min(h, w) / 2  # pixels per second, wrapping around the edges
    angle = 2 * math.pi * visual_cue / n
    y0, x0 = rng.integers(h), rng.integers(w)
    colour = class_rgb(visual_cue, n)
    for i in np.flatnonzero(_in_window(t, window)):
        rows = (y0 + round(speed * math.sin(angle) * t[i]) + np.arange(side)) % h
        cols = (x0 + round(speed * math.cos(angle) * t[i]) + np.arange(side)) % w
        frames[i][np.ix_(rows, cols)] = colour
    ts = np.arange(max(1, round(p.seconds * p.sample_rate))) / p.sample_rate
    tone = 0.3 * np.sin(2 * math.pi * tone_hz(audio_cue, n, p.sample_rate) * ts + rng.uniform(0, 6))
    wave = rng.normal(0.0, 0.05, len(ts)) + np.where(_in_window(ts, window), tone, 0.0)
    return _Media(frames, np.clip(wave, -1, 1).astype(np.float32), visual_cue, audio_cue)


def _write_media(path: Path, fmt: _Format, media: _Media, p: SyntheticAVParams) -> None:
    """Encode the streams `fmt` names into one file, bit-exact so reruns match byte for byte."""
    with (
        atomic_path(path) as tmp,
        av.open(
            str(tmp), "w", format=fmt.container, container_options={"fflags": "+bitexact"}
        ) as c,
    ):
        video = audio = None
        if fmt.video_codec is not None:
            options = {**fmt.video_options, **_REPRODUCIBLE}
            if fmt.video_codec == "libx264":  # one keyframe per clip, like real Kinetics cuts
                gop = str(max(250, len(media.frames)))
                # asm=0: x264's SIMD lookahead on AVX-512 machines gave run-to-run differences
                options |= {"g": gop, "keyint_min": gop, "x264-params": "asm=0"}
            video = c.add_stream(fmt.video_codec, rate=p.fps, options=options)
            video.height, video.width = p.size
            video.pix_fmt = "yuv420p"
            if fmt.codec_tag is not None:
                video.codec_tag = fmt.codec_tag
        if fmt.audio_codec is not None:
            audio = c.add_stream(fmt.audio_codec, rate=p.sample_rate, options=dict(_REPRODUCIBLE))
            audio.layout = "mono"
        if video is not None:
            for i, image in enumerate(media.frames):
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                frame.pts = i
                c.mux(video.encode(frame))
            c.mux(video.encode())
        if audio is not None:
            for start in range(0, len(media.wave), _AUDIO_CHUNK):
                chunk = media.wave[None, start : start + _AUDIO_CHUNK]
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = p.sample_rate, start
                c.mux(audio.encode(frame))
            c.mux(audio.encode())


def _write_lines(path: Path, lines: list[str], newline: str = "\n") -> None:
    data = "".join(line + newline for line in lines).encode()
    write_atomic(path, lambda tmp: tmp.write_bytes(data))


def _youtube_id(rng: np.random.Generator, used: set[str]) -> str:
    """A fresh 11-character id shaped like YouTube's (base64url, restricted last character)."""
    while True:
        head = "".join(_YTID_CHARS[i] for i in rng.integers(len(_YTID_CHARS), size=10))
        ytid = head + _YTID_LAST[int(rng.integers(len(_YTID_LAST)))]
        if ytid not in used:
            used.add(ytid)
            return ytid


def _kinetics_sounds(out: Path, p: SyntheticAVParams, rng: np.random.Generator) -> list[RawClip]:
    """CVDF Kinetics folders + annotation CSVs, with OGM-GE's my_train/my_test lists."""
    clips: list[RawClip] = []
    used: set[str] = set()
    lists: dict[str, list[str]] = {"train": [], "test": []}
    annotations: dict[str, list[tuple[str, str, int, int, str]]] = {"train": [], "val": []}
    for split, folder in (("train", "train"), ("test", "val")):
        for label, name in enumerate(p.classes):
            for _ in range(p.clips_per_class):
                ytid = _youtube_id(rng, used)
                start = int(rng.integers(0, 600))
                end = start + _KS_CLIP_SECONDS
                path = out / folder / f"{ytid}_{start:06d}_{end:06d}.mp4"
                media = _render(p, rng, label)
                _write_media(path, _MP4, media, p)
                clip_id = path.stem if split == "train" else f"{ytid}_{start}"
                lists[split].append(f"{clip_id},{_KS_CLIP_SECONDS},{label}")
                annotations[folder].append((name, ytid, start, end, folder))
                clips.append(
                    RawClip(split, label, path, path, clip_id, media.visual_cue, media.audio_cue)
                )
    (out / "annotations").mkdir(exist_ok=True)
    for folder, rows in annotations.items():
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
        writer.writerows(rows)
        write_text_atomic(out / "annotations" / f"{folder}.csv", text.getvalue())
    _write_lines(out / "my_train.txt", lists["train"], "\r\n")
    _write_lines(out / "my_test.txt", lists["test"], "\r\n")
    return clips


def _crema_d(out: Path, p: SyntheticAVParams, rng: np.random.Generator) -> list[RawClip]:
    """AudioWAV/ + VideoFlash/ per stem, OGM-GE's CRLF train.csv/test.csv.

    Clip k of every emotion (counted over both splits) comes from actor k mod A, so every actor
    used speaks every emotion and an actor-disjoint re-split keeps all classes on both sides.
    """
    n_actors = max(_CREMAD_MIN_ACTORS, math.ceil(2 * p.clips_per_class / len(_CREMAD_TAKES)))
    actors = sorted(int(a) for a in rng.choice(_CREMAD_ACTORS, n_actors, replace=False))
    # per emotion and actor, the order in which that actor's takes are used
    takes = rng.permuted(
        np.tile(np.arange(len(_CREMAD_TAKES)), (len(p.classes), n_actors, 1)), axis=2
    )
    clips: list[RawClip] = []
    for split_index, split in enumerate(("train", "test")):
        lines = []
        for label, emotion in enumerate(p.classes):
            for j in range(p.clips_per_class):
                k = split_index * p.clips_per_class + j
                sentence, level = _CREMAD_TAKES[takes[label, k % n_actors, k // n_actors]]
                stem = f"{actors[k % n_actors]}_{sentence}_{emotion}_{level}"
                media = _render(p, rng, label)
                video, audio = out / "VideoFlash" / f"{stem}.flv", out / "AudioWAV" / f"{stem}.wav"
                _write_media(video, _FLV, media, p)
                _write_media(audio, _WAV, media, p)
                lines.append(f"{stem},{emotion}")
                clips.append(
                    RawClip(split, label, video, audio, stem, media.visual_cue, media.audio_cue)
                )
        _write_lines(out / f"{split}.csv", lines, "\r\n")
    return clips


def _ave(out: Path, p: SyntheticAVParams, rng: np.random.Generator) -> list[RawClip]:
    """AVE_Dataset/AVE/{id}.mp4 with '&' split files; cues only inside [Start, End)."""
    root = out / "AVE_Dataset"
    used: set[str] = set()
    whole_seconds = math.floor(p.seconds)
    clips: list[RawClip] = []
    annotations = ["Category&VideoID&Quality&StartTime&EndTime"]
    for split in ("train", "val", "test"):
        lines = []
        for label, category in enumerate(p.classes):
            for _ in range(p.clips_per_class):
                video_id = _youtube_id(rng, used)
                start = int(rng.integers(0, whole_seconds))
                end = int(rng.integers(start + 1, whole_seconds + 1))
                path = root / "AVE" / f"{video_id}.mp4"
                media = _render(p, rng, label, (start, end))
                _write_media(path, _MP4, media, p)
                lines.append(f"{category}&{video_id}&good&{start}&{end}")
                clips.append(
                    RawClip(split, label, path, path, video_id, media.visual_cue, media.audio_cue)
                )
        _write_lines(root / f"{split}Set.txt", lines)
        annotations += lines
    _write_lines(root / "Annotations.txt", annotations)
    return clips


def _ucf101(out: Path, p: SyntheticAVParams, rng: np.random.Generator) -> list[RawClip]:
    """UCF-101/<Class>/v_*.avi (Xvid, no audio) + ucfTrainTestlist split 1, CRLF like the real."""
    lists = out / "ucfTrainTestlist"
    _write_lines(lists / "classInd.txt", [f"{i + 1} {c}" for i, c in enumerate(p.classes)], "\r\n")
    clips: list[RawClip] = []
    for split, groups in _UCF_GROUPS.items():
        lines = []
        for label, name in enumerate(p.classes):
            for k in range(p.clips_per_class):
                group, clip = groups[k % len(groups)], k // len(groups) + 1
                rel = f"{name}/v_{name}_g{group:02d}_c{clip:02d}.avi"
                media = _render(p, rng, label)
                _write_media(out / "UCF-101" / rel, _AVI, media, p)
                lines.append(f"{rel} {label + 1}" if split == "train" else rel)
                clips.append(
                    RawClip(split, label, out / "UCF-101" / rel, None, rel, media.visual_cue, None)
                )
        _write_lines(lists / f"{split}list01.txt", lines, "\r\n")
    return clips


def _vggsound(out: Path, p: SyntheticAVParams, rng: np.random.Generator) -> list[RawClip]:
    """video/{ytid}_{start:06d}.mp4 + vggsound.csv ("ytid,start,label,split", no header, sorted
    by YouTube id like the real one, names with commas quoted)."""
    clips: list[RawClip] = []
    used: set[str] = set()
    rows: list[tuple[str, int, str, str]] = []
    for split in ("train", "test"):
        for label, name in enumerate(p.classes):
            for _ in range(p.clips_per_class):
                ytid = _youtube_id(rng, used)
                start = int(rng.integers(0, 600))
                path = out / "video" / f"{ytid}_{start:06d}.mp4"
                media = _render(p, rng, label)
                _write_media(path, _MP4, media, p)
                rows.append((ytid, start, name, split))
                clip_id = f"{ytid}_{start}"  # the csv's columns 0 and 1, joined
                clips.append(
                    RawClip(split, label, path, path, clip_id, media.visual_cue, media.audio_cue)
                )
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(sorted(rows))
    write_text_atomic(out / "vggsound.csv", text.getvalue())
    return clips


def _vggsound_mm_debiased(
    out: Path, p: SyntheticAVParams, rng: np.random.Generator
) -> list[RawClip]:
    """MM-Debiased.json ({id: {subset, label}}, entries shuffled) over VGGSound clips
    (vggsound/{ytid}_{start:06d}_{end:06d}.mp4, id = stem) and Kinetics clips (CVDF
    kinetics/{ytid}_{start:06d}_{end:06d}.mp4, id "{ytid}_{start}" or, for some, "{ytid}")."""
    clips: list[RawClip] = []
    used: set[str] = set()
    entries: list[tuple[str, dict[str, str]]] = []
    for split, subset in _MM_DEBIASED_SUBSETS.items():
        for label, name in enumerate(p.classes):
            for _ in range(p.clips_per_class):
                kind = len(clips) % 3  # 0: VGGSound, 1: Kinetics, 2: Kinetics by bare id
                ytid = _youtube_id(rng, used)
                start = int(rng.integers(0, 600))
                stem = f"{ytid}_{start:06d}_{start + _KS_CLIP_SECONDS:06d}"
                path = out / ("vggsound" if kind == 0 else "kinetics") / f"{stem}.mp4"
                clip_id = (stem, f"{ytid}_{start}", ytid)[kind]
                media = _render(p, rng, label)
                _write_media(path, _MP4, media, p)
                entries.append((clip_id, {"subset": subset, "label": name}))
                clips.append(
                    RawClip(split, label, path, path, clip_id, media.visual_cue, media.audio_cue)
                )
    shuffled = dict(entries[i] for i in rng.permutation(len(entries)))
    write_text_atomic(out / "MM-Debiased.json", json.dumps(shuffled))
    return clips


_MELD_COLUMNS = [
    "Sr No.", "Utterance", "Speaker", "Emotion", "Sentiment", "Dialogue_ID", "Utterance_ID",
    "Season", "Episode", "StartTime", "EndTime",
]  # fmt: skip
# split -> (its csv, its clip folder), as MELD.Raw's archives unpack
_MELD_SPLITS = {
    "train": ("train/train_sent_emo.csv", "train/train_splits"),
    "val": ("dev_sent_emo.csv", "dev/dev_splits_complete"),
    "test": ("test_sent_emo.csv", "output_repeated_splits_test"),
}
_MELD_SPEAKERS = ("Chandler", "Joey", "Monica", "Phoebe", "Rachel", "Ross")


def meld_sentiment(emotion: str, k: int) -> str:
    """The Sentiment a fake MELD row gets: neutral and joy as in MELD, surprise positive or
    negative by turns (MELD has both), any other emotion negative."""
    if emotion == "surprise":
        return ("positive", "negative")[k % 2]
    return {"neutral": "neutral", "joy": "positive"}.get(emotion, "negative")


def _meld_time(seconds: float) -> str:
    whole = int(seconds)
    millis = round((seconds - whole) * 1000)
    return f"{whole // 3600:02d}:{whole // 60 % 60:02d}:{whole % 60:02d},{millis:03d}"


def _meld(out: Path, p: SyntheticAVParams, rng: np.random.Generator) -> list[RawClip]:
    """MELD.Raw: one *_sent_emo.csv per split (the official columns, quoted timestamps with
    commas, utterances naming their emotion with cp1252 "\x92"/"\x85" kept as characters)
    and the clips {folder}/dia{D}_utt{U}.mp4, two utterances per dialogue."""
    clips: list[RawClip] = []
    for split, (csv_path, folder) in _MELD_SPLITS.items():
        rows = []
        k = 0
        for label, emotion in enumerate(p.classes):
            for _ in range(p.clips_per_class):
                dialogue, utterance = k // 2, k % 2
                stem = f"dia{dialogue}_utt{utterance}"
                path = out / folder / f"{stem}.mp4"
                media = _render(p, rng, label)
                _write_media(path, _MP4, media, p)
                words = ("Oh", "I\x92m", "so", emotion, "right", "now\x85", "aren\x92t", "you?")
                start = float(rng.uniform(0, 1200))
                rows.append(
                    [
                        str(len(rows) + 1),
                        " ".join(words[: 4 + k % 5]) if k % 3 else ", ".join(words),
                        _MELD_SPEAKERS[k % len(_MELD_SPEAKERS)],
                        emotion,
                        meld_sentiment(emotion, k),
                        str(dialogue),
                        str(utterance),
                        str(1 + k % 9),
                        str(1 + k % 23),
                        _meld_time(start),
                        _meld_time(start + p.seconds),
                    ]
                )
                clips.append(
                    RawClip(split, label, path, path, stem, media.visual_cue, media.audio_cue)
                )
                k += 1
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(_MELD_COLUMNS)
        writer.writerows(rows)
        write_text_atomic(out / csv_path, text.getvalue())
    return clips


_WRITERS: dict[str, Callable[[Path, SyntheticAVParams, np.random.Generator], list[RawClip]]] = {
    "kinetics-sounds": _kinetics_sounds,
    "crema-d": _crema_d,
    "ave": _ave,
    "ucf101": _ucf101,
    "vggsound": _vggsound,
    "vggsound-mm-debiased": _vggsound_mm_debiased,
    "meld": _meld,
}


# UCF-101's and VGGSound's classes come from the raw folder, so their manifests list none
_DEFAULT_CLASSES = {
    "ucf101": ["ApplyEyeMakeup", "ApplyLipstick", "Archery", "BabyCrawling"],
    "vggsound": [
        "dog barking",
        "male speech, man speaking",
        "playing cello",
        "vehicle horn, car horn, honking",
    ],
}


def layout_params(
    layout: str, *, clips: int, seed: int, overrides: Sequence[str] = ()
) -> SyntheticAVParams:
    """Settings for `mmval prep synthetic-av`: the first four classes of the data set's
    manifest, then the user's `--set` overrides, validated; mistakes are UserErrors."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout must be one of {', '.join(LAYOUTS)}, not {layout!r}.")
    classes = load_dataset_manifest(layout)[0].classes or _DEFAULT_CLASSES[layout]
    raw = apply_overrides(
        {"layout": layout, "classes": classes[:4], "clips_per_class": clips, "seed": seed},
        overrides,
    )
    try:
        return SyntheticAVParams.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, "synthetic-av settings", raw)) from None
