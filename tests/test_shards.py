"""Shard format v1: round trip, integrity checks, loader and sampler."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmval.data.dataset import BlockShuffleSampler, ParquetSamples
from mmval.data.prep import prepare
from mmval.data.shards import (
    INDEX,
    MANIFEST,
    ROW_GROUP_SIZE,
    DatasetHeader,
    ModalitySpec,
    ShardWriter,
    SplitSamples,
    check_data_dir,
    records_table,
    write_dataset,
    write_shard,
)
from mmval.errors import UserError


def _write(out: Path, n: int = 150) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "vec": rng.standard_normal((n, 5)).astype(np.float32),
        "img": rng.integers(0, 255, (n, 2, 3, 4)).astype(np.uint8),
        "spec": rng.standard_normal((n, 7, 3)).astype(np.float16),
    }
    specs = [
        ModalitySpec(name=k, dtype=str(v.dtype), shape=list(v.shape[1:])) for k, v in arrays.items()
    ]
    samples = SplitSamples(
        sample_ids=[f"s{i:04d}" for i in range(n)],
        labels=np.arange(n) % 3,
        sources=[f"raw/{i}" for i in range(n)],
        arrays=arrays,
    )
    header = DatasetHeader("toy", "1", "0" * 64, ["a", "b", "c"], specs, {"k": 1})
    write_dataset(out, header, {"train": samples}, errors=[("raw/broken.bin", "could not decode")])
    return arrays


def test_round_trip_exact(tmp_path):
    arrays = _write(tmp_path)
    manifest = check_data_dir(tmp_path, verify_checksums=True)
    assert manifest.splits["train"].samples == 150
    ds = ParquetSamples(tmp_path, "train", ["vec", "img", "spec"])
    batch = ds.__getitems__(list(range(len(ds))))
    rows = [int(s[1:]) for s in ds.sample_ids]
    for name, values in arrays.items():
        assert batch.inputs[name].numpy().tobytes() == values[rows].tobytes()
        assert batch.inputs[name].dtype.itemsize == values.dtype.itemsize
    assert batch.label.tolist() == [r % 3 for r in rows]
    errors = pq.read_table(tmp_path / "errors.parquet").to_pylist()
    assert errors == [{"source": "raw/broken.bin", "reason": "could not decode"}]
    # rows were permuted so row groups mix classes, and the index points at them exactly
    index = pq.read_table(tmp_path / INDEX).to_pandas()
    assert index["sample_id"].tolist() != sorted(index["sample_id"])
    shard = pq.ParquetFile(tmp_path / index["shard"][0])
    assert shard.metadata.row_group(0).num_rows == 64
    first = shard.read_row_group(int(index["row_group"][70]), columns=["sample_id"])
    assert first.column(0)[int(index["row"][70])].as_py() == index["sample_id"][70]


def test_writing_twice_gives_identical_bytes(tmp_path):
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    a = json.loads((tmp_path / "a" / MANIFEST).read_text())
    b = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert a["splits"] == b["splits"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_missing_shard_is_reported(tmp_path):
    _write(tmp_path)
    (tmp_path / "train" / "part-00000.parquet").unlink()
    with pytest.raises(UserError, match=r"part-00000.parquet \(train\) is missing"):
        check_data_dir(tmp_path)


def test_truncated_shard_is_reported(tmp_path):
    _write(tmp_path)
    path = tmp_path / "train" / "part-00000.parquet"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(UserError, match="bytes, the manifest says"):
        check_data_dir(tmp_path)


def test_flipped_bytes_fail_the_checksum(tmp_path):
    _write(tmp_path)
    path = tmp_path / "train" / "part-00000.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    check_data_dir(tmp_path)  # sizes and footer still agree
    with pytest.raises(UserError, match="does not match its sha256"):
        check_data_dir(tmp_path, verify_checksums=True)


def test_missing_manifest_means_unprepared(tmp_path):
    _write(tmp_path)
    (tmp_path / MANIFEST).unlink()
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        check_data_dir(tmp_path)


def test_unknown_split_and_modality(tmp_path):
    _write(tmp_path)
    with pytest.raises(UserError, match="no split 'test'"):
        ParquetSamples(tmp_path, "test", ["vec"])
    with pytest.raises(UserError, match="no modality 'audio'"):
        ParquetSamples(tmp_path, "train", ["audio"])


def test_sampler_resume_is_exact_and_ranks_are_disjoint():
    blocks = np.repeat(np.arange(20), 16)[:300]
    sampler = BlockShuffleSampler(blocks, seed=5)
    sampler.set_epoch(3)
    full = list(sampler)
    assert sorted(full) == list(range(300)) and full != list(range(300))
    resumed = BlockShuffleSampler(blocks, seed=0)
    resumed.load_state_dict({"seed": 5, "epoch": 3, "consumed": 100})
    assert list(resumed) == full[100:]
    sampler.set_epoch(4)
    assert list(sampler) != full
    ranks = [BlockShuffleSampler(blocks, seed=5, num_replicas=3, rank=r) for r in range(3)]
    for r in ranks:
        r.set_epoch(3)
    parts = [list(r) for r in ranks]
    assert all(len(p) == 100 for p in parts)
    assert sorted(np.concatenate(parts).tolist()) == list(range(300))


def test_sampler_windows_keep_batches_on_few_row_groups():
    blocks = np.repeat(np.arange(40), 64)
    sampler = BlockShuffleSampler(blocks, seed=0, window=8)
    order = np.array(list(sampler))
    first_window = set(blocks[order[: 8 * 64]])
    assert len(first_window) == 8


def test_sampler_positions_allow_repeats():
    sampler = BlockShuffleSampler(np.zeros(10, int), seed=0)
    sampler.set_positions(np.array([1, 1, 1, 4]))
    assert sorted(sampler) == [1, 1, 1, 4] and len(sampler) == 4


def test_prep_uci_mfeat_split_and_standardisation(uci_dir):
    manifest = check_data_dir(uci_dir, verify_checksums=True)
    assert {k: v.samples for k, v in manifest.splits.items()} == {
        "train": 1400,
        "val": 200,
        "test": 400,
    }
    assert [m.name for m in manifest.modalities] == ["fou", "fac", "kar", "pix", "zer", "mor"]
    assert [m.shape[0] for m in manifest.modalities] == [76, 216, 64, 240, 47, 6]
    train = ParquetSamples(uci_dir, "train", ["pix"])
    x = train.__getitems__(list(range(len(train)))).inputs["pix"].numpy()
    assert np.allclose(x.mean(0), 0, atol=1e-4)
    assert np.bincount(train.labels).tolist() == [140] * 10
    ids = set(train.sample_ids)
    test = ParquetSamples(uci_dir, "test", ["pix"])
    assert not ids & set(test.sample_ids)
    # a second prep with the same settings verifies and keeps the output
    assert not prepare("uci-mfeat", uci_dir).wrote


def test_prep_refuses_other_settings_without_overwrite(tmp_path):
    prepare("synthetic", tmp_path, overrides=["per_class={train: 5, val: 2, test: 2}"])
    with pytest.raises(UserError, match="--overwrite"):
        prepare("synthetic", tmp_path, overrides=["per_class={train: 6, val: 2, test: 2}"])
    result = prepare(
        "synthetic", tmp_path, overrides=["per_class={train: 6, val: 2, test: 2}"], overwrite=True
    )
    assert result.wrote and result.manifest.splits["train"].samples == 24


def test_synthetic_is_deterministic_and_validated(tmp_path):
    a = prepare("synthetic", tmp_path / "a").manifest
    b = prepare("synthetic", tmp_path / "b").manifest
    assert a.splits == b.splits
    with pytest.raises(UserError, match="signal"):
        prepare("synthetic", tmp_path / "c", overrides=["signal=[1.0]"])


def _records(n: int) -> tuple[list, list[ModalitySpec]]:
    rng = np.random.default_rng(1)
    spec = ModalitySpec(name="spec", dtype="float16", shape=[7, 3])
    samples = SplitSamples(
        sample_ids=[f"s{i:04d}" for i in range(n)],
        labels=np.arange(n) % 3,
        sources=[f"raw/{i}" for i in range(n)],
        arrays={"spec": rng.standard_normal((n, 7, 3)).astype(np.float16)},
    )
    return samples.records(range(n)), [spec]


@pytest.mark.parametrize("n", [1, ROW_GROUP_SIZE, 2 * ROW_GROUP_SIZE + 5])
def test_a_shard_written_as_its_rows_come_is_the_same_file(tmp_path, n):
    # row group by row group, holding at most one row group: the bytes of one write
    records, specs = _records(n)
    whole = write_shard(tmp_path, "whole.parquet", records_table(records, "train", specs), specs)
    with ShardWriter(tmp_path, "streamed.parquet", "train", specs) as writer:
        for record in records:
            writer.add(record)
            assert len(writer._rows) < ROW_GROUP_SIZE
    assert writer.info is not None
    assert writer.info.model_dump() == whole.model_dump() | {"path": "streamed.parquet"}
    assert (tmp_path / "streamed.parquet").read_bytes() == (tmp_path / "whole.parquet").read_bytes()


def test_a_shard_writer_leaves_nothing_without_rows_or_after_an_error(tmp_path):
    records, specs = _records(ROW_GROUP_SIZE + 3)
    with ShardWriter(tmp_path, "empty.parquet", "train", specs) as writer:
        pass
    assert writer.info is None
    with pytest.raises(KeyboardInterrupt), ShardWriter(tmp_path, "x.parquet", "train", specs) as w:
        for record in records:
            w.add(record)
        raise KeyboardInterrupt
    assert w.info is None and list(tmp_path.iterdir()) == []  # no shard, no temp file
