"""`mmval prep` on fake raw folders laid out like the real audio-visual data sets."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.dataset import ParquetSamples
from mmval.data.extract.video import decode_jpeg
from mmval.data.manifest import load_dataset_manifest
from mmval.data.pipeline import PrepCallbacks
from mmval.data.prep import prepare
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.errors import UserError

runner = CliRunner()
SMALL = 32  # stored frame side in these tests

# per data set: the layout to fake, and overrides that keep extraction small and fast
CASES = {
    "kinetics-sounds": (
        "kinetics-sounds",
        ["modalities.1.target_frames=64", "modalities.1.num_mel_bins=32"],
    ),
    "crema-d": ("crema-d", []),
    "crema-d-actors": ("crema-d", []),
    "ave": ("ave", []),
    "ucf101": ("ucf101", ["modalities.1.pairs=3", f"modalities.1.size=[{SMALL},{SMALL}]"]),
    "ucf101-three": (
        "ucf101",
        [
            "modalities.1.pairs=3",
            f"modalities.1.size=[{SMALL},{SMALL}]",
            "modalities.2.pairs=3",
            f"modalities.2.size=[{SMALL},{SMALL}]",
        ],
    ),
}


def fake_raw(root: Path, layout: str, dataset: str, clips: int = 2, **extra: object):
    classes = load_dataset_manifest(dataset)[0].classes or ["Archery", "Bowling", "Diving"]
    params = SyntheticAVParams(
        layout=layout, classes=classes[:3], clips_per_class=clips, seconds=2.0, **extra
    )
    return write_synthetic_raw(root, params)


def frames_at(path: Path, times: list[float], size: int) -> list[np.ndarray]:
    """Independent reference: decode every frame, keep the one at each presentation time."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = {round(float(f.pts * stream.time_base), 3): f for f in container.decode(stream)}
    return [
        frames[round(t, 3)].reformat(size, size, format="rgb24", interpolation="AREA").to_ndarray()
        for t in times
    ]


@pytest.mark.parametrize("dataset", sorted(CASES))
def test_prep_real_layouts(tmp_path, dataset):
    layout, overrides = CASES[dataset]
    clips = fake_raw(tmp_path / "raw", layout, dataset)
    out = tmp_path / "out"
    sets = [f"modalities.0.size=[{SMALL},{SMALL}]", "rows_per_shard=4", *overrides]
    result = prepare(dataset, out, raw=tmp_path / "raw", overrides=sets, workers=1)
    manifest = result.manifest
    counts = {name: split.samples for name, split in manifest.splits.items()}
    assert sum(counts.values()) == len(clips)
    if dataset == "crema-d-actors":
        assert set(counts) == {"train", "val", "test"}
    elif dataset in ("kinetics-sounds", "crema-d", "ucf101", "ucf101-three"):
        assert counts["val"] >= 1 and counts["train"] + counts["val"] == 6
    else:
        assert counts == {"train": 6, "val": 6, "test": 6}
    assert pq.read_table(out / "errors.parquet").num_rows == 0
    by_id = {c.clip_id: c for c in clips}
    names = [m.name for m in manifest.modalities]
    for split in manifest.splits:
        data = ParquetSamples(out, split, names)
        batch = data.__getitems__(list(range(len(data))))
        for spec in manifest.modalities:
            x = batch.inputs[spec.name]
            assert list(x.shape[1:]) == spec.shape and str(x.dtype).endswith(spec.dtype)
        for i, sample_id in enumerate(data.sample_ids):
            assert batch.label[i].item() == by_id[sample_id].label
    # a stored frame matches the source frame at its timestamp
    shard = pq.read_table(out / manifest.splits["test"].shards[0].path)
    row = shard.slice(0, 1).to_pylist()[0]
    clip = by_id[row["sample_id"]]
    stored = decode_jpeg(row["visual"])
    reference = frames_at(clip.video, row["visual_t"], SMALL)
    assert len(reference) == len(stored)
    for got, want in zip(stored, reference, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 6  # JPEG q90 noise only


def test_broken_clips_are_accounted_for(tmp_path):
    raw = tmp_path / "raw"
    clips = fake_raw(raw, "kinetics-sounds", "kinetics-sounds", clips=2)
    train = [c for c in clips if c.split == "train"]
    train[0].video.write_bytes(b"")  # zero bytes
    data = bytearray(train[1].video.read_bytes())
    train[1].video.write_bytes(bytes(data[: len(data) // 3]) + b"\x00" * 500)  # corrupt
    silent = train[2].video
    with av.open(str(silent)) as src, av.open(str(silent) + ".tmp.mp4", "w") as dst:
        stream_in = src.streams.video[0]
        stream_out = dst.add_stream_from_template(stream_in)
        for packet in src.demux(stream_in):
            if packet.dts is not None:
                packet.stream = stream_out
                dst.mux(packet)
    Path(str(silent) + ".tmp.mp4").replace(silent)  # video only: no audio track
    result = prepare(
        "kinetics-sounds",
        tmp_path / "out",
        raw=raw,
        workers=1,
        overrides=["modalities.0.size=[32,32]", "modalities.1.target_frames=64"],
    )
    errors = pd.read_parquet(tmp_path / "out/errors.parquet")
    assert len(errors) == 3
    reasons = dict(zip(errors["source"], errors["reason"], strict=True))
    assert any("audio" in r for r in reasons.values())
    counts = result.summary.splits
    assert sum(c.failed for c in counts.values()) == 3
    assert sum(c.written for c in counts.values()) == len(clips) - 3


class Interrupt(Exception):
    pass


def test_interrupted_prep_resumes_to_the_same_shards(tmp_path):
    raw = tmp_path / "raw"
    fake_raw(raw, "crema-d", "crema-d", clips=2)
    sets = ["modalities.0.size=[32,32]", "rows_per_shard=2"]
    full = prepare("crema-d", tmp_path / "full", raw=raw, overrides=sets, workers=1).manifest
    seen = [0]

    def stop_after_five(ok: bool) -> None:
        seen[0] += 1
        if seen[0] == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        prepare(
            "crema-d",
            tmp_path / "resumed",
            raw=raw,
            overrides=sets,
            workers=1,
            callbacks=PrepCallbacks(on_clip=stop_after_five),
        )
    assert not (tmp_path / "resumed/manifest.json").exists()
    result = prepare("crema-d", tmp_path / "resumed", raw=raw, overrides=sets, workers=1)
    assert sum(c.reused_shards for c in result.summary.splits.values()) == 2
    assert result.manifest.splits == full.splits
    assert not list((tmp_path / "resumed").rglob("*.tmp"))
    with pytest.raises(UserError, match="other settings"):
        prepare("crema-d", tmp_path / "resumed", raw=raw, overrides=["rows_per_shard=3"])


def test_layout_errors_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = runner.invoke(
        app, ["prep", "crema-d", "--raw", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "train.csv" in result.output
    result = runner.invoke(app, ["prep", "crema-d", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--raw" in result.output
    result = runner.invoke(app, ["prep", "no-such-set", "--raw", str(tmp_path)])
    assert result.exit_code == 2 and "unknown data set" in result.output
    raw = tmp_path / "raw"
    fake_raw(raw, "crema-d", "crema-d")
    for wav in (raw / "AudioWAV").iterdir():
        wav.unlink()
    for flv in (raw / "VideoFlash").iterdir():
        flv.unlink()
    result = runner.invoke(
        app, ["prep", "crema-d", "--raw", str(raw), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "VideoFlash/{id}.flv" in result.output


def test_cli_prep_and_failure_share(tmp_path):
    raw = tmp_path / "raw"
    clips = fake_raw(raw, "crema-d", "crema-d")
    args = [
        "prep",
        "crema-d",
        "--raw",
        str(raw),
        "--out",
        str(tmp_path / "o"),
        "--workers",
        "2",
        "--set",
        "modalities.0.size=[32,32]",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "train: " in result.output
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "already prepared" in " ".join(result.output.split())
    broken = [c for c in clips if c.split == "train"]
    for clip in broken:
        clip.video.write_bytes(b"broken")
    out2 = ["--out", str(tmp_path / "o2"), "--splits", "train,val"]
    result = runner.invoke(app, [*args[:4], *out2, *args[6:]])
    assert result.exit_code == 1 and "--max-failures" in result.output
    assert pq.read_table(tmp_path / "o2/errors.parquet").num_rows == len(broken)
