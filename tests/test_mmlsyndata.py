"""MMLSynData (C3R's synthetic causal benchmark), ground-truth columns, and distance correlation
(`mmval value --method dcor`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.artifacts.checkpoint import load_checkpoint
from mmval.data.dataset import ParquetSamples
from mmval.data.prep import prepare
from mmval.data.shards import DataManifest, ModalitySpec, load_manifest, read_ground_truth
from mmval.data.sources.mmlsyndata import MMLSynDataParams, generate_split, mixing_matrices
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer
from mmval.valuation.dcor import distance_correlation, group_dcor

runner = CliRunner()
SMALL = "splits={train: 200, val: 50, test: 60}"


def draw(n: int, seed: int = 0, **params: object) -> tuple[np.ndarray, dict, dict]:
    p = MMLSynDataParams(**params)
    return generate_split(p, n, np.random.default_rng(seed), mixing_matrices(p))


# --- generator --------------------------------------------------------------------------------


def test_generator_statistics():
    labels, inputs, truth = draw(20_000)
    sn, sf, nc = truth["snc"], truth["sc"], truth["nc"]
    assert (sn == sn[:, :1]).all()  # shared sn by default
    assert abs((labels == sn[:, 0]).mean() - 0.85) < 0.015
    assert abs(sn[:, 0].mean() - 0.5) < 0.02
    assert (sf[sn == 1] == 1).all() and abs(sf[sn == 0].mean() - 0.1) < 0.015
    assert (nc[sn == 0] == 0).all()
    for m, q in enumerate([0.5, 0.7, 0.9]):
        assert abs(nc[sn[:, m] == 1, m].mean() - q) < 0.02
    assert truth["sp"].shape == (20_000, 3, 5)
    for name, x in inputs.items():
        assert x.shape == (20_000, 20) and x.dtype == np.float32, name
        assert (x > 0).all() and (x < 1).all()


def test_spurious_degree():
    _, _, truth = draw(5_000, s=0.98)
    sn = truth["snc"][:, :, None]
    assert np.abs(truth["sp"] - 0.98 * sn).max() < 0.02 * 5  # (1 - s) N(0, 1), |N| < 5
    assert abs(np.corrcoef(truth["sp"][:, 0, 0], sn[:, 0, 0])[0, 1]) > 0.95
    _, _, weak = draw(5_000, s=0.0)
    assert abs(np.corrcoef(weak["sp"][:, 0, 0], weak["snc"][:, 0])[0, 1]) < 0.05
    assert abs(weak["sp"].std() - 1.0) < 0.02


def test_transform_is_the_shifted_sigmoid():
    """Noise-free: the sn, sf, nc blocks are sigmoid(0.5) where the cause is 1 and 0.5 where
    it is 0 (the printed product form would make every x exactly 0.5)."""
    _, inputs, truth = draw(400, noise_var=0.0)
    x = inputs["x2"].astype(np.float64)
    for block, group in enumerate(["snc", "sc", "nc"]):
        on = truth[group][:, 1] == 1
        part = x[:, 5 * block : 5 * (block + 1)]
        assert np.allclose(part[on], 1 / (1 + math.exp(-0.5)), atol=1e-6)
        assert np.allclose(part[~on], 0.5, atol=1e-6)
    sp = truth["sp"][:, 1].astype(np.float64)
    shifted = [[v - 0.5 if v > 0 else v + 0.5 if v < 0 else 0.0 for v in row] for row in sp]
    assert np.allclose(x[:, 15:], 1 / (1 + np.exp(-np.asarray(shifted))), atol=1e-6)


def test_mixing_and_theta_options():
    p = MMLSynDataParams(mixing=True, seed=3)
    a, b = mixing_matrices(p), mixing_matrices(MMLSynDataParams(mixing=True, seed=3))
    assert len(a) == 3 and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1]) and abs(np.concatenate(a).var() - 1 / 20) < 0.01
    _, plain, _ = draw(50, noise_var=0.0)
    _, mixed, _ = draw(50, noise_var=0.0, mixing=True)
    assert not np.allclose(plain["x1"], mixed["x1"])
    labels, _, truth = draw(20_000, theta=[0.2, 0.5, 0.8], flip=0.0)
    sn = truth["snc"]
    assert np.allclose(sn.mean(axis=0), [0.2, 0.5, 0.8], atol=0.02)
    assert np.array_equal(labels, (sn.sum(axis=1) >= 2).astype(np.int64))
    with pytest.raises(ValueError, match="odd"):
        MMLSynDataParams(modalities=["a", "b"], nc_prob=[0.5, 0.5], theta=[0.5, 0.5])
    with pytest.raises(ValueError, match="nc_prob"):
        MMLSynDataParams(modalities=["a", "b"])
    with pytest.raises(ValueError, match="ground-truth column"):
        MMLSynDataParams(modalities=["x1", "x2", "sp"])


def test_deterministic_per_seed(tmp_path):
    def shas(out: Path, *sets: str) -> dict[str, str]:
        manifest = prepare("mmlsyndata", out, overrides=[SMALL, *sets]).manifest
        return {s.path: s.sha256 for split in manifest.splits.values() for s in split.shards}

    first, again = shas(tmp_path / "a"), shas(tmp_path / "b")
    assert first == again
    other = shas(tmp_path / "c", "seed=1")
    assert all(first[path] != sha for path, sha in other.items())
    bigger_val = shas(tmp_path / "d", "splits={train: 200, val: 80, test: 60}")
    assert bigger_val["test/part-00000.parquet"] == first["test/part-00000.parquet"]
    assert bigger_val["val/part-00000.parquet"] != first["val/part-00000.parquet"]


# --- ground-truth columns ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mmlsyndata") / "data"
    result = runner.invoke(app, ["prep", "mmlsyndata", "--out", str(out), "--set", SMALL])
    assert result.exit_code == 0, result.output
    return out


def test_prep_cli_writes_splits_and_ground_truth(prepared):
    manifest = load_manifest(prepared)
    assert {k: v.samples for k, v in manifest.splits.items()} == {
        "train": 200,
        "val": 50,
        "test": 60,
    }
    assert [m.name for m in manifest.modalities] == ["x1", "x2", "x3"]
    assert [(g.name, g.shape) for g in manifest.ground_truth] == [
        ("snc", [3]),
        ("sc", [3]),
        ("nc", [3]),
        ("sp", [3, 5]),
    ]
    with pytest.raises(UserError, match="no modality 'snc'"):
        manifest.modality("snc")
    samples = ParquetSamples(prepared, "train", ["x1"], manifest=manifest)
    truth = read_ground_truth(prepared, "train", manifest)
    assert truth["sp"].shape == (200, 3, 5) and truth["snc"].dtype == np.float32
    # aligned with the loader's order: compare with the shard rows matched by sample id
    shard = pq.read_table(prepared / manifest.splits["train"].shards[0].path).to_pandas()
    by_id = dict(zip(shard["sample_id"], shard["nc"], strict=True))
    expected = np.stack([np.frombuffer(by_id[i], "<f4") for i in samples.sample_ids])
    assert np.array_equal(truth["nc"], expected)
    assert (samples.labels == truth["snc"][:, 0]).mean() > 0.75
    with pytest.raises(UserError, match="no split 'nope'"):
        read_ground_truth(prepared, "nope", manifest)


def test_data_without_ground_truth_keeps_its_manifest(tmp_path):
    out = tmp_path / "syn"
    manifest = prepare("synthetic", out, overrides=["per_class={train: 4, val: 2, test: 2}"])
    assert "ground_truth" not in json.loads((out / "manifest.json").read_text())
    assert manifest.manifest.ground_truth == []
    spec = ModalitySpec(name="strong", dtype="float32", shape=[1])
    with pytest.raises(ValueError, match="clashes"):
        DataManifest.model_validate(
            {**manifest.manifest.model_dump(), "ground_truth": [spec.model_dump()]}
        )


# --- distance correlation ---------------------------------------------------------------------


def dcor_by_loops(x: list[list[float]], y: list[list[float]]) -> float:
    """Szekely et al. (2007) Definition 4 written out with plain loops."""
    n = len(x)

    def centred(rows: list[list[float]]) -> list[list[float]]:
        d = [
            [math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j], strict=True)))
             for j in range(n)]
            for i in range(n)
        ]  # fmt: skip
        row = [sum(d[i]) / n for i in range(n)]
        col = [sum(d[i][j] for i in range(n)) / n for j in range(n)]
        grand = sum(row) / n
        return [[d[i][j] - row[i] - col[j] + grand for j in range(n)] for i in range(n)]

    a, b = centred(x), centred(y)

    def v2(p: list[list[float]], q: list[list[float]]) -> float:
        return sum(p[i][j] * q[i][j] for i in range(n) for j in range(n)) / n**2

    return math.sqrt(v2(a, b) / math.sqrt(v2(a, a) * v2(b, b)))


def test_dcor_matches_plain_loops():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((13, 3))
    y = np.concatenate([np.sin(x[:, :1]) + 0.3 * rng.standard_normal((13, 1)), x[:, 1:2]], 1)
    expected = dcor_by_loops(x.tolist(), y.tolist())
    assert abs(distance_correlation(x, y) - expected) < 1e-12
    assert abs(distance_correlation(torch.tensor(x, dtype=torch.float32), y) - expected) < 1e-6
    z = rng.standard_normal((13, 2, 2))  # further axes are flattened
    flat = dcor_by_loops(x.tolist(), z.reshape(13, 4).tolist())
    assert abs(distance_correlation(x, z) - flat) < 1e-12


def test_dcor_properties():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(300, 4, generator=gen, dtype=torch.float64)
    assert abs(distance_correlation(x, -2.5 * x + torch.tensor([1.0, -3.0, 0.5, 7.0])) - 1) < 1e-12
    y = x[:, :2] ** 2 + 0.1 * torch.randn(300, 2, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    assert abs(distance_correlation(x @ q + 5.0, y) - distance_correlation(x, y)) < 1e-12
    assert distance_correlation(x, y) > 0.3  # nonlinear dependence Pearson barely sees
    independent = distance_correlation(
        torch.randn(2000, 3, generator=gen), torch.randn(2000, 2, generator=gen)
    )
    assert 0 <= independent < 0.1
    assert distance_correlation(x, torch.ones(300, 1)) == 0.0
    indep = torch.randn(300, 1, generator=gen).numpy()
    groups = group_dcor(x, {"same": x.numpy(), "indep": indep})
    assert groups["same"] == pytest.approx(1.0) and groups["indep"] < 0.3
    with pytest.raises(ValueError, match="samples"):
        distance_correlation(x, y[:10])


# --- training and the dcor evaluation ---------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("runs")
    raw = {
        "name": "concat-mmlsyndata",
        "seeds": [0],
        "data": {"path": str(prepared)},  # no data.modalities: the inputs only
        "model": {"encoder": {"kind": "mlp", "hidden": [32], "out_dim": 16}},
        "method": {"name": "concat"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 4, "batch_size": 32},
        "output": str(output),
    }
    Trainer(parse_recipe(raw, "test"), 0).run()
    return output / "concat-mmlsyndata" / "seed0" / "best.pt"


def test_concat_trains_on_the_inputs_only(checkpoint, prepared):
    assert load_checkpoint(checkpoint).data.modalities == ["x1", "x2", "x3"]
    metrics = pd.read_parquet(checkpoint.parent / "metrics.parquet")
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    raw = {
        "name": "leak",
        "seeds": [0],
        "data": {"path": str(prepared), "modalities": ["x1", "snc"]},
        "train": {"epochs": 1},
    }
    with pytest.raises(UserError, match="no modality 'snc'"):
        Trainer(parse_recipe(raw, "test"), 0).run()


def test_value_dcor_cli(checkpoint, prepared, tmp_path):
    out = tmp_path / "dcor.parquet"
    result = runner.invoke(app, ["value", str(checkpoint), "--method", "dcor", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "snc" in result.output
    table = pd.read_parquet(out)
    assert list(table.columns) == ["group", "dcor", "n", "split"]
    assert table["group"].tolist() == ["snc", "sc", "nc", "sp"]
    assert table["dcor"].between(0, 1).all() and (table["n"] == 60).all()
    assert (table["split"] == "test").all()
    assert pq.read_schema(out).metadata[b"mmval.method"] == b"dcor"
    # the same numbers from the model's representation and the shard columns, recomputed here
    from mmval.valuation.run import load_with_data

    loaded = load_with_data(checkpoint)
    samples = ParquetSamples(prepared, "test", loaded.modalities)
    with torch.no_grad():
        z = loaded.model.eval().representation(samples.__getitems__(list(range(60))).inputs)
    truth = read_ground_truth(prepared, "test", loaded.manifest)
    for group, value in zip(table["group"], table["dcor"], strict=True):
        assert value == pytest.approx(
            dcor_by_loops(z.tolist(), truth[group].reshape(60, -1).tolist())
        )
    result = runner.invoke(app, ["value", str(checkpoint), "--method", "dcor", "--split", "val"])
    assert result.exit_code == 0 and "val" in result.output, result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--wide", "--mask", "mean"], "--mask, --wide: not options of --method dcor"),
        (["--split", "nope"], "no split 'nope'"),
    ],
)
def test_value_dcor_mistakes_exit_2(checkpoint, args, message):
    result = runner.invoke(app, ["value", str(checkpoint), "--method", "dcor", *args])
    assert result.exit_code == 2 and message in " ".join(result.output.split()), result.output


def test_value_dcor_without_ground_truth_exits_2(synthetic_dir, tmp_path):
    raw = {
        "name": "plain",
        "seeds": [0],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [8], "out_dim": 4}},
        "train": {"epochs": 1},
        "output": str(tmp_path),
    }
    Trainer(parse_recipe(raw, "test"), 0).run()
    result = runner.invoke(
        app, ["value", str(tmp_path / "plain/seed0/best.pt"), "--method", "dcor"]
    )
    assert result.exit_code == 2, result.output
    assert "stores no ground-truth variables" in " ".join(result.output.split())
