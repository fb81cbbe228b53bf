"""`mmval prep caltech101-20` on small fake .mat files in the official layout (a cell X of six
[N, d_v] views with the real feature sizes, labels Y [N, 1] counted from 1), in both stored
orientations; damaged files; one epoch of concat on the prepared views."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.io
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.errors import UserError
from mmval.recipe import load_recipe, parse_recipe
from mmval.runner import Trainer
from mmval.sweep import load_plan

DIMS = {"gabor": 48, "wm": 40, "centrist": 254, "hog": 1984, "gist": 512, "lbp": 928}
VIEWS = list(DIMS)
PER_CLASS = 10  # 7 / 1 / 2 per class at 70 / 10 / 20
N = 20 * PER_CLASS
RECIPES = Path(__file__).parents[1] / "recipes"


def fake_views(seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Six [N, d_v] double matrices on different scales and labels 1..20 in shuffled order."""
    rng = np.random.default_rng(seed)
    views = [rng.normal(3.0 * v, 1.0 + v, size=(N, d)) for v, d in enumerate(DIMS.values())]
    labels = rng.permutation(np.repeat(np.arange(1, 21), PER_CLASS)).astype(np.float64)
    return views, labels.reshape(N, 1)


def write_mat(
    path: Path, views: list[np.ndarray], labels: np.ndarray, *, transposed: bool = False
) -> None:
    """The official layout (a 1 x 6 cell of [N, d_v]) or the other one seen in copies (a 6 x 1
    cell of [d_v, N])."""
    cell = np.empty((6, 1) if transposed else (1, 6), dtype=object)
    for v, values in enumerate(views):
        cell.flat[v] = values.T if transposed else values
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(str(path), {"X": cell, "Y": labels})


def read_split(out: Path, split: str) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    ds = ParquetSamples(out, split, VIEWS)
    batch = ds.__getitems__(list(range(len(ds))))
    return ds.sample_ids, batch.label.numpy(), {v: x.numpy() for v, x in batch.inputs.items()}


def row_of(sample_id: str) -> int:
    return int(sample_id.removeprefix("row")) - 1


@pytest.fixture(scope="module")
def caltech(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray], np.ndarray]:
    views, labels = fake_views()
    raw = tmp_path_factory.mktemp("raw-caltech")
    write_mat(raw / "Caltech101-20.mat", views, labels)
    out = tmp_path_factory.mktemp("data") / "caltech101-20"
    prepare("caltech101-20", out, raw=raw)
    return out, views, labels


def test_official_layout_counts_shapes_labels_and_values(caltech):
    out, views, labels = caltech
    read = {split: read_split(out, split) for split in ("train", "val", "test")}
    assert {s: len(r[0]) for s, r in read.items()} == {"train": 140, "val": 20, "test": 40}
    rows = {s: [row_of(i) for i in r[0]] for s, r in read.items()}
    every = sorted(r for split_rows in rows.values() for r in split_rows)
    assert every == list(range(N))  # every row in exactly one split
    for split, (_, got, inputs) in read.items():
        np.testing.assert_array_equal(got, labels[rows[split], 0].astype(np.int64) - 1)
        counts = np.bincount(got, minlength=20)
        assert (counts == {"train": 7, "val": 1, "test": 2}[split]).all()
        assert {v: list(x.shape[1:]) for v, x in inputs.items()} == {
            v: [d] for v, d in DIMS.items()
        }
    train = np.array(rows["train"])
    train_inputs = read["train"][2]
    test_ids, _, test_inputs = read["test"]
    for v, view in enumerate(VIEWS):  # min-max with the train split's min and max
        low, high = views[v][train].min(axis=0), views[v][train].max(axis=0)
        assert train_inputs[view].min() == 0.0 and train_inputs[view].max() == pytest.approx(1.0)
        r = row_of(test_ids[5])
        expected = (views[v][r] - low) / (high - low)
        np.testing.assert_allclose(test_inputs[view][5], expected, rtol=1e-5, atol=1e-6)
    manifest = pd.read_json(out / "manifest.json", typ="series")
    assert manifest["classes"] == [str(c) for c in range(1, 21)]
    extraction = manifest["extraction"]
    assert extraction["transposed"] == [] and extraction["label_offset"] == 1
    assert extraction["class_counts"] == [PER_CLASS] * 20 and extraction["dropped"] == 0


def test_transposed_copy_gives_the_same_data(caltech, tmp_path):
    out, views, labels = caltech
    write_mat(tmp_path / "raw/Caltech101-20.mat", views, labels, transposed=True)
    other = tmp_path / "out"
    result = prepare("caltech101-20", other, raw=tmp_path / "raw")
    assert result.manifest.extraction["transposed"] == VIEWS
    for split in ("train", "val", "test"):
        ids, got, inputs = read_split(other, split)
        ref_ids, ref_labels, ref_inputs = read_split(out, split)
        assert ids == ref_ids
        np.testing.assert_array_equal(got, ref_labels)
        for view in VIEWS:
            np.testing.assert_array_equal(inputs[view], ref_inputs[view])


def test_zscore_and_another_file_name(tmp_path):
    views, labels = fake_views(1)
    write_mat(tmp_path / "raw/my-copy.mat", views, labels)
    out = tmp_path / "out"
    prepare("caltech101-20", out, raw=tmp_path / "raw", overrides=["file=my-copy.mat"])
    prepare(
        "caltech101-20",
        tmp_path / "z",
        raw=tmp_path / "raw",
        overrides=["file=my-copy.mat", "normalize=zscore"],
    )
    _, _, train = read_split(tmp_path / "z", "train")
    np.testing.assert_allclose(train["hog"].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(train["hog"].std(axis=0), 1.0, atol=1e-3)


def test_nan_rows_go_to_errors_parquet(tmp_path):
    views, labels = fake_views(2)
    views[3][5, 7] = np.nan  # hog of row 6
    views[0][17, :] = np.inf  # gabor of row 18
    views[5][17, 2] = np.nan  # the same row again: listed once
    labels[30, 0] = np.nan  # row 31
    write_mat(tmp_path / "raw/Caltech101-20.mat", views, labels)
    out = tmp_path / "out"
    result = prepare("caltech101-20", out, raw=tmp_path / "raw")
    errors = pd.read_parquet(out / "errors.parquet")
    assert errors["source"].tolist() == ["row 31", "row 18", "row 6"]
    assert "Y is nan" in errors["reason"][0]
    assert "view gabor, feature 1 is inf" in errors["reason"][1]
    assert "view hog, feature 8 is nan" in errors["reason"][2]
    assert sum(info.samples for info in result.manifest.splits.values()) == N - 3
    ids = [i for split in ("train", "val", "test") for i in read_split(out, split)[0]]
    assert not {"row0006", "row0018", "row0031"} & set(ids)


def _damaged(tmp_path: Path, damage: str) -> Path:
    views, labels = fake_views(3)
    path = tmp_path / "raw/Caltech101-20.mat"
    if damage == "row-count":
        views[3] = views[3][:-1]
    if damage == "labels":
        labels[0, 0] = 21
    write_mat(path, views, labels)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if damage == "missing":
        path.rename(path.with_name("other.mat"))
    return path.parent


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncated", "cannot be read as a MATLAB .mat file"),
        ("row-count", r"view hog has shape \[199, 1984\]; \[200, 1984\]"),
        ("labels", "holds labels 1..21"),
        ("missing", "has no Caltech101-20.mat; .mat files there: other.mat"),
    ],
)
def test_damaged_files_are_refused(tmp_path, damage, match):
    raw = _damaged(tmp_path, damage)
    with pytest.raises(UserError, match=match):
        prepare("caltech101-20", tmp_path / "out", raw=raw)
    assert not (tmp_path / "out/manifest.json").exists()


def test_cli_exits_2_on_a_truncated_file(tmp_path):
    raw = _damaged(tmp_path, "truncated")
    result = CliRunner().invoke(
        app, ["prep", "caltech101-20", "--raw", str(raw), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 2
    assert "truncated or damaged" in result.output


def test_concat_trains_one_epoch_on_two_views(caltech, tmp_path):
    out, _, _ = caltech
    recipe = parse_recipe(
        {
            "name": "caltech",
            "seeds": [0],
            "data": {"path": str(out), "modalities": ["gabor", "wm"]},
            "model": {"encoder": {"kind": "mlp", "hidden": [16], "out_dim": 8}, "fusion": "concat"},
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.001},
            "train": {"epochs": 1, "batch_size": 32},
            "output": str(tmp_path / "runs"),
        },
        "test",
    )
    result = Trainer(recipe, 0).run()
    metrics = pd.read_parquet(tmp_path / "runs/caltech/seed0/metrics.parquet")
    assert len(metrics) == 1 and np.isfinite(metrics["train_loss"]).all()
    assert 0.0 <= result.summary["test_acc"] <= 1.0


def test_recipes_and_the_table_2_sweep():
    assert load_recipe(RECIPES / "concat-caltech101-20.yaml").data.dataset == "caltech101-20"
    sample = load_recipe(RECIPES / "mmcooperation_sample-caltech101-20.yaml")
    assert sample.method.name == "mmcooperation_sample" and sample.data.modalities is None
    plan = load_plan(RECIPES / "sweep-mmcooperation-caltech101-20.yaml")
    assert len(plan.variants) == 12
    by_label = {v.label: v.recipe for v in plan.variants}
    for k in (2, 3, 4, 5):
        views = VIEWS[:k]
        for method in ("concat", "mmcooperation_sample", "mmcooperation_modality"):
            recipe = by_label[f"{method}-modalities_{'_'.join(views)}"]
            assert recipe.data.modalities == views and recipe.method.name == method
