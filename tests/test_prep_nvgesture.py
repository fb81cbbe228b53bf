"""`mmval prep nvgesture` on a fake raw folder in the nvGesture_v1 layout."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import tests.nvgesture_raw as fake_raw
from mmval.data.dataset import ParquetSamples
from mmval.data.extract.video import segment_indices
from mmval.data.prep import prepare
from mmval.data.sources.nvgesture import parse_line
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.runner import Trainer

SMALL = ["frames=12", "size=[16, 16]", "pick=6"]
STREAMS = {"rgb": "color", "depth": "depth", "ir": "duo_left"}
VIDEO = {"color": "sk_color", "depth": "sk_depth", "duo_left": "duo_left"}


def _source_frames(path: Path) -> list[np.ndarray]:
    """Every frame of a video, decoded on its own, as mean RGB colours."""
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24").mean(axis=(0, 1)) for f in container.decode(video=0)]


def test_parse_line_reads_the_official_format() -> None:
    line = (
        "path:./Video_data/class_01/subject13_r0 depth:sk_depth:138:218 "
        "color:sk_color:138:218 duo_left:duo_left:161:254 label:1"
    )
    assert parse_line(line) == (
        "./Video_data/class_01/subject13_r0",
        0,
        {
            "depth": ("sk_depth", 138, 218),
            "color": ("sk_color", 138, 218),
            "duo_left": ("duo_left", 161, 254),
        },
    )


def test_prep_writes_every_split(tmp_path: Path) -> None:
    fake = fake_raw.write_nvgesture(tmp_path / "raw", 25, {"train": 10, "test": 2})
    out = tmp_path / "data"
    manifest = prepare("nvgesture", out, raw=tmp_path / "raw", workers=2, overrides=SMALL).manifest
    assert {s: info.samples for s, info in manifest.splits.items()} == fake.counts
    assert len(manifest.classes) == 25
    assert [(m.name, m.encoding, m.shape) for m in manifest.modalities] == [
        ("rgb", "jpeg", [6, 16, 16, 3]),
        ("depth", "jpeg", [6, 16, 16, 1]),
        ("ir", "jpeg", [6, 16, 16, 1]),
    ]

    errors = pq.read_table(out / "errors.parquet").to_pandas().set_index("source")
    assert len(errors) == len(fake.failures)
    for source, reason in fake.failures.items():
        assert reason in errors.loc[source, "reason"]

    picks = segment_indices(12, 6, train=False, rng=None)
    compared = 0
    ids: dict[str, set[str]] = {}
    for split in manifest.splits:
        data = ParquetSamples(out, split, list(STREAMS))
        ids[split] = set(data.sample_ids)
        batch = data.__getitems__(list(range(len(data))))
        assert batch.inputs["rgb"].shape == (len(data), 6, 16, 16, 3)
        assert batch.inputs["depth"].shape == (len(data), 6, 16, 16, 1)
        for at, sample in enumerate(data.sample_ids):
            assert batch.label[at].item() == fake.labels[sample]
            assert fake.splits[sample] == ("test" if split == "test" else "train")
            if at % 7:
                continue
            for name, sensor in STREAMS.items():
                source = _source_frames(tmp_path / "raw" / sample / f"{VIDEO[sensor]}.avi")
                start, end = fake.windows[sample][sensor]
                for k, pick in enumerate(picks):
                    stored = batch.inputs[name][at, k].numpy().astype(float).mean(axis=(0, 1))
                    index = start + int(pick)
                    if index >= end:  # past the window: readdata's zero frames
                        assert np.all(stored < 2), (sample, name, k)
                        continue
                    ref = source[index] if sensor == "color" else source[index][2:3]
                    # neighbouring frames are 7 grey levels apart
                    assert np.abs(stored - ref).max() < 4.5, (sample, name, k)
                compared += 1
    assert compared >= 3 * 6
    assert not ids["val"] & ids["train"]
    assert len(ids["val"]) == 25  # one per class


def test_uniform_sampling_spreads_over_the_window(tmp_path: Path) -> None:
    fake = fake_raw.write_nvgesture(tmp_path / "raw", 2, {"train": 1, "test": 2})
    out = tmp_path / "data"
    prepare(
        "nvgesture",
        out,
        raw=tmp_path / "raw",
        workers=1,
        splits=["test"],
        overrides=["frames=4", "pick=4", "size=[16, 16]", "sampling=uniform"],
    )
    data = ParquetSamples(out, "test", ["ir"])
    assert len(data) == 2
    batch = data.__getitems__(list(range(len(data))))
    for at, sample in enumerate(data.sample_ids):
        start, end = fake.windows[sample]["duo_left"]
        source = _source_frames(tmp_path / "raw" / sample / "duo_left.avi")
        wanted = np.linspace(start, end - 1, 4).round().astype(int)
        stored = batch.inputs["ir"][at].numpy().astype(float).mean(axis=(1, 2, 3))
        assert np.abs(stored - [source[i][2] for i in wanted]).max() < 3.0


def test_a_label_outside_the_classes_is_a_user_error(tmp_path: Path) -> None:
    fake_raw.write_nvgesture(tmp_path / "raw", 2, {"train": 1, "test": 1})
    lst = tmp_path / "raw" / "nvgesture_test_correct_cvpr2016_v2.lst"
    lst.write_text(lst.read_text().replace("label:1", "label:26"))
    with pytest.raises(UserError, match="label 26"):
        prepare("nvgesture", tmp_path / "data", raw=tmp_path / "raw", workers=1)


def test_missing_lists_name_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "raw" / "Video_data").mkdir(parents=True)
    with pytest.raises(UserError, match="Video_data"):
        prepare("nvgesture", tmp_path / "data", raw=tmp_path / "raw", workers=1)


def test_concat_recipe_trains_one_epoch(tmp_path: Path) -> None:
    fake_raw.write_nvgesture(tmp_path / "raw", 5, {"train": 10, "test": 2})
    data = tmp_path / "data"
    prepare("nvgesture", data, raw=tmp_path / "raw", workers=1, overrides=SMALL)
    recipe = load_recipe(
        Path(__file__).parents[1] / "recipes" / "concat-nvgesture.yaml",
        [
            f"data.path={data}",
            "train.epochs=1",
            "train.batch_size=16",
            "train.workers=0",
            "train.device=cpu",
            f"output={tmp_path / 'runs'}",
        ],
    )
    Trainer(recipe, 0).run()
    metrics = pd.read_parquet(tmp_path / "runs" / "concat-nvgesture" / "seed0" / "metrics.parquet")
    assert len(metrics) == 1
    assert np.isfinite(metrics["train_loss"]).all()
    assert 0.0 <= metrics["test_acc"].iloc[-1] <= 1.0
