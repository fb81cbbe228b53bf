"""`mmval prep vggsound` / `vggsound-mm-debiased` on fake raw folders in the real layouts."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mmval.cli.main import app
from pydantic import ValidationError
from typer.testing import CliRunner

from mmval.data.dataset import ParquetSamples
from mmval.data.extract.audio import read_audio, stft_spectrogram
from mmval.data.extract.video import decode_jpeg
from mmval.data.manifest import load_dataset_manifest
from mmval.data.shards import DataManifest, load_manifest
from mmval.data.sources.av_clips import (
    AVClipsSource,
    AVParams,
    ListSpec,
    SplitSpec,
    StftParams,
    _list_split,
)
from mmval.data.synthetic_av import (
    RawClip,
    SyntheticAVParams,
    layout_params,
    write_synthetic_raw,
)
from mmval.errors import UserError
from tests.test_prep_av import SMALL, frames_at

runner = CliRunner()
# real VGGSound names, two with commas (quoted in vggsound.csv); not in sorted order
CLASSES = ["playing cello", "male speech, man speaking", "dog barking", "race car, auto racing"]
RATE = 16000
SUBSETS = {"train": "training", "val": "validation", "test": "testing"}


def ogm_ge_vggsound_audio(wave: np.ndarray, start_s: float) -> np.ndarray:
    """Independent reference, written like OGM-GE's VGGSoundDataset with the random crop start
    fixed: double the wave until it lasts 10 s, 5 s from `start_s`, clip, STFT (256, hop 128;
    librosa's centred zero padding, periodic Hann), log(|S| + 1e-7); float64 numpy."""
    x = np.asarray(wave, np.float64)
    while len(x) / RATE < 10:
        x = np.tile(x, 2)
    first = round(start_s * RATE)
    x = np.pad(np.clip(x[first : first + 5 * RATE], -1, 1), 128)
    frames = x[np.arange(256)[None] + 128 * np.arange(1 + (len(x) - 256) // 128)[:, None]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(256) / 256)
    return np.log(np.abs(np.fft.rfft(frames * window, axis=1)).T + 1e-7)


def gewu_tool_audio(wave: np.ndarray, rate: int) -> np.ndarray:
    """Independent reference, written like GeWu-Lab/AV_preprocess_tool's `audio_extract`:
    `wav_fixed(wav, 10, sr)` (append the last partial second, or the last second, while the
    wave is at most 10 s long, then cut at 10 s), then |STFT| (n_fft 512, hop 440, periodic
    Hann, centred with reflect padding), no log; float64 numpy."""
    x = np.asarray(wave, np.float64)
    dst = 10 * rate
    end = len(x)
    start = end - len(x) % rate
    if start == end:
        start = end - rate
    while len(x) <= dst:
        x = np.concatenate([x, x[start:end]])
    x = np.pad(x[:dst], 256, mode="reflect")
    frames = x[np.arange(512)[None] + 440 * np.arange(1 + (len(x) - 512) // 440)[:, None]]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(512) / 512)
    return np.abs(np.fft.rfft(frames * window, axis=1)).T


def check_shards(out: Path, clips: dict[str, RawClip], names: list[str]) -> DataManifest:
    """Every split's shapes, dtypes and labels (by class name), no errors, and a stored frame
    equal to the source frame at its timestamp; returns the manifest."""
    manifest = load_manifest(out)
    assert pq.read_table(out / "errors.parquet").num_rows == 0
    modalities = [m.name for m in manifest.modalities]
    for split in manifest.splits:
        data = ParquetSamples(out, split, modalities)
        batch = data.__getitems__(list(range(len(data))))
        for spec in manifest.modalities:
            x = batch.inputs[spec.name]
            assert list(x.shape[1:]) == spec.shape and str(x.dtype).endswith(spec.dtype)
        for i, sample_id in enumerate(data.sample_ids):
            clip = clips[sample_id]
            assert clip.split == split or (split, clip.split) == ("val", "train")
            assert manifest.classes[batch.label[i].item()] == names[clip.label]
    row = pq.read_table(out / manifest.splits["test"].shards[0].path).slice(0, 1).to_pylist()[0]
    stored = decode_jpeg(row["visual"])
    reference = frames_at(clips[row["sample_id"]].video, row["visual_t"], SMALL)
    assert len(stored) == len(reference) == 2  # 1 fps over 2 s
    for got, want in zip(stored, reference, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 6  # JPEG q90 noise only
    return manifest


def test_prep_vggsound(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    params = SyntheticAVParams(layout="vggsound", classes=CLASSES, clips_per_class=2, seconds=2.0)
    written = write_synthetic_raw(raw, params)
    text = (raw / "vggsound.csv").read_text()
    assert '"male speech, man speaking"' in text and not text.startswith("ytid")
    rows = list(csv.reader(text.splitlines()))
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert {(r[0], r[2], r[3]) for r in rows} == {
        (c.clip_id[:11], CLASSES[c.label], c.split) for c in written
    }
    assert all(c.video.name == f"{c.clip_id[:11]}_{int(c.clip_id[12:]):06d}.mp4" for c in written)
    # other distributions' names (unpadded start; start and end) in another folder
    for clip, end in ((written[0], None), (written[-1], 10)):
        ytid, start = clip.clip_id[:11], int(clip.clip_id[12:])
        stem = f"{ytid}_{start}" if end is None else f"{ytid}_{start:06d}_{start + end:06d}"
        (raw / "test-videos").mkdir(exist_ok=True)
        clip.video = clip.audio = clip.video.replace(raw / "test-videos" / f"{stem}.mp4")
    out = tmp_path / "out"
    sets = ["--set", f"modalities.0.size=[{SMALL},{SMALL}]", "--set", "rows_per_shard=4"]
    result = runner.invoke(
        app, ["prep", "vggsound", "--raw", str(raw), "--out", str(out), "--workers", "1", *sets]
    )
    assert result.exit_code == 0, result.output
    clips = {c.clip_id: c for c in written}
    manifest = check_shards(out, clips, CLASSES)
    assert manifest.classes == sorted(CLASSES)
    counts = {name: split.samples for name, split in manifest.splits.items()}
    assert counts == {"train": 4, "val": 4, "test": 8}  # val: 1 of each class's 2 train clips
    assert [(m.name, m.dtype, m.shape) for m in manifest.modalities] == [
        ("visual", "uint8", [3, SMALL, SMALL, 3]),
        ("audio", "float16", [129, 626]),
    ]
    # the stored spectrogram is the reference's crop at the mean of its random start, 2.5 s
    data = ParquetSamples(out, "test", ["audio"])
    batch = data.__getitems__(list(range(len(data))))
    for i, sample_id in enumerate(data.sample_ids):
        wave, _ = read_audio(clips[sample_id].audio, sample_rate=RATE)
        want = ogm_ge_vggsound_audio(wave[0], 2.5)
        got = batch.inputs["audio"][i].float().numpy()
        np.testing.assert_allclose(got, want, rtol=5e-3, atol=0.01)  # float16, float32 STFT


def test_stft_offset_matches_the_reference_crop() -> None:
    rng = np.random.default_rng(0)
    for seconds in (2.3, 6.0, 10.5):  # tiled 3x / once / not at all in the reference
        wave = rng.normal(0, 0.3, round(seconds * RATE)).astype(np.float32)
        for start in (0.0, 2.5, 5.0):
            got = stft_spectrogram(wave, RATE, n_fft=256, hop_length=128, seconds=5.0, offset=start)
            assert got.shape == (129, 626)
            np.testing.assert_allclose(got, ogm_ge_vggsound_audio(wave, start), atol=2e-3)


def test_mm_debiased_audio_is_the_tools_257_by_1003_magnitude() -> None:
    """The manifest's audio parameters on waves shorter than, exactly and longer than 10 s (and
    a length of whole seconds, where the tool repeats the last second) give the tool's array."""
    entry, _ = load_dataset_manifest("vggsound-mm-debiased")
    spec = AVParams.model_validate(entry.params).modalities[1]
    assert isinstance(spec, StftParams)
    rate = spec.sample_rate
    assert rate == 44100
    rng = np.random.default_rng(4)
    for seconds in (0.6, 2.0, 3.7, 10.0, 10.5):
        wave = rng.uniform(-0.5, 0.5, round(seconds * rate)).astype(np.float32)
        got = stft_spectrogram(
            wave,
            rate,
            n_fft=spec.n_fft,
            hop_length=spec.hop_length,
            seconds=spec.seconds,
            tile=spec.tile,
            repeat=spec.repeat,
            pad_mode=spec.pad_mode,
            log=spec.log,
        )
        assert got.shape == (257, 1003)
        np.testing.assert_allclose(got, gewu_tool_audio(wave, rate), rtol=1e-4, atol=2e-3)


def test_class_subset_relabels_and_keeps_the_full_split(tmp_path: Path) -> None:
    """A VGGSound subset manifest = vggsound.yaml + class_subset: same clips as the full set,
    relabelled in the subset's order (val carved before subsetting, so it matches too)."""
    raw = tmp_path / "raw"
    write_synthetic_raw(raw, SyntheticAVParams(layout="vggsound", classes=CLASSES, seconds=1.0))
    manifest, _ = load_dataset_manifest("vggsound")
    params = AVParams.model_validate(manifest.params)
    full = AVClipsSource().plan(manifest, params, raw)
    subset = ["race car, auto racing", "dog barking"]
    sub_manifest = manifest.model_copy(update={"raw": {**manifest.raw, "class_subset": subset}})
    sub = AVClipsSource().plan(sub_manifest, params, raw)
    assert sub.classes == subset
    for split, tasks in full.splits.items():
        expected = {
            (t.sample_id, subset.index(full.classes[t.label]))
            for t in tasks
            if full.classes[t.label] in subset
        }
        assert {(t.sample_id, t.label) for t in sub.splits[split]} == expected
        assert expected
    bad = manifest.model_copy(update={"raw": {**manifest.raw, "class_subset": ["walrus"]}})
    with pytest.raises(UserError, match="walrus"):
        AVClipsSource().plan(bad, params, raw)


def test_prep_mm_debiased(tmp_path: Path) -> None:
    raw, out = tmp_path / "raw", tmp_path / "out"
    params = layout_params("vggsound-mm-debiased", clips=1, seed=0, overrides=["seconds=2.0"])
    clips = {c.clip_id: c for c in write_synthetic_raw(raw, params)}
    entries = json.loads((raw / "MM-Debiased.json").read_text())
    assert {k: (v["subset"], v["label"]) for k, v in entries.items()} == {
        c.clip_id: (SUBSETS[c.split], params.classes[c.label]) for c in clips.values()
    }
    for shape in (r".{11}_\d{6}_\d{6}", r".{11}_\d{1,3}", r".{11}"):  # VGGSound, Kinetics, bare
        assert any(re.fullmatch(shape, key) for key in entries)
    sets = ["--set", f"modalities.0.size=[{SMALL},{SMALL}]"]
    result = runner.invoke(
        app, ["prep", "vggsound-mm-debiased", "--raw", str(raw), "--out", str(out), *sets]
    )
    assert result.exit_code == 0, result.output
    manifest = check_shards(out, clips, params.classes)
    assert manifest.classes[:4] == params.classes and len(manifest.classes) == 10
    assert {n: s.samples for n, s in manifest.splits.items()} == {"train": 4, "val": 4, "test": 4}
    assert [(m.name, m.dtype, m.shape) for m in manifest.modalities] == [
        ("visual", "uint8", [3, SMALL, SMALL, 3]),
        ("audio", "float16", [257, 1003]),
    ]
    # the stored spectrogram is the tool's |STFT| of the clip read at 44.1 kHz
    data = ParquetSamples(out, "test", ["audio"])
    batch = data.__getitems__(list(range(len(data))))
    for i, sample_id in enumerate(data.sample_ids):
        wave, rate = read_audio(clips[sample_id].audio, sample_rate=44100)
        want = gewu_tool_audio(wave[0], rate)
        got = batch.inputs["audio"][i].float().numpy()
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)  # float16 storage
    # a bare id matches only while its YouTube video has a single clip in the folder
    bare = next(c for c in clips.values() if len(c.clip_id) == 11)
    shutil.copy(bare.video, bare.video.with_name(f"{bare.clip_id}_000001_000011.mp4"))
    entry, _ = load_dataset_manifest("vggsound-mm-debiased")
    plan = AVClipsSource().plan(entry, AVParams.model_validate(entry.params), raw)
    assert plan.errors == [(bare.clip_id, "2 clips of this YouTube video; the id gives no start")]


def test_list_columns_and_row_filters(tmp_path: Path) -> None:
    """Joined id columns and a split filter on a csv; field names and the key on a json."""
    (tmp_path / "l.csv").write_text('aaa,7,"b, c",train\nddd,8,e,test\n')
    spec = ListSpec(path="l.csv", id=[0, 1], label=2, where={"column": 3, "equals": "train"})
    listed = _list_split(tmp_path, SplitSpec(lists=[spec]), {"b, c": 0, "e": 1})
    assert [(it.clip_id, it.label) for it in listed] == [("aaa_7", 0)]
    (tmp_path / "l.json").write_text(json.dumps({"k1": {"s": "x", "y": 3}, "k2": {"s": "z"}}))
    spec = ListSpec(
        path="l.json",
        format="json",
        label="y",
        label_kind="index",
        where={"column": "s", "equals": "x"},
    )
    listed = _list_split(tmp_path, SplitSpec(lists=[spec]), {})
    assert [(it.clip_id, it.label) for it in listed] == [("k1", 3)]
    with pytest.raises(ValidationError, match="field names"):
        ListSpec(path="l.json", format="json")  # label defaults to column 1
    with pytest.raises(ValidationError, match="positions"):
        ListSpec(path="l.csv", id=[0, "ytid"])
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        _list_split(tmp_path, SplitSpec(lists=[spec.model_copy(update={"path": "bad.json"})]), {})


def test_cli_lists_and_writes_vggsound(tmp_path: Path) -> None:
    result = runner.invoke(app, ["prep", "--list"])
    assert result.exit_code == 0
    assert "vggsound:" in result.output and "vggsound-mm-debiased:" in result.output
    args = ["prep", "synthetic-av", "--raw-out", str(tmp_path), "--layout", "vggsound"]
    result = runner.invoke(app, [*args, "--clips", "1", "--set", "seconds=1.0"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "video").glob("*.mp4"))) == 8
    assert len((tmp_path / "vggsound.csv").read_text().splitlines()) == 8
    result = runner.invoke(app, [*args[:-1], "vgg"])
    assert result.exit_code == 2 and "vggsound" in result.output
