"""`mmval prep brats2018` on a fake BraTS 2018 training release (tests/brats_raw.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow.parquet as pq
import pytest

import tests.brats_raw as fake_raw
from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.data.sources.brats_nifti import fit, lckd_truncate
from mmval.errors import UserError

SEQ = list(fake_raw.SEQUENCES)


def _read(fake: fake_raw.FakeBrats, case: str, kind: str) -> np.ndarray:
    name = case.split("/")[1]
    return np.asanyarray(nib.load(fake.root / case / f"{name}_{kind}.nii.gz").dataobj)


def _mmformer_folds(cases: list[str]) -> list[set[str]]:
    """datasets_nii.py as written: sort by the npy name `<grade>_<case>`, seed 0, three folds."""
    names = sorted(c.replace("/", "_") for c in cases)
    idx = np.arange(len(names))
    np.random.seed(0)
    np.random.shuffle(idx)
    return [{names[i].replace("_", "/", 1) for i in fold} for fold in np.split(idx, 3)]


def _reference(fake: fake_raw.FakeBrats, case: str, min_extent: int, shape: list[int]):
    """preprocess.py step by step, then the center fit to `shape` (padding: background)."""
    vol = np.stack([_read(fake, case, s) for s in SEQ]).astype(np.float32)
    box = []
    for nz in np.nonzero(vol.max(0) != 0):
        lo, hi = int(nz.min()), int(nz.max())
        if hi - lo < min_extent:
            gap = int((min_extent - (hi - lo)) / 2)
            lo, hi = lo - gap, hi + gap + 1
        if lo < 0:
            lo, hi = 0, hi - lo
        box.append(slice(lo, hi))
    vol = vol[(slice(None), *box)]
    mask = vol.sum(0) > 0
    mean = np.array([v[mask].mean() for v in vol])
    std = np.array([v[mask].std() for v in vol])
    seg = _read(fake, case, "seg").astype(np.uint8)[tuple(box)]
    seg[seg == 4] = 3
    padded = np.zeros((4, *shape), np.float32)
    tseg = np.zeros(shape, np.uint8)
    src, dst = [], []
    for n, want in zip(seg.shape, shape, strict=True):
        assert n <= want, "the reference only pads"
        before = (want - n) // 2
        src.append(slice(0, n))
        dst.append(slice(before, before + n))
    padded[(slice(None), *dst)] = vol[(slice(None), *src)]
    tseg[tuple(dst)] = seg
    return (padded - mean[:, None, None, None]) / std[:, None, None, None], tseg


def test_prep_writes_mmformer_splits_and_preprocessed_cases(tmp_path: Path) -> None:
    fake = fake_raw.write_brats(tmp_path / "raw")
    out = tmp_path / "data"
    manifest = prepare(
        "brats2018",
        out,
        raw=tmp_path / "raw",
        workers=2,
        overrides=["shape=[16,16,16]", "val_fraction=0.25"],
    ).manifest
    assert manifest.task == "segmentation"
    assert manifest.classes == ["background", "necrotic", "edema", "enhancing"]
    assert [(m.name, m.dtype, m.shape) for m in manifest.modalities] == [
        (s, "float16", [1, 16, 16, 16]) for s in SEQ
    ]
    assert manifest.target is not None
    assert (manifest.target.dtype, manifest.target.shape) == ("uint8", [16, 16, 16])

    errors = pq.read_table(out / "errors.parquet").to_pandas().set_index("source")
    assert len(errors) == len(fake.failures) == 3
    for case, reason in fake.failures.items():
        assert reason in errors.loc[case, "reason"]

    test, *train_folds = _mmformer_folds(fake.cases)
    bad = set(fake.failures)
    ids = {s: set(ParquetSamples(out, s, SEQ).sample_ids) for s in manifest.splits}
    assert ids["test"] == test - bad
    assert ids["train"] | ids["val"] == (train_folds[0] | train_folds[1]) - bad
    assert ids["val"] and not ids["val"] & ids["train"]
    assert {s: info.samples for s, info in manifest.splits.items()} == {
        s: len(v) for s, v in ids.items()
    }

    seen_et = 0
    for split in manifest.splits:
        data = ParquetSamples(out, split, SEQ)
        batch = data.__getitems__(list(range(len(data))))
        assert batch.target is not None and batch.target.shape == (len(data), 16, 16, 16)
        for at, case in enumerate(data.sample_ids):
            assert batch.label[at].item() == (0 if case.startswith("HGG/") else 1)
            seg = _read(fake, case, "seg")
            stored = batch.target[at].numpy()
            assert set(np.unique(stored)) <= {0, 1, 2, 3}
            assert np.array_equal(stored == 3, seg == 4)  # 4 -> 3, nothing else moved
            assert np.array_equal(np.where(stored == 3, 4, stored), seg)
            seen_et += int((stored == 3).any())
            inputs, _ = _reference(fake, case, 128, [16, 16, 16])
            for k, name in enumerate(SEQ):
                got = batch.inputs[name][at, 0].numpy().astype(np.float32)
                np.testing.assert_allclose(got, inputs[k], atol=2e-3 * np.abs(inputs[k]).max())
    assert seen_et >= 5


def test_crop_box_and_fixed_shape_padding(tmp_path: Path) -> None:
    """With a small min_extent, mmFormer's crop is the brain box (last non-zero index as the
    end); the fixed shape pads it with the z-scored value of a zero voxel."""
    fake = fake_raw.write_brats(tmp_path / "raw", hgg=3, lgg=0, corrupt=False)
    out = tmp_path / "data"
    prepare(
        "brats2018",
        out,
        raw=tmp_path / "raw",
        workers=1,
        overrides=["shape=[14,16,12]", "min_extent=4", "val_fraction=0"],
    )
    data = ParquetSamples(out, ["train", "test"], SEQ)
    assert sorted(data.sample_ids) == sorted(fake.cases)
    batch = data.__getitems__(list(range(len(data))))
    for at, case in enumerate(data.sample_ids):
        inputs, seg = _reference(fake, case, 4, [14, 16, 12])
        assert np.array_equal(batch.target[at].numpy(), seg)
        for k, name in enumerate(SEQ):
            got = batch.inputs[name][at, 0].numpy().astype(np.float32)
            np.testing.assert_allclose(got, inputs[k], atol=2e-3 * np.abs(inputs[k]).max())


def test_a_shape_that_cuts_the_tumour_is_an_error(tmp_path: Path) -> None:
    fake_raw.write_brats(tmp_path / "raw", hgg=3, lgg=0, corrupt=False)
    out = tmp_path / "data"
    manifest = prepare(
        "brats2018", out, raw=tmp_path / "raw", workers=1, overrides=["shape=[16,16,4]"]
    ).manifest
    assert sum(split.samples for split in manifest.splits.values()) == 0
    errors = pq.read_table(out / "errors.parquet").to_pandas()
    assert len(errors) == 3 and errors["reason"].str.contains("cuts").all()


def test_lckd_lists_name_the_splits(tmp_path: Path) -> None:
    fake = fake_raw.write_brats(tmp_path / "raw", hgg=4, lgg=2, corrupt=False)
    prefix = "../data/BraTS-2018/MICCAI_BraTS_2018_Data_Training/"
    (tmp_path / "raw" / "train.csv").write_text("".join(prefix + c + "\n" for c in fake.cases[:4]))
    (tmp_path / "raw" / "val.csv").write_text("".join(prefix + c + "\n" for c in fake.cases[4:]))
    out = tmp_path / "data"
    lists = "lists={train: train.csv, val: val.csv}"
    manifest = prepare(
        "brats2018",
        out,
        raw=tmp_path / "raw",
        workers=1,
        overrides=["shape=[16,16,16]", "splits=lckd", lists],
    ).manifest
    assert set(ParquetSamples(out, "val", SEQ).sample_ids) == set(fake.cases[4:])
    assert {s: i.samples for s, i in manifest.splits.items()} == {"train": 4, "val": 2}
    (tmp_path / "raw" / "val.csv").write_text(prefix + "HGG/Brats18_NONE_1\n")
    with pytest.raises(UserError, match="no case folder HGG/Brats18_NONE_1"):
        prepare(
            "brats2018",
            tmp_path / "other",
            raw=tmp_path / "raw",
            overrides=["splits=lckd", lists],
        )


def test_fit_centers_crop_and_pad() -> None:
    a = np.arange(5 * 4).reshape(5, 4)
    out = fit(a, (3, 7), fill=-1)
    assert out.shape == (3, 7)
    assert np.array_equal(out[:, 1:5], a[1:4])  # crop (5 - 3) // 2 = 1 from the start
    assert (out[:, 0] == -1).all() and (out[:, 5:] == -1).all()  # pad 1 before, 2 after


def test_lckd_truncate_caps_outliers_and_zscores_the_foreground() -> None:
    rng = np.random.default_rng(0)
    mri = np.zeros((24, 24, 24), np.int16)
    mri[2:22, 2:22, 2:22] = rng.integers(100, 200, (20, 20, 20))
    mri[5, 5, 5:15] = 5000  # ten voxels far above the last bin holding 50 voxels
    out = lckd_truncate(mri)
    foreground = mri != 0
    assert (out[~foreground] == 0).all()
    assert abs(out[foreground].mean()) < 1e-6 and abs(out[foreground].std() - 1) < 1e-4
    assert out[5, 5, 5] <= out[foreground].max() and out[5, 5, 5] - out[2:22, 2:22, 2:4].max() < 0.1
