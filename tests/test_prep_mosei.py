"""`mmval prep cmu-mosei` / `cmu-mosi` on small fake MulT pickles with the real shapes."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer

MODALITIES = {"text": "text", "audio": "audio", "visual": "vision"}  # mmval name -> pickle key
SIZES = {"train": 12, "valid": 4, "test": 6}
SCORES = [-2.6, -0.4, 0.0, 0.2, 1.0, 2.8]  # cycled; 0.0 is kept and is positive


def fake_mult(dims: dict[str, int], steps: dict[str, int], byte_ids: bool) -> dict:
    """A MulT-style pickle payload: float64 audio with -inf, float32 visual with one nan,
    labels [N, 1, 1], ids [N, 3]; rows 0 and 1 of a split share an id (two segments of
    one video), the others are `<split><row>`."""
    rng = np.random.default_rng(0)
    data = {}
    for split, n in SIZES.items():
        part: dict = {
            "text": rng.standard_normal((n, steps["text"], dims["text"])).astype(np.float32),
            "audio": rng.standard_normal((n, steps["audio"], dims["audio"])),
            "vision": rng.standard_normal((n, steps["visual"], dims["visual"])).astype(np.float32),
        }
        part["audio"][0, :3, 0] = -np.inf
        part["audio"][n - 1, 0, :2] = -np.inf
        part["vision"][1, 0, 0] = np.nan
        scores = np.resize(np.array(SCORES, np.float32), n)
        part["labels"] = scores.reshape(n, 1, 1)
        ids = [[f"{split}vid" if row < 2 else f"{split}{row}", "0.0", "3.5"] for row in range(n)]
        part["id"] = np.array(ids, dtype="S" if byte_ids else "U")
        data[split] = part
    return data


def expected(part: dict, key: str) -> np.ndarray:
    return np.nan_to_num(part[key].astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)


def row_of(sample_id: str, key: str) -> int:
    """The pickle row of a prepared sample: `trainvid_0.0_3.5[1]` -> 1, `train7_0.0_3.5` -> 7."""
    head = sample_id.split("_")[0].removeprefix(key)
    return int(sample_id[-2]) if head == "vid" else int(head)


def read_split(out: Path, split: str) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    ds = ParquetSamples(out, split, list(MODALITIES))
    batch = ds.__getitems__(list(range(len(ds))))
    return ds.sample_ids, batch.label.numpy(), {m: x.numpy() for m, x in batch.inputs.items()}


def check_prepared(out: Path, data: dict, shapes: dict[str, list[int]]) -> None:
    """Every sample of every split reads back with its cleaned features and binary label."""
    for split, key in (("train", "train"), ("val", "valid"), ("test", "test")):
        ids, labels, inputs = read_split(out, split)
        n = SIZES[key]
        assert len(ids) == n
        rows = [row_of(i, key) for i in ids]
        assert sorted(rows) == list(range(n))
        assert f"{key}vid_0.0_3.5[1]" in ids and f"{key}{n - 1}_0.0_3.5" in ids
        scores = data[key]["labels"][rows, 0, 0]
        np.testing.assert_array_equal(labels, (scores >= 0).astype(np.int64))
        for name, pickle_key in MODALITIES.items():
            x = inputs[name]
            assert x.dtype == np.float32 and list(x.shape[1:]) == shapes[name]
            assert np.isfinite(x).all()
            np.testing.assert_array_equal(x, expected(data[key], pickle_key)[rows])


@pytest.fixture(scope="module")
def mosei(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dims = {"text": 300, "audio": 74, "visual": 35}
    data = fake_mult(dims, {"text": 50, "audio": 500, "visual": 500}, byte_ids=False)
    raw = tmp_path_factory.mktemp("raw-mosei")
    (raw / "mosei_senti_data_noalign.pkl").write_bytes(pickle.dumps(data, protocol=4))
    out = tmp_path_factory.mktemp("data") / "cmu-mosei"
    result = prepare("cmu-mosei", out, raw=raw)
    return out, {"data": data, "manifest": result.manifest}


def test_mosei_unaligned_is_prepared_like_balancemm(mosei):
    out, ctx = mosei
    manifest = ctx["manifest"]
    assert manifest.classes == ["negative", "positive"]
    assert {s: info.samples for s, info in manifest.splits.items()} == {
        "train": 12,
        "val": 4,
        "test": 6,
    }
    shapes = {"text": [50, 300], "audio": [500, 74], "visual": [500, 35]}
    assert {m.name: m.shape for m in manifest.modalities} == shapes
    assert {m.dtype for m in manifest.modalities} == {"float32"}
    check_prepared(out, ctx["data"], shapes)
    extraction = manifest.extraction
    assert extraction["file"] == "mosei_senti_data_noalign.pkl"
    assert extraction["non_finite"]["train"] == {"audio": {"-inf": 5}, "visual": {"nan": 1}}
    assert extraction["stored_dtype"]["val"]["audio"] == "float64"
    assert extraction["repeated_ids"] == 6  # "vid" twice in each of the three splits
    assert extraction["label_counts"]["train"] == [4, 8]  # two of -2.6, -0.4 per six


def test_mosi_from_a_numpy1_protocol2_pickle(tmp_path):
    """numpy 1.x wrote numpy.core.multiarray; ids are byte strings as in mosi_data.pkl."""
    dims = {"text": 300, "audio": 5, "visual": 20}
    data = fake_mult(dims, {"text": 50, "audio": 50, "visual": 50}, byte_ids=True)
    blob = pickle.dumps(data, protocol=2).replace(b"numpy._core.", b"numpy.core.")
    assert b"numpy.core.multiarray" in blob and b"numpy._core" not in blob
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mosi_data.pkl").write_bytes(blob)
    result = prepare(
        "cmu-mosi", tmp_path / "out", raw=tmp_path / "raw", overrides=["variant=aligned"]
    )
    shapes = {"text": [50, 300], "audio": [50, 5], "visual": [50, 20]}
    assert {m.name: m.shape for m in result.manifest.modalities} == shapes
    check_prepared(tmp_path / "out", data, shapes)


def test_seven_classes_sequence_length_and_float16(tmp_path):
    dims = {"text": 300, "audio": 5, "visual": 20}
    data = fake_mult(dims, {"text": 50, "audio": 375, "visual": 500}, byte_ids=True)
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "mosi_data_noalign.pkl").write_bytes(pickle.dumps(data, protocol=5))
    sets = ["labels=seven", "seq_len={audio: 400, visual: 100}", "pad=start", "dtype=float16"]
    result = prepare("cmu-mosi", tmp_path / "out", raw=tmp_path / "raw", overrides=sets)
    assert result.manifest.classes == ["-3", "-2", "-1", "0", "1", "2", "3"]
    specs = {m.name: (m.shape, m.dtype) for m in result.manifest.modalities}
    assert specs == {
        "text": ([50, 300], "float16"),
        "audio": ([400, 5], "float16"),
        "visual": ([100, 20], "float16"),
    }
    ds = ParquetSamples(tmp_path / "out", "test", list(MODALITIES))
    batch = ds.__getitems__(list(range(len(ds))))
    rows = [row_of(i, "test") for i in ds.sample_ids]
    scores = data["test"]["labels"][rows, 0, 0]
    np.testing.assert_array_equal(batch.label.numpy(), np.round(scores).astype(int) + 3)
    audio = batch.inputs["audio"].numpy()
    assert (audio[:, :25] == 0).all()  # padded at the start: 375 stored steps end at 400
    want = expected(data["test"], "audio")[rows].astype(np.float16)
    np.testing.assert_array_equal(audio[:, 25:], want)
    visual = batch.inputs["visual"].numpy()  # cropped at the start: the last 100 steps
    np.testing.assert_array_equal(
        visual, expected(data["test"], "vision")[rows, -100:].astype(np.float16)
    )


class RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class EvalsCode:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (eval, (self.code,))


@pytest.mark.parametrize("payload", [RunsACommand, EvalsCode])
def test_a_pickle_that_would_run_code_is_refused(tmp_path, payload):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    attack = payload(
        command if payload is RunsACommand else f"__import__('os').system({command!r})"
    )
    (tmp_path / "raw").mkdir()
    blob = pickle.dumps({"train": {"labels": np.zeros((1, 1, 1)), "text": attack}})
    (tmp_path / "raw" / "mosei_senti_data_noalign.pkl").write_bytes(blob)
    with pytest.raises(UserError, match=r"refuses to load .*global (posix\.system|builtins\.eval)"):
        prepare("cmu-mosei", tmp_path / "out", raw=tmp_path / "raw")
    assert not marker.exists()


def test_missing_pickle_names_what_is_expected_and_found(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    (tmp_path / "mosei_senti_data.pkl").write_bytes(pickle.dumps({}))
    with pytest.raises(UserError) as err:
        prepare("cmu-mosei", tmp_path / "out", raw=tmp_path)
    message = str(err.value)
    assert "mosei_senti_data_noalign.pkl" in message and "readme.txt" in message
    assert "--set variant=aligned" in message


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: d.pop("valid"), "the top level has no key 'valid'"),
        (lambda d: d["valid"].pop("vision"), "valid has no key 'vision'"),
        (lambda d: d["test"].update(audio=d["test"]["audio"][:-1]), r"test/audio has shape"),
        (lambda d: d["train"].update(labels=np.zeros((12, 4, 2))), "train/labels has shape"),
    ],
)
def test_wrong_structure_names_the_key(tmp_path, damage, match):
    dims = {"text": 300, "audio": 74, "visual": 35}
    data = fake_mult(dims, {"text": 50, "audio": 50, "visual": 50}, byte_ids=False)
    damage(data)
    (tmp_path / "mosei_senti_data.pkl").write_bytes(pickle.dumps(data))
    with pytest.raises(UserError, match=match):
        prepare("cmu-mosei", tmp_path / "out", raw=tmp_path, overrides=["variant=aligned"])


def test_prep_list_shows_both_data_sets():
    result = CliRunner().invoke(app, ["prep", "--list"])
    assert result.exit_code == 0
    assert "cmu-mosei" in result.output and "cmu-mosi" in result.output


def test_concat_mlp_trains_on_prepped_mosei(mosei, tmp_path):
    """The MLP encoder flattens each [steps, dim] input; a few steps run end to end."""
    out, _ = mosei
    recipe = parse_recipe(
        {
            "name": "mosei",
            "seeds": [0],
            "data": {"path": str(out)},
            "model": {"encoder": {"kind": "mlp", "hidden": [16], "out_dim": 8}, "fusion": "concat"},
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 2, "batch_size": 4},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    result = Trainer(recipe, 0).run()
    metrics = pd.read_parquet(tmp_path / "runs/mosei/seed0/metrics.parquet")
    assert len(metrics) == 2 and np.isfinite(metrics["train_loss"]).all()
    assert 0.0 <= result.summary["test_acc"] <= 1.0
