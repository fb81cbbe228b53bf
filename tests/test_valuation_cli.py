"""`mmval value`: options, outputs, and the user mistakes that exit with code 2."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.prep import prepare
from mmval.recipe import parse_recipe
from mmval.runner import Trainer

runner = CliRunner()


def synthetic(root: Path, name: str, modalities: list[str], **params: str) -> Path:
    m = len(modalities)
    overrides = {
        "modalities": f"[{','.join(modalities)}]",
        "dims": str([4] * m),
        "signal": str([1.0] * m),
        "per_class": "{train: 10, val: 4, test: 5}",
        **params,
    }
    out = root / name
    prepare("synthetic", out, overrides=[f"{k}={v}" for k, v in overrides.items()])
    return out


def recipe(data: Path, output: Path, name: str, **extra: object) -> dict:
    return {
        "name": name,
        "seeds": [0],
        "data": {"path": str(data)},
        "model": {"encoder": {"hidden": [8], "out_dim": 4}},
        "train": {"epochs": 1, "batch_size": 16},
        "output": str(output),
        **extra,
    }


def train(data: Path, output: Path, name: str) -> Path:
    Trainer(parse_recipe(recipe(data, output, name), name), 0).run()
    return output / name / "seed0" / "best.pt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("value-cli")
    abc = synthetic(root, "abc", ["a", "b", "c"])
    many = synthetic(root, "many", [f"m{j}" for j in range(11)])
    empty = synthetic(root, "empty", ["a", "b"], per_class="{train: 10, val: 4, test: 5, extra: 0}")
    return {
        "root": root,
        "abc": abc,
        "ckpt": train(abc, root / "runs", "abc"),
        "many": many,
        "many_ckpt": train(many, root / "runs", "many"),
        "empty_ckpt": train(empty, root / "runs", "empty"),
        "classes": synthetic(root, "classes", ["a", "b", "c"], n_classes="3"),
        "dims": synthetic(root, "dims", ["a", "b", "c"], dims="[4,6,4]"),
        "names": synthetic(root, "names", ["a", "b", "d"]),
        "seed": synthetic(root, "seed", ["a", "b", "c"], seed="1"),
    }


def invoke(*args: object):
    return runner.invoke(app, ["value", *map(str, args)])


def test_options_wide_and_summary(setup, tmp_path):
    out = tmp_path / "cmob.parquet"
    result = invoke(
        setup["ckpt"],
        "--out",
        out,
        "--method",
        "cmob",
        "--mask",
        "mean",
        "--benefit",
        "prob",
        "--wide",
    )
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "mean contribution" in result.output
    wide = pd.read_parquet(out)
    columns = ["sample_id", "label", "class", "pred", "correct", "v_full", "a", "b", "c"]
    assert list(wide.columns) == columns
    assert (wide["class"] == wide["label"].map(lambda i: f"class{i}")).all()
    meta = pq.read_schema(out).metadata
    assert (meta[b"mmval.method"], meta[b"mmval.mask"], meta[b"mmval.benefit"]) == (
        b"cmob",
        b"mean",
        b"prob",
    )
    assert (meta[b"mmval.confidence"], meta[b"mmval.confidence_score"]) == (
        b"treatment",
        b"max_softmax",
    )
    result = invoke(setup["ckpt"], "--summary", "--method", "shapley-mc", "--permutations", "4")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "weakest_share" in text and "gap" in text
    assert "row minus column" in text and "wrote" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--method", "banzhaf"], "--method"),
        (["--permutations", "10"], "shapley-mc only"),
        (["--method", "shapley-mc", "--permutations", "1"], "--permutations"),
        (["--mask", "zero"], "--mask"),
        (["--benefit", "loss"], "--benefit"),
        ([], "--out"),
        (["--summary", "--wide"], "--wide"),
        (["--summary", "--split", "nope"], "no split 'nope'"),
    ],
)
def test_user_mistakes_exit_2(setup, args, message):
    result = invoke(setup["ckpt"], *args)
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(setup):
    result = invoke(setup["ckpt"], "--summary", "--device", "cuda")
    assert result.exit_code == 2 and "no CUDA device" in result.output


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("classes", "4 classes were trained on, the data has 3"),
        ("dims", "weights do not fit"),
        ("names", "modalities a, b, c were trained on, the data has a, b, d"),
        ("seed", "same modalities, shapes and classes"),
    ],
)
def test_checkpoint_and_data_mismatch_exit_2(setup, data, message):
    result = invoke(setup["ckpt"], "--summary", "--data", setup[data])
    assert result.exit_code == 2 and "fingerprints differ" in result.output, result.output
    assert message in " ".join(result.output.split())


def test_too_many_modalities_for_exact_shapley(setup, tmp_path):
    result = invoke(setup["many_ckpt"], "--summary")
    assert result.exit_code == 2 and "--method shapley-mc" in " ".join(result.output.split())
    out = tmp_path / "mc.parquet"
    result = invoke(setup["many_ckpt"], "--out", out, "--method", "shapley-mc", "--permutations", 3)
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(out)
    assert len(table) == 20 * 11 and table["stderr"].notna().all()
    sums = table.groupby("sample_id").agg(total=("contribution", "sum"), v=("v_full", "first"))
    assert (sums["total"] - sums["v"]).abs().max() < 1e-9


def test_empty_split_exits_2(setup):
    result = invoke(setup["empty_ckpt"], "--summary", "--split", "extra")
    assert result.exit_code == 2 and "has no samples" in result.output, result.output


def test_training_refuses_exact_valuation_of_many_modalities_before_training(setup, tmp_path):
    raw = recipe(setup["many"], tmp_path / "runs", "many", valuation={"every": 1})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 2 and "shapley-mc" in result.output, result.output
    assert not (tmp_path / "runs/many/seed0/last.pt").exists()
