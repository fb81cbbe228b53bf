"""MMLSynData (C3R's synthetic causal benchmark), ground-truth columns, and distance correlation
(`mmval value --method dcor`)."""

from __future__ import annotations

import hashlib
import json
import math
import zlib
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
from mmval.data.sources.mmlsyndata import (
    MMLSynDataParams,
    generate_split,
    mixing_matrices,
    sample_split,
)
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


def majority(values: np.ndarray) -> np.ndarray:
    """The label rule applied to a group's [n, M] values: 1 where most modalities have 1."""
    return values.sum(axis=1) * 2 > values.shape[1]


def test_generator_statistics():
    labels, inputs, truth = draw(20_000)
    sn, sc, nc = truth["snc"], truth["sc"], truth["nc"]
    assert np.allclose(sn.mean(axis=0), [0.3, 0.5, 0.7], atol=0.015)  # theta_m by default
    assert abs(np.corrcoef(sn[:, 0], sn[:, 2])[0, 1]) < 0.03  # independent causes
    assert abs((labels == majority(sn)).mean() - 0.85) < 0.015
    assert abs(labels.mean() - 0.5) < 0.02  # thetas symmetric about 0.5: balanced classes
    assert (sc <= sn).all() and (sn <= nc).all()
    assert abs(nc[sn == 0].mean() - 0.1) < 0.015
    for m, q in enumerate([0.5, 0.7, 0.9]):
        assert abs(sc[sn[:, m] == 1, m].mean() - q) < 0.02
    assert truth["sp"].shape == (20_000, 3, 5)
    for name, x in inputs.items():
        assert x.shape == (20_000, 20) and x.dtype == np.float32, name
        assert (x > 0).all() and (x < 1).all()
    labels, _, truth = draw(20_000, causes="shared")
    assert (truth["snc"] == truth["snc"][:, :1]).all()
    assert abs((labels == truth["snc"][:, 0]).mean() - 0.85) < 0.015


@pytest.mark.parametrize("causes", ["per_modality", "shared"])
def test_column_semantics_by_simulation(causes):
    """Each group behaves as both papers define it. With flip = 0.15 the cause itself reaches
    P(y=1 | 1) = P(y=0 | 0) = 0.85; a group's value is the label rule (majority over the
    modalities) of its columns; 200,000 samples give standard errors of about 0.002."""
    labels, _, truth = draw(200_000, causes=causes)
    best = 0.85

    def sufficiency(c: np.ndarray) -> float:
        return labels[c].mean()  # P(y=1 | c=1)

    def necessity(c: np.ndarray) -> float:
        return 1 - labels[~c].mean()  # P(y=0 | c=0)

    snc, sc, nc = (majority(truth[g]) for g in ("snc", "sc", "nc"))
    assert abs(sufficiency(snc) - best) < 0.01 and abs(necessity(snc) - best) < 0.01
    # SC: as sufficient as the cause, but many y = 1 come without it
    assert abs(sufficiency(sc) - best) < 0.01 and necessity(sc) < best - 0.05
    assert (~sc[labels == 1]).mean() > (~snc[labels == 1]).mean() + 0.1
    # NC: as necessary as the cause, but c = 1 also without the cause: less sufficient
    assert abs(necessity(nc) - best) < 0.01 and sufficiency(nc) < best - 0.01
    if causes == "shared":  # one cause: every modality's columns behave alike (CaSN's setting)
        for m in range(3):
            column = {g: truth[g][:, m] == 1 for g in ("sc", "nc")}
            assert abs(sufficiency(column["sc"]) - best) < 0.01
            assert necessity(column["sc"]) < best - 0.05
            assert abs(necessity(column["nc"]) - best) < 0.01
            assert sufficiency(column["nc"]) < best - 0.04
    # SP: correlated with its modality's cause as s sets, and no cause of y given the causes
    v = np.array([0.3, 0.5, 0.7]) if causes == "per_modality" else np.full(3, 0.5)
    v = v * (1 - v)
    expected = 0.6 * np.sqrt(v) / np.sqrt(0.36 * v + 0.16)
    cause = majority(truth["snc"])
    for m in range(3):
        sp = truth["sp"][:, m]
        assert abs(np.corrcoef(sp[:, 0], truth["snc"][:, m])[0, 1] - expected[m]) < 0.01
        for k in (False, True):
            assert abs(np.corrcoef(sp[cause == k].mean(axis=1), labels[cause == k])[0, 1]) < 0.015


def test_spurious_degree():
    _, _, truth = draw(5_000, s=0.98)
    sn = truth["snc"][:, :, None]
    assert np.abs(truth["sp"] - 0.98 * sn).max() < 0.02 * 5  # (1 - s) N(0, 1), |N| < 5
    assert abs(np.corrcoef(truth["sp"][:, 0, 0], sn[:, 0, 0])[0, 1]) > 0.95
    _, _, weak = draw(5_000, s=0.0)
    assert abs(np.corrcoef(weak["sp"][:, 0, 0], weak["snc"][:, 0])[0, 1]) < 0.05
    assert abs(weak["sp"].std() - 1.0) < 0.02
    _, _, low = draw(50_000, s=0.1)  # C3R's low degree: corr 0.1 * 0.5 / (0.0025 + 0.81)^0.5
    assert abs(np.corrcoef(low["sp"][:, 1, 0], low["snc"][:, 1])[0, 1] - 0.0555) < 0.015


def test_transform_is_the_shifted_sigmoid():
    """Noise-free and unmixed: the snc, nc, sc blocks are sigmoid(0.5) where the variable is 1
    and 0.5 where it is 0 (the product C3R prints would make every x exactly 0.5)."""
    _, inputs, truth = draw(400, noise_var=0.0, mixing=False)
    x = inputs["x2"].astype(np.float64)
    for block, group in enumerate(["snc", "nc", "sc"]):
        on = truth[group][:, 1] == 1
        part = x[:, 5 * block : 5 * (block + 1)]
        assert np.allclose(part[on], 1 / (1 + math.exp(-0.5)), atol=1e-6)
        assert np.allclose(part[~on], 0.5, atol=1e-6)
    sp = truth["sp"][:, 1].astype(np.float64)
    shifted = [[v - 0.5 if v > 0 else v + 0.5 if v < 0 else 0.0 for v in row] for row in sp]
    assert np.allclose(x[:, 15:], 1 / (1 + np.exp(-np.asarray(shifted))), atol=1e-6)


def test_mixing_is_per_modality_and_default():
    """x_m = sigmoid(A_m u_m): undoing the sigmoid and A_m gives back the unmixed shifted blocks
    of the same draw; each modality has its own A_m."""
    a, b = mixing_matrices(MMLSynDataParams(seed=3)), mixing_matrices(MMLSynDataParams(seed=3))
    assert len(a) == 3 and all(np.array_equal(u, v) for u, v in zip(a, b, strict=True))
    assert not np.array_equal(a[0], a[1]) and abs(np.concatenate(a).var() - 1 / 20) < 0.01
    _, plain, _ = draw(50, mixing=False)
    _, mixed, _ = draw(50)
    mats = mixing_matrices(MMLSynDataParams())
    for j, name in enumerate(["x1", "x2", "x3"]):
        x = mixed[name].astype(np.float64)
        u = np.log(x / (1 - x)) @ np.linalg.inv(mats[j]).T
        p = plain[name].astype(np.float64)
        assert np.allclose(u, np.log(p / (1 - p)), atol=1e-3)
        assert not np.allclose(x, p)
    assert mixing_matrices(MMLSynDataParams(mixing=False)) is None


def test_params_options_and_mistakes():
    labels, _, truth = draw(20_000, theta=[0.2, 0.5, 0.8], flip=0.0)
    sn = truth["snc"]
    assert np.allclose(sn.mean(axis=0), [0.2, 0.5, 0.8], atol=0.02)
    assert np.array_equal(labels, (sn.sum(axis=1) >= 2).astype(np.int64))
    assert MMLSynDataParams(modalities=["a"], sc_prob=[0.5]).theta is None
    with pytest.raises(ValueError, match="odd"):
        MMLSynDataParams(modalities=["a", "b"], sc_prob=[0.5, 0.5])
    two = MMLSynDataParams(modalities=["a", "b"], sc_prob=[0.5, 0.5], causes="shared")
    assert two.causes == "shared"
    with pytest.raises(ValueError, match="theta applies"):
        MMLSynDataParams(causes="shared", theta=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="sc_prob"):
        MMLSynDataParams(modalities=["a"])
    with pytest.raises(ValueError, match="ground-truth column"):
        MMLSynDataParams(modalities=["x1", "x2", "sp"])
    with pytest.raises(ValueError, match=r"version-1\.0 names"):
        MMLSynDataParams(nc_prob=[0.5, 0.7, 0.9])
    with pytest.raises(ValueError, match="per_class needs a 'train'"):
        MMLSynDataParams(sampling="per_class", per_class={"test": 5})


VERSION_1 = {  # the parameters a version-1.0 manifest records
    "modalities": ["x1", "x2", "x3"],
    "d": 5,
    "s": 0.6,
    "flip": 0.15,
    "sf_rate": 0.1,
    "nc_prob": [0.5, 0.7, 0.9],
    "noise_var": 0.4,
    "mixing": False,
    "theta": None,
    "splits": {"train": 1000, "val": 200, "test": 200},
    "seed": 0,
}


@pytest.mark.parametrize(
    ("changes", "digest"),
    [
        ({}, "4c71348b8ad1bbe5e961a1e35cd4aa87af1b00e91fcf7ea0ab7c66468b8111b5"),
        (
            {"theta": [0.3, 0.5, 0.7], "mixing": True, "s": 0.1},
            "8d8245d76dd1d5cd7841f36888354032a6de9e98689ec1735fa441f6b9ad672e",
        ),
    ],
)
def test_version_1_parameters_reproduce_its_values(changes, digest):
    """sha256 of 64 samples of the version-1.0 generator (commit 66a104e), in its column order:
    its `sc` column is our `nc` and its `nc` column our `sc`."""
    p = MMLSynDataParams(**{**VERSION_1, **changes})
    assert p.causes == ("shared" if not changes else "per_modality")
    assert (p.sc_prob, p.nc_rate, p.sampling) == ([0.5, 0.7, 0.9], 0.1, "iid")
    labels, x, truth = generate_split(p, 64, np.random.default_rng(0), mixing_matrices(p))
    arrays = [labels, x["x1"], x["x2"], x["x3"], *(truth[g] for g in ("snc", "nc", "sc", "sp"))]
    sha = hashlib.sha256()
    for values in arrays:
        sha.update(np.ascontiguousarray(values).tobytes())
    assert sha.hexdigest() == digest


def test_per_class_sampling():
    """C3R's "250/50 per category": exactly per_class[split] samples of each class, the first
    ones of the split's i.i.d. stream, the same on every call."""
    p = MMLSynDataParams(sampling="per_class")
    mixing = mixing_matrices(p)
    for split, quota in {"train": 250, "val": 50, "test": 50}.items():
        labels, inputs, truth = sample_split(p, split, mixing)
        assert np.bincount(labels).tolist() == [quota, quota]
        assert inputs["x1"].shape == (2 * quota, 20) and truth["sp"].shape == (2 * quota, 3, 5)
        again = sample_split(p, split, mixing)
        assert np.array_equal(again[0], labels) and np.array_equal(again[1]["x3"], inputs["x3"])
    labels, inputs, _ = sample_split(p, "val", mixing)
    rng = np.random.default_rng([0, 1, zlib.crc32(b"val")])  # the split's stream
    stream = generate_split(p, 200, rng, mixing)  # its first chunk: 4 x 50 samples
    assert min(np.bincount(stream[0])) >= 50  # holds both quotas, so nothing else is drawn
    first = np.sort(np.concatenate([np.flatnonzero(stream[0] == c)[:50] for c in (0, 1)]))
    assert np.array_equal(labels, stream[0][first])
    assert np.array_equal(inputs["x2"], stream[1]["x2"][first])


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
    per_class = ["sampling=per_class", "per_class={train: 20, val: 5, test: 7}"]
    quota, quota_again = shas(tmp_path / "e", *per_class), shas(tmp_path / "f", *per_class)
    assert quota == quota_again
    manifest = load_manifest(tmp_path / "e")
    assert {k: v.samples for k, v in manifest.splits.items()} == {
        "train": 40,
        "val": 10,
        "test": 14,
    }
    labels = ParquetSamples(tmp_path / "e", "test", ["x1"], manifest=manifest).labels
    assert np.bincount(labels).tolist() == [7, 7]


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
    assert manifest.version == "2.0"
    assert manifest.extraction["theta"] == pytest.approx([0.3, 0.5, 0.7])
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
    assert (samples.labels == (truth["snc"].sum(axis=1) >= 2)).mean() > 0.75
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


def test_concat_trains_on_the_inputs_only(checkpoint, prepared, tmp_path):
    assert load_checkpoint(checkpoint).data.modalities == ["x1", "x2", "x3"]
    metrics = pd.read_parquet(checkpoint.parent / "metrics.parquet")
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    raw = {
        "name": "leak",
        "seeds": [0],
        "data": {"path": str(prepared), "modalities": ["x1", "snc"]},
        "train": {"epochs": 1},
        "output": str(tmp_path / "runs"),
    }
    with pytest.raises(UserError, match="no modality 'snc'"):
        Trainer(parse_recipe(raw, "test"), 0).run()
    assert not (tmp_path / "runs").exists()  # a run refused before training leaves no folder


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
