"""`mmval prep ave-localisation` on a fake folder in the layout of AVE's released features."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

import tests.ave_raw as fake_raw
from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.data.shards import check_data_dir
from mmval.data.sources.ave_features import (
    HEADER,
    Annotation,
    first_appearance,
    parse_annotations,
    segment_targets,
)
from mmval.errors import UserError

runner = CliRunner()


def test_annotations_keep_their_rows_with_or_without_header() -> None:
    lines = [
        "Church bell&MH3m4AwEcRY&good&6&8",
        "Male speech&x&good&0&10",
        "Church bell&y&good&0&0",
    ]
    plain = parse_annotations("\n".join(lines) + "\n\n")
    assert parse_annotations("\r\n".join([HEADER, *lines])) == plain
    assert plain[0] == Annotation("Church bell", "MH3m4AwEcRY", 6, 8)
    assert first_appearance(plain) == ["Church bell", "Male speech"]
    # supervised baseline's segments: t is the event iff Start <= t < End
    assert segment_targets(plain[0], 3, 10, 28).tolist() == [28] * 6 + [3, 3] + [28] * 2
    assert segment_targets(plain[2], 0, 10, 28).tolist() == [28] * 10
    with pytest.raises(ValueError, match="line 3 'Bark&bad line'"):
        parse_annotations("\n".join([HEADER, lines[0], "Bark&bad line"]))


def test_prep_stores_every_row_of_the_order_files(tmp_path: Path) -> None:
    fake = fake_raw.write_ave(tmp_path / "raw")
    out = tmp_path / "data"
    manifest = prepare("ave-localisation", out, raw=tmp_path / "raw", workers=2).manifest
    assert {s: info.samples for s, info in manifest.splits.items()} == fake.counts
    assert manifest.classes == fake.classes
    assert manifest.classes[-1] == "background"
    assert manifest.task == "localisation"
    assert manifest.target is not None
    assert (manifest.target.dtype, manifest.target.shape) == ("int16", [10])
    assert [(m.name, m.dtype, m.shape) for m in manifest.modalities] == [
        ("audio", "float32", [10, 16]),
        ("visual", "float16", [10, 2, 2, 16]),
    ]
    assert manifest.extraction["labels_checked"] == sum(fake.counts.values()) + 2
    assert manifest.extraction["unlisted_rows"] == 1

    errors = pq.read_table(out / "errors.parquet").to_pandas().set_index("source")
    assert sorted(errors.index) == sorted(fake.failures)
    for source, reason in fake.failures.items():
        assert reason in errors.loc[source, "reason"]

    with h5py.File(tmp_path / "raw" / "audio_feature.h5") as f:
        audio = f["avadataset"][()]
    with h5py.File(tmp_path / "raw" / "visual_feature.h5") as f:
        visual = f["avadataset"][()]
    row_of = {sample: row for row, sample in fake.sample_ids.items()}
    for split, rows in fake.splits.items():
        data = ParquetSamples(out, split, ["audio", "visual"])
        assert sorted(row_of[s] for s in data.sample_ids) == sorted(rows)
        batch = data.__getitems__(list(range(len(data))))
        assert batch.target is not None and batch.target.dtype.is_floating_point is False
        assert tuple(batch.target.shape) == (len(data), 10)
        for at, sample in enumerate(data.sample_ids):
            row = row_of[sample]
            assert batch.label[at].item() == fake.labels[row]
            assert batch.target[at].tolist() == fake.targets[row].tolist()
            np.testing.assert_array_equal(batch.inputs["audio"][at].numpy(), audio[row])
            np.testing.assert_array_equal(
                batch.inputs["visual"][at].numpy(), visual[row].astype(np.float16)
            )
    test = ParquetSamples(out, "test", ["audio"])
    targets = test.__getitems__(list(range(len(test)))).target
    assert targets is not None and int((targets == 4).all(dim=1).sum()) == 1  # Start == End
    one = ParquetSamples(out, "test", ["visual"])[0]
    assert one.target is not None and tuple(one.target.shape) == (1, 10)


def test_header_line_and_no_labels_file_through_the_cli(tmp_path: Path) -> None:
    fake = fake_raw.write_ave(tmp_path / "raw", header=True, labels_file=False)
    out = tmp_path / "data"
    result = runner.invoke(
        app, ["prep", "ave-localisation", "--raw", str(tmp_path / "raw"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    manifest = check_data_dir(out)
    assert {s: info.samples for s, info in manifest.splits.items()} == fake.counts
    assert manifest.classes == fake.classes
    assert manifest.extraction["labels_checked"] == 0
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert sorted(errors["source"]) == sorted(fake.failures)


def test_the_fake_segments_are_learnable(tmp_path: Path) -> None:
    """Nearest class mean of the audio segments (fitted on train) beats the background share by
    far on test: what the localisation training tests rely on."""
    fake_raw.write_ave(tmp_path / "raw", defects=False)
    out = tmp_path / "data"
    prepare("ave-localisation", out, raw=tmp_path / "raw", workers=1)

    def segments(split: str) -> tuple[np.ndarray, np.ndarray]:
        data = ParquetSamples(out, split, ["audio"])
        batch = data.__getitems__(list(range(len(data))))
        assert batch.target is not None
        return batch.inputs["audio"].reshape(-1, 16).numpy(), batch.target.reshape(-1).numpy()

    x, y = segments("train")
    means = np.stack([x[y == c].mean(axis=0) for c in range(5)])
    x, y = segments("test")
    predicted = np.argmin(((x[:, None] - means[None]) ** 2).sum(axis=2), axis=1)
    background = float(np.mean(y == 4))
    assert 0.2 < background < 0.6
    assert float(np.mean(predicted == y)) > background + 0.3


def test_labels_of_another_class_order_are_refused(tmp_path: Path) -> None:
    fake_raw.write_ave(tmp_path / "raw", defects=False)
    path = tmp_path / "raw" / "labels.h5"
    with h5py.File(path, "r+") as f:
        f["avadataset"][...] = f["avadataset"][()][:, :, [1, 2, 3, 0, 4]]
    with pytest.raises(UserError, match="disagrees on 120 of 120 rows"):
        prepare("ave-localisation", tmp_path / "data", raw=tmp_path / "raw", workers=1)
    assert not (tmp_path / "data").exists()
    with h5py.File(path, "w") as f:
        f["avadataset"] = np.zeros((120, 10, 4), np.float32)
    with pytest.raises(UserError, match=r"\[N, 10, 5\]"):
        prepare("ave-localisation", tmp_path / "data", raw=tmp_path / "raw", workers=1)


def test_layout_mistakes_are_user_errors(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    fake_raw.write_ave(raw, defects=False)
    annotations = raw / "Annotations.txt"
    good = annotations.read_text()
    annotations.write_text(good.replace("&good&", "&", 1))
    with pytest.raises(UserError, match=r"line 1 .* 5 &-separated fields"):
        prepare("ave-localisation", tmp_path / "data", raw=raw, workers=1)
    annotations.write_text(good)
    with h5py.File(raw / "val_order.h5") as f:
        val = f["order"][()]
    with h5py.File(raw / "test_order.h5", "w") as f:
        f["order"] = np.append(val[:1], val[:3])
    with pytest.raises(UserError, match=f"row {val[0]} is listed twice"):
        prepare("ave-localisation", tmp_path / "data", raw=raw, workers=1)
    (raw / "visual_feature.h5").unlink()
    result = runner.invoke(
        app, ["prep", "ave-localisation", "--raw", str(raw), "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 2 and "visual_feature.h5" in result.output
