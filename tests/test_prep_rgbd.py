"""`mmval prep nyud2|sunrgbd` on fake raw folders in QMF's RGB-D scene layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image
from torchvision.transforms import functional as TF

import tests.rgbd_raw as fake_raw
from mmval.data.dataset import ParquetSamples
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.sources.rgbd_scenes import RgbdParams, split_pair
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.runner import Trainer

SMALL = ["fine_size=32", "load_size=40"]


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation images as QMF computes them, with PIL: AlignedConcDataset.__getitem__
    (split at int(w / 2), bicubic LOAD_SIZE resize when a half is wider than FINE_SIZE), then
    transforms.Resize((FINE_SIZE, FINE_SIZE))."""
    image = Image.open(path).convert("RGB")
    w, h = image.size
    w2 = int(w / 2)
    halves = [image.crop((0, 0, w2, h)), image.crop((w2, 0, w, h))]
    if w2 > 32:
        halves = [half.resize((40, 40), Image.BICUBIC) for half in halves]
    return tuple(np.asarray(TF.resize(half, [32, 32]), dtype=float) for half in halves)


@pytest.mark.parametrize("dataset", ["nyud2", "sunrgbd"])
def test_prep_writes_every_split(dataset: str, tmp_path: Path) -> None:
    classes = load_dataset_manifest(dataset)[0].classes
    fake = fake_raw.write_rgbd(tmp_path / "raw", classes, {"train": 10, "test": 2})
    out = tmp_path / "data"
    manifest = prepare(dataset, out, raw=tmp_path / "raw", workers=2, overrides=SMALL).manifest
    assert {s: info.samples for s, info in manifest.splits.items()} == fake.counts
    assert manifest.classes == classes
    assert [(m.name, m.encoding, m.shape) for m in manifest.modalities] == [
        ("rgb", "jpeg", [1, 32, 32, 3]),
        ("depth", "jpeg", [1, 32, 32, 3]),
    ]

    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert len(errors) == len(fake.failures)
    for source, reason in fake.failures.items():
        assert reason in errors.set_index("source").loc[source, "reason"]

    seen = 0
    for split in manifest.splits:
        data = ParquetSamples(out, split, ["rgb", "depth"])
        batch = data.__getitems__(list(range(len(data))))
        assert batch.inputs["rgb"].shape == (len(data), 1, 32, 32, 3)
        for at, sample in enumerate(data.sample_ids):
            assert batch.label[at].item() == fake.labels[sample]
            if sample.endswith("more/0000") or sample == f"train/{classes[1]}/0000" or at == 0:
                rgb, depth = _reference(fake.images[sample])
                for name, ref in (("rgb", rgb), ("depth", depth)):
                    stored = batch.inputs[name][at, 0].numpy().astype(float)
                    assert np.abs(stored - ref).mean() < 3.0, (sample, name)
                seen += 1
    assert seen >= 5  # both special images and the first of each split were compared
    assert not set(ParquetSamples(out, "val", ["rgb"]).sample_ids) & set(
        ParquetSamples(out, "train", ["rgb"]).sample_ids
    )


def test_halves_are_resized_as_qmf(tmp_path: Path) -> None:
    """Before JPEG, the stored halves are QMF's PIL images to within rounding (skipping the
    bicubic LOAD_SIZE step alone is off by about 0.8 on these images)."""
    fake = fake_raw.write_rgbd(tmp_path, ["a", "b"], {"train": 1, "test": 1})
    params = RgbdParams(fine_size=32, load_size=40)
    for sample in ("train/a/more/0000", "train/b/0000", "test/a/0000"):  # wide, narrow, wide
        ours = split_pair(fake.images[sample], params)
        for mine, ref in zip(ours, _reference(fake.images[sample]), strict=True):
            assert mine.shape == (32, 32, 3)
            assert np.abs(mine.astype(float) - ref).mean() < 0.4, sample


def test_unknown_class_folder_is_a_user_error(tmp_path: Path) -> None:
    fake_raw.write_rgbd(
        tmp_path / "raw", ["bathroom", "bedroom", "kitchens"], {"train": 2, "test": 1}
    )
    with pytest.raises(UserError, match="kitchens"):
        prepare("nyud2", tmp_path / "data", raw=tmp_path / "raw", workers=1)


def test_missing_split_folder_names_what_was_found(tmp_path: Path) -> None:
    (tmp_path / "raw" / "training").mkdir(parents=True)
    with pytest.raises(UserError, match="training"):
        prepare("sunrgbd", tmp_path / "data", raw=tmp_path / "raw", workers=1)


def test_concat_recipe_trains_one_epoch(tmp_path: Path) -> None:
    classes = load_dataset_manifest("nyud2")[0].classes
    fake_raw.write_rgbd(tmp_path / "raw", classes, {"train": 10, "test": 2})
    data = tmp_path / "data"
    prepare("nyud2", data, raw=tmp_path / "raw", workers=1, overrides=SMALL)
    recipe = load_recipe(
        Path(__file__).parents[1] / "recipes" / "concat-nyud2.yaml",
        [
            f"data.path={data}",
            "train.epochs=1",
            "train.batch_size=8",
            "train.workers=0",
            "train.device=cpu",
            f"output={tmp_path / 'runs'}",
        ],
    )
    Trainer(recipe, 0).run()
    metrics = pd.read_parquet(tmp_path / "runs" / "concat-nyud2" / "seed0" / "metrics.parquet")
    assert len(metrics) == 1
    assert np.isfinite(metrics["train_loss"]).all()
    assert 0.0 <= metrics["test_acc"].iloc[-1] <= 1.0
