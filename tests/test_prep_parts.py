"""`mmval prep` split across machines: parts (`--shard-index/--num-shards`) then `--merge` give
the data set one prep gives; missing, unfinished or mismatched parts are refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mmval.cli.main import app
from typer.testing import CliRunner

import mmval.data.shards as shards_module
from mmval.data.dataset import ParquetSamples
from mmval.data.pipeline import PartSpec, assign_parts
from mmval.data.prep import merge_parts, prepare
from mmval.data.shards import sha256_file
from mmval.data.synthetic_av import SyntheticAVParams, write_synthetic_raw
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer

runner = CliRunner()
SETS = [
    "modalities.0.size=[32,32]",
    "modalities.0.pick=2",
    "modalities.1.target_frames=64",
    "modalities.1.num_mel_bins=32",
    "rows_per_shard=4",
]
PARTS = 3


def cli_prep(raw: Path, out: Path, *extra: str) -> list[str]:
    args = ["prep", "kinetics-sounds", "--raw", str(raw), "--out", str(out), "--workers", "1"]
    return [*args, *(x for s in SETS for x in ("--set", s)), *extra]


@pytest.fixture(scope="module")
def prepped(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic Kinetics-Sounds clips (2 undecodable, 1 listed without a file), prepared once
    in one piece and once in 3 parts through the CLI, then merged."""
    root = tmp_path_factory.mktemp("parts")
    raw = root / "raw"
    params = SyntheticAVParams(
        layout="kinetics-sounds",
        classes=["0", "1", "2"],
        clips_per_class=6,
        seconds=2.0,
        visual_signal=1.0,
        audio_signal=0.8,
    )
    clips = write_synthetic_raw(raw, params)
    train = [c for c in clips if c.split == "train"]
    test = [c for c in clips if c.split == "test"]
    train[0].video.write_bytes(b"")
    test[0].video.write_bytes(b"broken")
    test[1].video.unlink()  # listed, no file: a planning error
    prepare("kinetics-sounds", root / "one", raw=raw, overrides=SETS, workers=1)
    for i in range(PARTS):
        args = cli_prep(raw, root / "parts", "--shard-index", str(i), "--num-shards", str(PARTS))
        args += ["--max-failures", "0.5"]  # 2 of part 0's 16 inputs fail
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert "--merge" in result.output
    result = runner.invoke(
        app, ["prep", "kinetics-sounds", "--out", str(root / "parts"), "--merge"]
    )
    assert result.exit_code == 0, result.output
    assert f"merged {PARTS} parts" in " ".join(result.output.split())
    return {"raw": raw, "one": root / "one", "parts": root / "parts"}


def rows_by_id(root: Path) -> dict[tuple[str, str], dict]:
    """Every stored sample of a data directory, all columns, read through its manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    rows = {}
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for row in pq.read_table(root / shard["path"]).to_pylist():
                rows[row["split"], row["sample_id"]] = row
    return rows


def test_assign_parts_cuts_all_shards_into_contiguous_even_runs():
    owners = assign_parts({"train": 4, "test": 5, "val": 1}, 3)
    # shard k of the 10 (train 0-3, test 4-8, val 9) goes to part floor(3k / 10)
    assert owners == {"train": [0, 0, 0, 0], "test": [1, 1, 1, 2, 2], "val": [2]}
    for count in (1, 2, 3, 7, 10):
        flat = [o for v in assign_parts({"a": 7, "b": 2, "c": 1}, count).values() for o in v]
        assert flat == sorted(flat) and set(flat) == set(range(count))
        sizes = np.bincount(flat, minlength=count)
        assert sizes.max() - sizes.min() <= 1
    assert assign_parts({"a": 1}, 3) == {"a": [0]}  # fewer shards than parts: some stay empty


def test_merged_parts_hold_what_one_prep_holds(prepped):
    one, merged = prepped["one"], prepped["parts"]
    # each part is a data directory of its own, with a share of the shards, none twice
    part_shards = []
    for i in range(PARTS):
        manifest = json.loads((merged / PartSpec(i, PARTS).name / "manifest.json").read_text())
        part_shards.append([s["path"] for v in manifest["splits"].values() for s in v["shards"]])
        assert part_shards[-1]
    flat = [p for shards in part_shards for p in shards]
    assert len(flat) == len(set(flat))
    # same samples: ids, splits, labels and every column's bytes
    assert rows_by_id(merged) == rows_by_id(one)
    # the same index rows in the same order, the shard paths under their part folder
    a = pd.read_parquet(one / "index.parquet")
    b = pd.read_parquet(merged / "index.parquet")
    assert b["shard"].str.match(r"part-\d{5}-of-00003/").all()
    b["shard"] = b["shard"].str.split("/", n=1).str[1].astype(a["shard"].dtype)
    pd.testing.assert_frame_equal(a, b)
    errors_one = pq.read_table(one / "errors.parquet")
    assert errors_one.num_rows == 3
    assert pq.read_table(merged / "errors.parquet").equals(errors_one)
    # the manifests differ only in where the shards are and in the record of the parts
    ma = json.loads((one / "manifest.json").read_text())
    mb = json.loads((merged / "manifest.json").read_text())
    assert mb["extraction"].pop("parts")["count"] == PARTS
    mb.pop("extraction_sha256"), ma.pop("extraction_sha256")
    # each index sha256 is its own file's (the merged index names the part folders)
    assert ma.pop("index_sha256") == sha256_file(one / "index.parquet")
    assert mb.pop("index_sha256") == sha256_file(merged / "index.parquet")
    for split in mb["splits"].values():
        for shard in split["shards"]:
            shard["path"] = shard["path"].split("/", 1)[1]
    assert ma == mb  # sha256 included: the shard files are the same bytes
    # and the loader gives the same items at the same positions
    names = ["visual", "audio"]
    for split in ma["splits"]:
        x, y = ParquetSamples(one, split, names), ParquetSamples(merged, split, names)
        assert x.sample_ids == y.sample_ids and (x.block_ids() == y.block_ids()).all()
        bx, by = x.__getitems__(range(len(x))), y.__getitems__(range(len(y)))
        assert torch.equal(bx.label, by.label)
        for name in names:
            assert torch.equal(bx.inputs[name], by.inputs[name])


def test_merge_is_idempotent_and_never_leaves_a_torn_output(prepped, tmp_path, monkeypatch):
    out = tmp_path / "parts"
    shutil.copytree(prepped["parts"], out)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = merge_parts("kinetics-sounds", out)
    assert not result.wrote
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same arguments as the parts are accepted (checked), and the raw folder is re-planned
    assert not merge_parts("kinetics-sounds", out, raw=prepped["raw"], overrides=SETS).wrote

    (out / "index.parquet").unlink()

    def crash(target: Path, text: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(shards_module, "write_text_atomic", crash)
    with pytest.raises(OSError):
        merge_parts("kinetics-sounds", out)
    assert not (out / "manifest.json").exists()  # no manifest over a half-written merge
    with pytest.raises(UserError, match=r"manifest\.json is missing"):
        ParquetSamples(out, "train", ["audio"])
    monkeypatch.undo()
    assert merge_parts("kinetics-sounds", out).wrote
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_missing_and_unfinished_parts_are_named(prepped, tmp_path):
    out = tmp_path / "parts"
    shutil.copytree(prepped["parts"], out)
    shutil.rmtree(out / "part-00001-of-00003")
    (out / "part-00002-of-00003/manifest.json").unlink()
    result = runner.invoke(app, ["prep", "kinetics-sounds", "--out", str(out), "--merge"])
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "part 1 of 3 (part-00001-of-00003) is missing" in text
    assert "part 2 of 3 (part-00002-of-00003) is incomplete" in text
    assert "part 0" not in text
    # a stray part of another split is refused too, and so is a one-piece prep into the folder
    shutil.copytree(prepped["parts"] / "part-00001-of-00003", out / "part-00001-of-00004")
    with pytest.raises(UserError, match="part-00001-of-00004"):
        merge_parts("kinetics-sounds", out, count=3)
    (out / "manifest.json").unlink()  # the earlier merge, kept by the refused one
    with pytest.raises(UserError, match="holds parts"):
        prepare("kinetics-sounds", out, raw=prepped["raw"], overrides=SETS, workers=1)


def test_a_part_prepared_differently_is_refused(prepped, tmp_path):
    out = tmp_path / "parts"
    shutil.copytree(prepped["parts"], out)
    other = [*SETS[:-2], "modalities.1.num_mel_bins=16", SETS[-1]]
    prepare(
        "kinetics-sounds",
        out,
        raw=prepped["raw"],
        overrides=other,
        workers=1,
        overwrite=True,
        part=PartSpec(2, PARTS),
    )
    assert not (out / "manifest.json").exists()  # the old merge no longer holds
    with pytest.raises(UserError) as caught:
        merge_parts("kinetics-sounds", out)
    message = str(caught.value)
    assert "part 2 (part-00002-of-00003) was prepared with other parameters than part(s) 0, 1" in (
        message
    )
    assert "num_mel_bins: 16 vs 32" in message
    assert "part 0 (" not in message and "part 1 (" not in message
    # arguments given to the merge must be those of the parts
    shutil.rmtree(out)
    shutil.copytree(prepped["parts"], out)
    with pytest.raises(UserError, match="num_mel_bins: 16 vs 32"):
        merge_parts("kinetics-sounds", out, overrides=other)
    with pytest.raises(UserError, match="'kinetics-sounds', not 'crema-d'"):
        merge_parts("crema-d", out)
    # a part whose outputs do not account for its share of the inputs
    errors = out / "part-00000-of-00003/errors.parquet"
    pq.write_table(pq.read_table(errors).slice(0, 1), errors)
    with pytest.raises(UserError, match=r"part 0 \(part-00000-of-00003\) accounts for 14 samples"):
        merge_parts("kinetics-sounds", out)
    shutil.copy(prepped["parts"] / "part-00000-of-00003/errors.parquet", errors)
    # a raw folder that now lists other clips than the parts saw
    raw = tmp_path / "raw"
    shutil.copytree(prepped["raw"], raw)
    next(raw.rglob("*.mp4")).unlink()
    with pytest.raises(UserError, match="lists other inputs"):
        merge_parts("kinetics-sounds", out, raw=raw)


def test_image_text_parts_carry_the_tokenizer(tmp_path):
    """Every part fits the same tokenizer on the whole training split; the merge copies it."""
    import tests.image_text_raw as fake_raw

    fake_raw.mvsa_multiple(tmp_path / "raw", per_class=10)
    sets = ["image.size=[16,16]", "image.short_side=20", "rows_per_shard=4"]
    kwargs = {"raw": tmp_path / "raw", "overrides": sets, "workers": 1}
    prepare("mvsa-multiple", tmp_path / "one", **kwargs)
    for i in range(2):
        prepare("mvsa-multiple", tmp_path / "parts", part=PartSpec(i, 2), **kwargs)
    merge_parts("mvsa-multiple", tmp_path / "parts")
    assert rows_by_id(tmp_path / "parts") == rows_by_id(tmp_path / "one")
    name = "tokenizer-text.json"
    assert (tmp_path / "parts" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    errors = pq.read_table(tmp_path / "one/errors.parquet")
    assert errors.num_rows > 0  # posts dropped while planning: listed once, by part 0
    assert pq.read_table(tmp_path / "parts/errors.parquet").equals(errors)


def test_merge_exit_1_above_max_failures(prepped, tmp_path):
    out = tmp_path / "parts"
    shutil.copytree(prepped["parts"], out)
    args = ["prep", "kinetics-sounds", "--out", str(out), "--merge", "--max-failures", "0.01"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "--max-failures" in result.output
    assert "verified" in result.output  # nothing rewritten


def test_training_on_merged_parts_equals_training_on_one_prep(prepped, tmp_path, one_thread):
    losses = []
    for data in (prepped["one"], prepped["parts"]):
        recipe = parse_recipe(
            {
                "name": data.name,
                "seeds": [0],
                "data": {"path": str(data)},
                "model": {"encoder": {"kind": "resnet18"}, "fusion": "concat"},
                "method": {"name": "concat"},
                "optim": {"name": "adam", "lr": 0.001},
                "train": {"epochs": 1, "batch_size": 8, "device": "cpu"},
                "output": str(tmp_path / "runs"),
            },
            "test",
        )
        run = Trainer(recipe, 0).run()
        metrics = pd.read_parquet(run.run_dir / "metrics.parquet")
        losses.append(metrics.drop(columns=[c for c in metrics if "seconds" in c]))
    assert np.isfinite(losses[0]["train_loss"]).all()
    pd.testing.assert_frame_equal(losses[0], losses[1])
