"""`mmval prep meld` / `meld-sentiment` on a fake MELD.Raw folder (`mmval prep synthetic-av
--layout meld`): the official CSVs and clip folders, text + audio + visual, a broken clip."""

from __future__ import annotations

import csv
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from mmval.data.dataset import ParquetSamples
from mmval.data.extract.text import TextCleaning, clean_text, load_saved_tokenizer
from mmval.data.extract.video import decode_jpeg
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.synthetic_av import RawClip, SyntheticAVParams, write_synthetic_raw
from mmval.recipe import load_recipe
from mmval.runner import Trainer

SMALL = [
    "modalities.2.size=[32,32]",
    "modalities.1.target_frames=64",
    "modalities.1.num_mel_bins=32",
]
CSV = {"train": "train/train_sent_emo.csv", "val": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
PREFIX = {"train": "train", "val": "dev", "test": "test"}  # of the sample ids
RECIPES = Path(__file__).parents[1] / "recipes"


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[RawClip]]:
    root = tmp_path_factory.mktemp("meld-raw")
    classes = load_dataset_manifest("meld")[0].classes[:4]
    params = SyntheticAVParams(
        layout="meld", classes=classes, clips_per_class=2, seconds=1.5, size=(32, 48)
    )
    return root, write_synthetic_raw(root, params)


def _rows(root: Path) -> dict[str, dict[str, str]]:
    """sample id -> its CSV row, read independently of the source."""
    rows = {}
    for split, rel in CSV.items():
        with (root / rel).open(encoding="utf-8", newline="") as f:
            for row in csv.DictReader(f):
                sample_id = f"{PREFIX[split]}/dia{row['Dialogue_ID']}_utt{row['Utterance_ID']}"
                rows[sample_id] = row
    return rows


def _frame_at(path: Path, t: float) -> np.ndarray:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            if round(float(frame.pts * stream.time_base), 3) == round(t, 3):
                return frame.reformat(32, 32, format="rgb24", interpolation="AREA").to_ndarray()
    raise AssertionError(f"no frame at {t} s in {path}")


def test_fake_csvs_have_the_official_columns_and_mojibake(raw) -> None:
    root, clips = raw
    header = (root / CSV["val"]).read_text(encoding="utf-8").splitlines()[0]
    assert header == (
        "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,"
        "StartTime,EndTime"
    )
    texts = [row["Utterance"] for row in _rows(root).values()]
    assert all("\x92" in t for t in texts) and any("\x85" in t for t in texts)
    assert any("," in t for t in texts)  # quoted fields
    assert (root / "output_repeated_splits_test" / "dia0_utt0.mp4").is_file()
    assert len(clips) == 4 * 2 * 3


def test_prep_meld(raw, tmp_path: Path) -> None:
    root, clips = raw
    broken = root / "dev" / "dev_splits_complete" / "dia0_utt1.mp4"
    kept = broken.read_bytes()
    try:
        broken.write_bytes(kept[: len(kept) // 3] + b"\x00" * 300)  # cut short, as a bad download
        result = prepare("meld", tmp_path / "out", raw=root, overrides=SMALL, workers=1)
    finally:
        broken.write_bytes(kept)
    out, manifest = tmp_path / "out", result.manifest
    counts = {name: split.samples for name, split in manifest.splits.items()}
    assert counts == {"train": 8, "val": 7, "test": 8}
    errors = pd.read_parquet(out / "errors.parquet")
    assert errors["source"].tolist() == ["dev/dev_splits_complete/dia0_utt1.mp4"]

    rows = _rows(root)
    by_id = {f"{PREFIX[c.split]}/{c.clip_id}": c for c in clips}
    tokenizer = load_saved_tokenizer(out / "tokenizer-text.json")
    assert "\x92" not in "".join(tokenizer.tokens) and "'" in tokenizer.tokens
    names = [m.name for m in manifest.modalities]
    assert names == ["text", "audio", "visual"]
    for split in manifest.splits:
        data = ParquetSamples(out, split, names)
        batch = data.__getitems__(list(range(len(data))))
        assert batch.inputs["text"].shape == (len(data), 40)
        assert batch.inputs["audio"].shape == (len(data), 64, 32)
        assert batch.inputs["visual"].shape == (len(data), 3, 32, 32, 3)
        for i, sample_id in enumerate(data.sample_ids):
            row = rows[sample_id]
            assert manifest.classes[int(batch.label[i])] == row["Emotion"]
            assert int(batch.label[i]) == by_id[sample_id].label
            text = row["Utterance"].replace("\x92", "'").replace("\x85", "...")
            assert text == clean_text(row["Utterance"], TextCleaning(fix_cp1252=True))
            ids = tokenizer.encode(text)
            stored = batch.inputs["text"][i].numpy()
            assert (stored[: len(ids)] == ids).all() and (stored[len(ids) :] == 0).all()
            assert row["Emotion"] in [tokenizer.tokens[j] for j in ids]
    table = pq.read_table(out / manifest.splits["train"].shards[0].path).to_pylist()
    first = table[0]
    assert first["text_text"] == rows[first["sample_id"]]["Utterance"].replace("\x92", "'").replace(
        "\x85", "..."
    )
    # a stored frame against the clip's frame at the same time
    video = root / "train" / "train_splits" / (first["sample_id"].split("/")[1] + ".mp4")
    stored = decode_jpeg(first["visual"])
    for got, t in zip(stored, first["visual_t"], strict=True):
        assert np.abs(got.astype(int) - _frame_at(video, t).astype(int)).mean() < 6


def test_prep_meld_sentiment(raw, tmp_path: Path) -> None:
    root, _ = raw
    result = prepare(
        "meld-sentiment", tmp_path / "out", raw=root, overrides=SMALL, workers=1, splits=["val"]
    )
    assert result.manifest.classes == ["neutral", "positive", "negative"]
    rows = _rows(root)
    data = ParquetSamples(tmp_path / "out", "val", ["text"])
    labels = data.__getitems__(list(range(len(data)))).label.tolist()
    assert len(labels) == 8
    expected = [rows[s]["Sentiment"] for s in data.sample_ids]
    assert [result.manifest.classes[i] for i in labels] == expected
    assert set(expected) == {"neutral", "positive", "negative"}


def test_meld_folders_at_the_top_level(raw, tmp_path: Path) -> None:
    """MELD.Raw unpacked elsewhere: train_splits/ and train_sent_emo.csv at the top level."""
    root, _ = raw
    moved = tmp_path / "raw"
    (moved / "train_splits").mkdir(parents=True)
    for clip in (root / "train" / "train_splits").iterdir():
        (moved / "train_splits" / clip.name).symlink_to(clip)
    for rel in CSV.values():  # every split's list is read, --splits or not
        (moved / Path(rel).name).symlink_to(root / rel)
    result = prepare(
        "meld", tmp_path / "out", raw=moved, overrides=SMALL, workers=1, splits=["train"], limit=2
    )
    assert result.manifest.splits["train"].samples == 2


def test_concat_meld_trains_one_epoch(raw, tmp_path: Path) -> None:
    root, _ = raw
    data = tmp_path / "data"
    prepare("meld", data, raw=root, overrides=SMALL, workers=1)
    recipe = load_recipe(
        RECIPES / "concat-meld.yaml",
        [
            f"data.path={data}",
            "train.epochs=1",
            "train.batch_size=4",
            "train.workers=0",
            f"output={tmp_path / 'runs'}",
        ],
    )
    summary = Trainer(recipe, 0).run().summary
    assert 0.0 <= summary["final_test_acc"] <= 1.0
