"""Synthetic raw AV data sets: real layouts, decodable media, the promised cues, determinism."""

from __future__ import annotations

import csv
import itertools
import re
from pathlib import Path

import av
import numpy as np
import pytest
from pydantic import ValidationError

from mmval.data.synthetic_av import (
    LAYOUTS,
    RawClip,
    SyntheticAVParams,
    class_rgb,
    tone_hz,
    write_synthetic_raw,
)

CLASSES = {
    "kinetics-sounds": ["playing drums", "singing", "dog barking"],
    "crema-d": ["NEU", "HAP", "SAD"],
    "ave": ["Church bell", "Male speech, man speaking"],
    "ucf101": ["ApplyEyeMakeup", "Archery"],
    "vggsound": ["male speech, man speaking", "playing cello"],
    "vggsound-mm-debiased": ["bowling", "lawn mowing"],
    "meld": ["neutral", "joy"],
}
SPLITS = {
    "kinetics-sounds": 2,
    "crema-d": 2,
    "ave": 3,
    "ucf101": 2,
    "vggsound": 2,
    "vggsound-mm-debiased": 3,
    "meld": 3,
}
SECONDS, FPS, SIZE, RATE = 2.0, 10, (32, 48), 16000
YTID = r"[A-Za-z0-9_-]{11}"


def _params(layout: str, **changes: object) -> SyntheticAVParams:
    base = dict(
        layout=layout,
        classes=CLASSES[layout],
        clips_per_class=2,
        seconds=SECONDS,
        fps=FPS,
        size=SIZE,
        sample_rate=RATE,
        visual_signal=1.0,
        audio_signal=1.0,
    )
    return SyntheticAVParams.model_validate(base | changes)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[RawClip]]]:
    """Each layout written once with both modalities fully informative."""
    result = {}
    for layout in LAYOUTS:
        out = tmp_path_factory.mktemp(layout)
        result[layout] = out, write_synthetic_raw(out, _params(layout))
    return result


def _lines(path: Path, newline: str) -> list[str]:
    """Lines of a list file, checking that every line ends with `newline`."""
    data = path.read_bytes().decode()
    assert data.endswith(newline)
    lines = data[: -len(newline)].split(newline)
    assert not any("\r" in line or "\n" in line for line in lines), f"mixed line ends in {path}"
    return lines


def _frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def _wave(path: Path) -> np.ndarray:
    """Mono float waveform in [-1, 1]."""
    with av.open(str(path)) as c:
        x = np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)[0]
    return x / 32768 if x.dtype == np.int16 else x


def _colour_class(frame: np.ndarray, n_classes: int) -> int | None:
    """Class whose colour the saturated pixels have; None if the frame is plain grey."""
    saturated = (frame.max(-1).astype(int) - frame.min(-1)) > 100
    if saturated.sum() < 4:
        return None
    colour = np.median(frame[saturated], axis=0)
    distances = [np.linalg.norm(colour - class_rgb(c, n_classes)) for c in range(n_classes)]
    return int(np.argmin(distances))


def _peak_hz(wave: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / RATE)[spectrum.argmax()])


def _ave_windows(out: Path) -> dict[str, tuple[int, int]]:
    lines = _lines(out / "AVE_Dataset" / "Annotations.txt", "\n")[1:]
    return {f[1]: (int(f[3]), int(f[4])) for f in (line.split("&") for line in lines)}


def test_returned_clips(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    for layout, (_, clips) in written.items():
        n = len(CLASSES[layout])
        assert len(clips) == n * 2 * SPLITS[layout]
        assert len({(c.split, c.clip_id) for c in clips}) == len(clips)
        for split in ("train", "test"):
            labels = sorted(c.label for c in clips if c.split == split)
            assert labels == sorted(list(range(n)) * 2)
        assert all(c.visual_cue == c.label for c in clips)
        assert all(c.audio_cue == (None if layout == "ucf101" else c.label) for c in clips)


def test_kinetics_sounds_layout(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    out, clips = written["kinetics-sounds"]
    classes = CLASSES["kinetics-sounds"]
    train_lines = _lines(out / "my_train.txt", "\r\n")
    test_lines = _lines(out / "my_test.txt", "\r\n")
    train = [re.fullmatch(rf"({YTID})_(\d{{6}})_(\d{{6}}),10,(\d+)", line) for line in train_lines]
    test = [re.fullmatch(rf"({YTID})_(\d+),10,(\d+)", line) for line in test_lines]
    assert all(train) and all(test)
    expected = {}
    for m in train:
        assert int(m[3]) == int(m[2]) + 10
        assert (out / "train" / f"{m[1]}_{m[2]}_{m[3]}.mp4").is_file()
        expected[("train", m[1], int(m[2]))] = classes[int(m[4])]
    for m in test:
        assert m[2] == str(int(m[2]))  # the real test list does not pad the start
        start = int(m[2])
        assert (out / "val" / f"{m[1]}_{start:06d}_{start + 10:06d}.mp4").is_file()
        expected[("val", m[1], start)] = classes[int(m[3])]
    rows = {}
    for folder in ("train", "val"):
        with open(out / "annotations" / f"{folder}.csv", newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == ["label", "youtube_id", "time_start", "time_end", "split"]
            for label, ytid, start, end, split in reader:
                assert split == folder and int(end) == int(start) + 10
                rows[(folder, ytid, int(start))] = label
    assert rows == expected
    assert {c.clip_id for c in clips} == {m[0].rsplit(",", 2)[0] for m in train + test}
    assert all(c.video == c.audio and c.video.suffix == ".mp4" for c in clips)


def test_crema_d_layout(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    out, clips = written["crema-d"]
    sentences = {"IEO", "TIE", "IOM", "IWW", "TAI", "MTI", "IWL", "ITH", "DFA", "ITS", "TSI", "WSI"}
    stems = []
    for split in ("train", "test"):
        for line in _lines(out / f"{split}.csv", "\r\n"):
            m = re.fullmatch(r"((\d{4})_([A-Z]{3})_([A-Z]{3})_(LO|MD|HI|XX)),([A-Z]{3})", line)
            assert m, line
            assert 1001 <= int(m[2]) <= 1091 and m[3] in sentences and m[4] == m[6]
            assert m[4] in CLASSES["crema-d"]
            assert (out / "AudioWAV" / f"{m[1]}.wav").is_file()
            assert (out / "VideoFlash" / f"{m[1]}.flv").is_file()
            stems.append(m[1])
    assert len(set(stems)) == len(stems) == len(clips)
    actors_of = {e: {s[:4] for s in stems if s.split("_")[2] == e} for e in CLASSES["crema-d"]}
    assert all(len(actors) >= 2 for actors in actors_of.values())  # actor-disjoint split possible
    assert len(set.union(*actors_of.values())) >= 4


def test_ave_layout(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    out, clips = written["ave"]
    root = out / "AVE_Dataset"
    everything = []
    for split in ("train", "val", "test"):
        lines = _lines(root / f"{split}Set.txt", "\n")
        for line in lines:
            m = re.fullmatch(rf"([^&]+)&({YTID})&good&(\d+)&(\d+)", line)
            assert m and m[1] in CLASSES["ave"], line
            assert 0 <= int(m[3]) < int(m[4]) <= SECONDS
            assert (root / "AVE" / f"{m[2]}.mp4").is_file()
        everything += lines
    annotations = _lines(root / "Annotations.txt", "\n")
    assert annotations == ["Category&VideoID&Quality&StartTime&EndTime", *everything]
    assert [c.clip_id for c in clips] == [line.split("&")[1] for line in everything]


def test_ucf101_layout(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    out, clips = written["ucf101"]
    lists = out / "ucfTrainTestlist"
    classes = CLASSES["ucf101"]
    assert _lines(lists / "classInd.txt", "\r\n") == [f"{i + 1} {c}" for i, c in enumerate(classes)]
    ids = []
    for split, groups in (("train", range(8, 26)), ("test", range(1, 8))):
        for line in _lines(lists / f"{split}list01.txt", "\r\n"):
            label = r" (\d+)" if split == "train" else ""
            m = re.fullmatch(rf"((\w+)/v_(\w+)_g(\d\d)_c(\d\d)\.avi){label}", line)
            assert m and m[2] == m[3] and int(m[4]) in groups, line
            if split == "train":
                assert classes[int(m[6]) - 1] == m[2]
            assert (out / "UCF-101" / m[1]).is_file()
            ids.append(m[1])
    assert [c.clip_id for c in clips] == ids
    assert all(c.audio is None for c in clips)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_media_decode_with_class_cues(
    written: dict[str, tuple[Path, list[RawClip]]], layout: str
) -> None:
    """Durations are right; a frame shows the class colour and the audio peaks at its tone."""
    out, clips = written[layout]
    n = len(CLASSES[layout])
    windows = _ave_windows(out) if layout == "ave" else {}
    for clip in clips:
        start, end = windows.get(clip.clip_id, (0, SECONDS))
        with av.open(str(clip.video)) as c:
            assert len(c.streams.video) == 1
            assert len(c.streams.audio) == (1 if clip.audio == clip.video else 0)
            assert c.duration / 1e6 == pytest.approx(SECONDS, abs=0.15)
        frames = _frames(clip.video)
        assert len(frames) == SECONDS * FPS and frames[0].shape == (*SIZE, 3)
        assert _colour_class(frames[int((start + end) / 2 * FPS)], n) == clip.label
        if clip.audio is None:
            continue
        wave = _wave(clip.audio)
        assert len(wave) / RATE == pytest.approx(SECONDS, abs=0.1)
        inside = wave[int(start * RATE) : int(end * RATE)]
        assert _peak_hz(inside) == pytest.approx(tone_hz(clip.label, n, RATE), rel=0.01)


def test_crema_d_wav_is_16k_mono_pcm(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    _, clips = written["crema-d"]
    with av.open(str(clips[0].audio)) as c:
        stream = c.streams.audio[0]
        assert (c.format.name, stream.codec_context.name) == ("wav", "pcm_s16le")
        assert (stream.rate, stream.channels) == (16000, 1)
    with av.open(str(clips[0].video)) as c:
        assert (c.format.name, c.streams.video[0].codec_context.name) == ("flv", "flv")


def test_ave_cues_only_inside_event(written: dict[str, tuple[Path, list[RawClip]]]) -> None:
    out, clips = written["ave"]
    windows = _ave_windows(out)
    checked = 0
    for clip in clips:
        start, end = windows[clip.clip_id]
        frames, wave = _frames(clip.video), _wave(clip.audio)
        for i, frame in enumerate(frames):
            assert (_colour_class(frame, 2) is None) == (not start <= i / FPS < end)
        margin = int(0.1 * RATE)
        inside = wave[start * RATE + margin : end * RATE - margin]
        before, after = wave[: max(start * RATE - margin, 0)], wave[end * RATE + margin :]
        outside = np.concatenate([before, after])
        assert np.sqrt(np.mean(inside**2)) > 0.15
        if len(outside):
            assert np.sqrt(np.mean(outside**2)) < 0.08
            checked += 1
    assert checked  # some event was shorter than the clip


def test_uninformative_cues_are_recorded(tmp_path: Path) -> None:
    """With signal 0 the cues are random classes, and RawClip says which ones were shown."""
    clips = write_synthetic_raw(tmp_path, _params("crema-d", visual_signal=0.0, audio_signal=0.0))
    assert any(c.visual_cue != c.label for c in clips)
    assert any(c.audio_cue != c.label for c in clips)
    for clip in clips:
        assert _colour_class(_frames(clip.video)[0], 3) == clip.visual_cue
        assert _peak_hz(_wave(clip.audio)) == pytest.approx(tone_hz(clip.audio_cue, 3, RATE), 0.01)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_byte_deterministic(
    written: dict[str, tuple[Path, list[RawClip]]], layout: str, tmp_path: Path
) -> None:
    first, _ = written[layout]
    write_synthetic_raw(tmp_path, _params(layout))
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (first / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_params_are_checked() -> None:
    with pytest.raises(ValueError, match="class names"):
        _params("ucf101", classes=["Apply Eye Makeup", "Archery"])
    with pytest.raises(ValueError, match="class names"):
        _params("crema-d", classes=["NEU_1", "HAP"])
    with pytest.raises(ValueError, match="even"):
        _params("ave", size=(33, 48))
    with pytest.raises(ValidationError):
        _params("ave", colour="red")


def test_tones_and_colours_stay_apart() -> None:
    """Many classes (31 in Kinetics-Sounds) still get distinct, well-sampled cues."""
    tones = [tone_hz(c, 31, RATE) for c in range(31)]
    assert tones[0] == 300 and tones[-1] <= 0.3 * RATE + 1e-6
    assert min(b / a for a, b in itertools.pairwise(tones)) > 1.05
    assert len({class_rgb(c, 31) for c in range(31)}) == 31
    assert tone_hz(3, 6, RATE) == pytest.approx(300 * 1.25**3)
