"""Data integrity beyond the shards' checksums: a tampered index, shard paths that leave the
data folder, and non-finite inputs are refused (exit 2, naming the sample) instead of training
on wrong data or ending in a traceback (issue 19, point 1)."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data import shards as shards_module
from mmval.data.dataset import ParquetSamples
from mmval.data.pipeline import ClipTask, PrepPlan, run_plan
from mmval.data.shards import (
    INDEX,
    INDEX_SCHEMA,
    MANIFEST,
    DatasetHeader,
    ModalitySpec,
    SampleRecord,
    SplitSamples,
    check_data_dir,
    decode_tensor_column,
    load_manifest,
    write_dataset,
    write_shard,
)
from mmval.engine.loop import NonFiniteLoss
from mmval.errors import UserError
from mmval.recipe import load_recipe
from mmval.runner import Trainer

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path: Path, synthetic_dir: Path) -> Path:
    """A copy of the synthetic data set (splits train 240, val 40, test 80; views a, b, c)."""
    copy = tmp_path / "data"
    shutil.copytree(synthetic_dir, copy)
    return copy


def _manifest(data: Path) -> dict:
    return json.loads((data / MANIFEST).read_text())


def _save_manifest(data: Path, manifest: dict) -> None:
    (data / MANIFEST).write_text(json.dumps(manifest))


def tamper_index(data: Path, change: Callable[[pd.DataFrame], pd.DataFrame], checksum: str) -> None:
    """Rewrite index.parquet through `change`. `checksum`: "keep" leaves the manifest as it
    is; "update" is a tamperer who also fixes the index sha256 in the manifest; "drop" removes
    it, as in a folder prepared before the manifest held one."""
    index = change(pq.read_table(data / INDEX).to_pandas())
    pq.write_table(pa.Table.from_pandas(index, INDEX_SCHEMA, preserve_index=False), data / INDEX)
    manifest = _manifest(data)
    if checksum != "keep" and "index_sha256" in manifest:
        if checksum == "update":
            manifest["index_sha256"] = shards_module.sha256_file(data / INDEX)
        else:
            del manifest["index_sha256"]
    _save_manifest(data, manifest)


def read_all(data: Path, split: str) -> None:
    samples = ParquetSamples(data, split, ["a", "b", "c"])
    samples.__getitems__(list(range(len(samples))))


def shift_labels(index: pd.DataFrame) -> pd.DataFrame:
    return index.assign(label=(index["label"] + 1) % 4)


def test_new_data_folders_record_the_index_sha256(data):
    manifest = load_manifest(data)
    assert manifest.index_sha256 == shards_module.sha256_file(data / INDEX)


def test_shifted_labels_are_refused_by_the_index_checksum(data, recipe_file):
    tamper_index(data, shift_labels, "keep")
    with pytest.raises(UserError, match=r"index\.parquet does not match its sha256") as caught:
        check_data_dir(data)
    assert str(data) in str(caught.value) and "--overwrite" in str(caught.value)
    path = recipe_file(data__path=str(data), train__epochs=1)
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2, result.output  # today: trains on wrong labels, exit 0
    assert "index.parquet does not match its sha256" in " ".join(result.output.split())


@pytest.mark.parametrize("checksum", ["update", "drop"])
def test_shifted_labels_without_a_valid_checksum_are_found_in_the_shards(data, checksum):
    tamper_index(data, shift_labels, checksum)
    check_data_dir(data)  # structure and counts agree: only the shards can tell
    with pytest.raises(UserError) as caught:
        read_all(data, "train")  # first read of each row group compares the index rows
    message = " ".join(str(caught.value).split())
    assert str(data) in message and "split train" in message and "label" in message
    assert "--overwrite" in message
    sample = message.split("sample ")[1].split()[0].strip("',;:")
    assert sample in pq.read_table(data / INDEX).column("sample_id").to_pylist()
    with pytest.raises(UserError, match=r"holds sample .* with label \d there"):
        check_data_dir(data, verify_checksums=True, cached=True)  # the full pass


@pytest.mark.parametrize("checksum", ["keep", "update", "drop"])
def test_an_index_listing_half_the_test_rows_is_refused(data, checksum):
    def halve(index: pd.DataFrame) -> pd.DataFrame:
        test = index.index[index["split"] == "test"]
        return index.drop(test[: len(test) // 2])

    tamper_index(data, halve, checksum)
    if checksum == "keep":
        with pytest.raises(UserError, match=r"index\.parquet does not match its sha256"):
            check_data_dir(data)
        return
    with pytest.raises(
        UserError, match=r"split test: index\.parquet lists 40 samples, the manifest"
    ):
        check_data_dir(data)
    with pytest.raises(UserError, match="split test"):
        ParquetSamples(data, "test", ["a"])


def _outside_copy(data: Path) -> tuple[Path, str]:
    """A real shard copied next to the data folder, and the index's path of the original."""
    rel = _manifest(data)["splits"]["test"]["shards"][0]["path"]
    outside = data.parent / "outside"
    outside.mkdir()
    shutil.copy(data / rel, outside / "x.parquet")
    return outside / "x.parquet", rel


@pytest.mark.parametrize("where", ["dotdot", "absolute"])
@pytest.mark.parametrize("checksum", ["update", "drop"])
def test_index_rows_pointing_outside_the_folder_are_refused(data, where, checksum):
    outside, rel = _outside_copy(data)
    path = "../outside/x.parquet" if where == "dotdot" else str(outside)
    tamper_index(data, lambda i: i.assign(shard=i["shard"].replace(rel, path)), checksum)
    with pytest.raises(UserError) as caught:
        check_data_dir(data)
    message = " ".join(str(caught.value).split())
    assert path in message and "split test" in message and "sample" in message
    assert "not a shard the manifest lists" in message
    with pytest.raises(UserError):
        ParquetSamples(data, "test", ["a"])  # today: reads the file outside


def test_a_manifest_and_index_pointing_outside_the_folder_are_refused(data):
    _, rel = _outside_copy(data)
    path = "../outside/x.parquet"
    tamper_index(data, lambda i: i.assign(shard=i["shard"].replace(rel, path)), "drop")
    manifest = _manifest(data)
    manifest["splits"]["test"]["shards"][0]["path"] = path
    _save_manifest(data, manifest)
    with pytest.raises(UserError, match=r"\.\./outside/x\.parquet .*outside the data folder"):
        check_data_dir(data)


def test_a_shard_symlinked_outside_the_folder_is_refused(data):
    outside, rel = _outside_copy(data)
    (data / rel).unlink()
    os.symlink(outside, data / rel)  # same bytes: only where it lies is wrong
    with pytest.raises(UserError, match=r"resolves outside the data folder"):
        check_data_dir(data)


BAD_ROWS = {
    "row beyond the row group": ("row", 999, "row 999"),
    "negative row": ("row", -1, "row -1"),
    "row group beyond the shard": ("row_group", 50, "row group 50"),
    "label beyond the classes": ("label", 99, "label 99"),
    "negative label": ("label", -3, "label -3"),
}


@pytest.mark.parametrize("bad", sorted(BAD_ROWS))
def test_a_bad_row_number_or_label_is_a_user_error(data, bad):
    column, value, says = BAD_ROWS[bad]

    def poke(index: pd.DataFrame) -> pd.DataFrame:
        index.loc[index.index[5], column] = value  # row 5: a train sample
        return index

    tamper_index(data, poke, "update")
    sample = pq.read_table(data / INDEX).column("sample_id")[5].as_py()
    with pytest.raises(UserError) as caught:
        read_all(data, "train")  # today: an IndexError traceback, or a label out of range
    message = " ".join(str(caught.value).split())
    assert says in message and f"sample {sample!r}" in message and "split train" in message


# ------------------------------------------------------------------------ non-finite values
def poison_shard(data: Path, split: str, modality: str, row: int, value: float) -> str:
    """Write `value` into one sample of a stored shard, the manifest updated to its size and
    sha256 (a folder prepared before prep refused non-finite values); its sample id."""
    manifest = load_manifest(data)
    shard = manifest.splits[split].shards[0]
    spec = manifest.modality(modality)
    table = pq.read_table(data / shard.path)
    values = decode_tensor_column(table.column(modality), spec).copy()
    values[row, 0] = value
    column = shards_module._tensor_column(list(values), spec)
    table = table.set_column(table.schema.get_field_index(modality), table.field(modality), column)
    info = write_shard(data, shard.path, table, manifest.modalities)
    raw = _manifest(data)
    raw["splits"][split]["shards"][0] = info.model_dump()
    _save_manifest(data, raw)
    return table.column("sample_id")[row].as_py()


def test_nan_in_a_test_modality_exits_2_naming_the_sample(data, recipe_file):
    sample = poison_shard(data, "test", "b", row=7, value=math.nan)
    path = recipe_file(data__path=str(data), train__epochs=1)
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2, result.output  # today: exit 0, every prediction class 0
    output = " ".join(result.output.split())
    assert f"sample {sample!r}" in output and "modality 'b'" in output
    assert "split test" in output and "Traceback" not in output


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_in_a_train_modality_exits_2_naming_the_sample_not_the_lr(data, recipe_file, value):
    sample = poison_shard(data, "train", "a", row=3, value=value)
    path = recipe_file(data__path=str(data), train__epochs=1)
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert f"sample {sample!r}" in output and "modality 'a'" in output
    assert "optim.lr" not in output  # today: "Lower optim.lr"


def test_nonfinite_step_names_the_input_when_the_input_is_the_cause(recipe_file, monkeypatch):
    """An input that turns non-finite after reading (here: put in by hand) is what the
    train.nonfinite message names, with its sample id and modality, not the learning rate."""
    read = ParquetSamples.__getitems__
    poisoned: list[str] = []

    def getitems(self, entries):
        batch = read(self, entries)
        if self.train and not poisoned:
            batch.inputs["c"][2, 0] = math.inf
            poisoned.append(self.sample_ids[int(batch.index[2])])
        return batch

    monkeypatch.setattr(ParquetSamples, "__getitems__", getitems)
    recipe = load_recipe(recipe_file(train__epochs=1))
    with pytest.raises(NonFiniteLoss) as caught:
        Trainer(recipe, 0).run()
    message = " ".join(str(caught.value).split())
    assert f"'{poisoned[0]}'" in message and "modality 'c'" in message
    assert "optim.lr" not in message


def test_prep_sends_non_finite_samples_to_the_errors_table(tmp_path):
    n = 20
    values = np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    values[4, 1] = np.nan
    values[9, 0] = -np.inf
    spec = ModalitySpec(name="x", dtype="float32", shape=[3])
    samples = SplitSamples(
        sample_ids=[f"s{i:02d}" for i in range(n)],
        labels=np.arange(n) % 2,
        sources=[f"raw/{i}" for i in range(n)],
        arrays={"x": values},
    )
    header = DatasetHeader("toy", "1", "0" * 64, ["a", "b"], [spec], {})
    manifest = write_dataset(tmp_path, header, {"test": samples})
    assert manifest.splits["test"].samples == n - 2
    errors = pd.read_parquet(tmp_path / "errors.parquet")
    assert sorted(errors["source"]) == ["raw/4", "raw/9"]
    assert all("modality 'x'" in r and "NaN or Inf" in r for r in errors["reason"])
    ids = pq.read_table(tmp_path / INDEX).column("sample_id").to_pylist()
    assert "s04" not in ids and "s09" not in ids
    read = ParquetSamples(tmp_path, "test", ["x"])
    assert np.isfinite(read.__getitems__(list(range(len(read)))).inputs["x"].numpy()).all()


def nan_extract(task: ClipTask) -> SampleRecord:
    """A fake extractor giving clip 1 a NaN feature."""
    value = np.full(2, np.nan if task.sample_id == "c1" else task.label, np.float32)
    return SampleRecord(task.sample_id, task.label, task.source, {"x": value})


def test_streaming_prep_sends_non_finite_samples_to_the_errors_table(tmp_path):
    tasks = [ClipTask(f"c{i}", i % 2, f"clips/{i}.mp4", {}) for i in range(4)]
    spec = ModalitySpec(name="x", dtype="float32", shape=[2])
    plan = PrepPlan(["a", "b"], [spec], {}, {"train": tasks}, nan_extract, rows_per_shard=3)
    header = DatasetHeader("fake", "1", "0" * 64, ["a", "b"], [spec], {})
    manifest, summary = run_plan(plan, tmp_path, header, workers=1)
    errors = pd.read_parquet(tmp_path / "errors.parquet")
    assert errors["source"].tolist() == ["clips/1.mp4"]
    assert "modality 'x'" in errors["reason"][0]
    assert manifest.splits["train"].samples == 3 and summary.splits["train"].failed == 1
