"""`mmval prep table`: a user's multi-view table in every file format, its labels, ids and
splits, every bad input refused with exit 2 and nothing written, provenance, and the quickstart's
uci-mfeat exported to CSV files giving the same tensors and accuracy as the built-in one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.dataset import ParquetSamples
from mmval.data.manifest import load_dataset_manifest
from mmval.data.prep import prepare
from mmval.data.shards import check_data_dir, sha256_file
from mmval.data.sources.base import stratified_split
from mmval.data.sources.uci_mfeat import _read_view
from mmval.errors import UserError
from mmval.recipe import parse_recipe
from mmval.runner import Trainer
from tests.conftest import timeless_metrics

runner = CliRunner()
N = 60  # 3 classes x 20 rows
SPLITS = ("train", "val", "test")


def prep(out: Path, *args: object):
    return runner.invoke(app, ["prep", "table", "--out", str(out), *map(str, args)])


def read(out: Path) -> dict[str, tuple[list[str], np.ndarray, dict[str, np.ndarray]]]:
    """Per split: sample ids, labels and every view's tensors, in the order stored."""
    manifest = check_data_dir(out)
    names = [m.name for m in manifest.modalities]
    found = {}
    for split in SPLITS:
        samples = ParquetSamples(out, split, names)
        if not len(samples):
            found[split] = ([], np.zeros(0, int), {})
            continue
        batch = samples.__getitems__(list(range(len(samples))))
        arrays = {k: v.numpy() for k, v in batch.inputs.items()}
        found[split] = (list(samples.sample_ids), batch.label.numpy(), arrays)
    return found


def by_row(out: Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[int, str]]:
    """All splits together in row order (default ids are row numbers from 1): views, labels and
    the split of each row."""
    views: dict[str, list] = {}
    rows, labels, where = [], [], {}
    for split, (ids, y, arrays) in read(out).items():
        rows += [int(i) - 1 for i in ids]
        labels += list(y)
        where |= {int(i) - 1: split for i in ids}
        for name, values in arrays.items():
            views.setdefault(name, []).extend(values)
    order = np.argsort(rows)
    return (
        {k: np.stack(v)[order] for k, v in views.items()},
        np.array(labels)[order],
        where,
    )


@pytest.fixture
def table(tmp_path: Path) -> dict:
    """A 2-D view `a` [60, 4], a sequence view `s` [60, 3, 2] and labels 0..2 (20 each)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(N, 4))
    s = rng.normal(size=(N, 3, 2))
    y = np.repeat(np.arange(3), 20)[rng.permutation(N)]
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "s.npy", s)
    (tmp_path / "y.txt").write_text("\n".join(map(str, y)) + "\n")
    return {"root": tmp_path, "a": a, "s": s, "y": y}


def base_args(t: dict, *views: str) -> list[str]:
    root = t["root"]
    return [*views, "--view", f"a={root / 'a.npy'}", "--labels", root / "y.txt"]


def test_every_view_format_reads_the_same_values(table):
    root, a, s = table["root"], table["a"], table["s"]
    np.savetxt(root / "h.csv", a, delimiter=",", fmt="%.17g", header="f0,f1,f2,f3", comments="")
    np.savetxt(root / "plain.csv", a, delimiter=",", fmt="%.17g")
    np.savetxt(root / "t.tsv", a, delimiter="\t", fmt="%.17g", header="x\ty\tz\tw", comments="")
    np.savez(root / "one.npz", a)
    np.savez(root / "two.npz", first=-a, second=a)
    pq.write_table(pa.table({f"c{j}": a[:, j] for j in range(4)}), root / "cols.parquet")
    pq.write_table(pa.table({"v": [list(r) for r in a]}), root / "list.parquet")
    pq.write_table(pa.table({"v": [[list(t) for t in r] for r in s]}), root / "seq.parquet")
    formats = ["h.csv", "plain.csv", "t.tsv", "one.npz", "two.npz:second", "cols.parquet"]
    views = [f"v{i}={root / name}" for i, name in enumerate([*formats, "list.parquet"])]
    out = root / "out" / "formats"
    result = prep(
        out,
        *[arg for v in views for arg in ("--view", v)],
        "--view",
        f"seq={root / 'seq.parquet'}",
        "--view",
        f"s={root / 's.npy'}",
        "--labels",
        root / "y.txt",
        "--set",
        "standardize=none",
    )
    assert result.exit_code == 0, result.output
    manifest = check_data_dir(out)
    shapes = {m.name: m.shape for m in manifest.modalities}
    assert shapes == {**{f"v{i}": [4] for i in range(7)}, "seq": [3, 2], "s": [3, 2]}
    assert [m.description for m in manifest.modalities][4] == "two.npz:second"
    views_by_row, labels, _ = by_row(out)
    for i in range(7):
        np.testing.assert_array_equal(views_by_row[f"v{i}"], a.astype(np.float32))
    np.testing.assert_array_equal(views_by_row["s"], s.astype(np.float32))
    np.testing.assert_array_equal(views_by_row["seq"], s.astype(np.float32))
    np.testing.assert_array_equal(labels, table["y"])
    assert manifest.classes == ["0", "1", "2"] and "label_map" not in manifest.extraction


@pytest.mark.parametrize(
    ("kind", "classes", "label_map"),
    [
        ("csv-header", ["0", "1", "2"], None),
        ("remapped", ["3", "7", "10"], {"3": 0, "7": 1, "10": 2}),
        ("names", ["cat", "dog", "emu"], None),
        ("npy-int", ["0", "1", "2"], None),
        ("npy-names", ["cat", "dog", "emu"], None),
        ("npy-float", ["3", "7", "10"], {"3": 0, "7": 1, "10": 2}),
    ],
)
def test_label_files(table, kind, classes, label_map):
    root, y = table["root"], table["y"]
    values = {"remapped": np.array([3, 7, 10])[y], "npy-float": np.array([3.0, 7.0, 10.0])[y]}
    names = np.array(["dog", "emu", "cat"])[y]  # written unsorted: classes are sorted names
    if kind == "csv-header":
        rows = ["id,label", *(f"s{i},{v}" for i, v in enumerate(y))]
        (path := root / "labels.csv").write_text("\n".join(rows) + "\n")
    elif kind == "remapped":
        (path := root / "labels.txt").write_text("\n".join(map(str, values[kind])) + "\n")
    elif kind == "names":
        (path := root / "labels.csv").write_text("label\n" + "\n".join(names) + "\n")
    elif kind == "npy-names":
        np.save(path := root / "labels.npy", names)
    else:
        np.save(path := root / "labels.npy", values.get(kind, y))
    out = root / "out" / kind
    result = prep(out, "--view", f"a={root / 'a.npy'}", "--labels", path)
    assert result.exit_code == 0, result.output
    manifest = check_data_dir(out)
    assert manifest.classes == classes
    assert manifest.extraction.get("label_map") == label_map
    _, labels, _ = by_row(out)
    expected = {"names": names, "npy-names": names}.get(kind)
    if expected is None:
        expected = np.array(["0", "1", "2"])[y] if label_map is None else np.array(classes)[y]
    np.testing.assert_array_equal(np.array(classes)[labels], expected)


def test_ids_and_split_file(table):
    root, y = table["root"], table["y"]
    ids = [f"item-{i:03d}" for i in range(N)]
    (root / "ids.csv").write_text("id\n" + "\n".join(ids) + "\n")
    assigned = np.array(SPLITS)[np.arange(N) % 3]
    (root / "split.txt").write_text("\n".join(assigned) + "\n")
    out = root / "out" / "ids"
    result = prep(out, *base_args(table), "--ids", root / "ids.csv", "--splits", root / "split.txt")
    assert result.exit_code == 0, result.output
    for split, (stored, labels, _) in read(out).items():
        rows = sorted(int(i.split("-")[1]) for i in stored)
        assert rows == [i for i in range(N) if assigned[i] == split]
        assert dict(zip(stored, labels, strict=True)) == {ids[r]: y[r] for r in rows}
    # a split file as .npy of names works too
    np.save(root / "split.npy", assigned)
    again = root / "out" / "ids-npy"
    assert prep(again, *base_args(table), "--splits", root / "split.npy").exit_code == 0
    assert by_row(again)[2] == dict(enumerate(assigned))


def test_stratified_split_is_reproducible_by_seed(table):
    root, y = table["root"], table["y"]
    splits = {}
    for name, seed in (("s0", 0), ("s0-again", 0), ("s1", 1)):
        result = prep(root / "out" / name, *base_args(table), "--set", f"split.seed={seed}")
        assert result.exit_code == 0, result.output
        splits[name] = by_row(root / "out" / name)[2]
    assert splits["s0"] == splits["s0-again"] and splits["s0"] != splits["s1"]
    for c in range(3):  # 20 per class: 14 / 2 / 4
        counts = [sum(splits["s0"][r] == s for r in np.flatnonzero(y == c)) for s in SPLITS]
        assert counts == [14, 2, 4]
    ratios = prep(root / "out" / "r", *base_args(table), "--set", "split.ratios=[0.5,0,0.5]")
    assert ratios.exit_code == 0, ratios.output
    assert sorted(set(by_row(root / "out" / "r")[2].values())) == ["test", "train"]


def test_standardize_train_and_none(table):
    root, a = table["root"], table["a"]
    none_out, train_out = root / "out" / "none", root / "out" / "train"
    assert prep(none_out, *base_args(table), "--set", "standardize=none").exit_code == 0
    assert prep(train_out, *base_args(table)).exit_code == 0
    raw, _, where = by_row(none_out)
    np.testing.assert_array_equal(raw["a"], a.astype(np.float32))
    train = np.array([where[r] == "train" for r in range(N)])
    expected = (a - a[train].mean(axis=0)) / a[train].std(axis=0)
    z = by_row(train_out)[0]["a"]
    np.testing.assert_allclose(z, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z[train].mean(axis=0), 0, atol=1e-6)
    # a sequence view: z-scores per feature over all steps of the train samples
    s = table["s"]
    seq_args = ["--view", f"s={root / 's.npy'}", "--labels", root / "y.txt"]
    assert prep(root / "out" / "seq", *seq_args).exit_code == 0
    steps = s[train].reshape(-1, 2)
    expected = (s - steps.mean(axis=0)) / steps.std(axis=0)
    np.testing.assert_allclose(by_row(root / "out" / "seq")[0]["s"], expected, atol=1e-5)


def test_nan_drop_and_zero(table):
    root, a = table["root"], table["a"].copy()
    rows = ["f0,f1,f2,f3", *(",".join(f"{v:.17g}" for v in r) for r in a)]
    rows[1 + 4] = rows[1 + 4].replace(rows[1 + 4].split(",")[2], "", 1)  # row 5: empty cell
    (root / "holes.csv").write_text("\n".join(rows) + "\n")
    s = table["s"].copy()
    s[9, 1, 0] = np.inf  # row 10
    np.save(root / "s.npy", s)
    views = ["--view", f"h={root / 'holes.csv'}", "--view", f"s={root / 's.npy'}"]
    labels = ["--labels", root / "y.txt", "--set", "standardize=none"]
    refused = prep(root / "out" / "error", *views, *labels)
    assert refused.exit_code == 2
    assert "holes.csv: row 5 (line 6), column 3 is nan" in refused.output.replace("\n", "")
    dropped = root / "out" / "drop"
    result = prep(dropped, *views, *labels, "--set", "nan=drop")
    assert result.exit_code == 0, result.output
    kept, _, where = by_row(dropped)
    assert sorted(set(range(N)) - set(where)) == [4, 9]
    errors = pd.read_parquet(dropped / "errors.parquet")
    assert errors["source"].tolist() == ["row 5", "row 10"]
    assert "view h" in errors["reason"][0] and "view s" in errors["reason"][1]
    assert len(where) + len(errors) == N  # every input accounted for
    np.testing.assert_array_equal(kept["h"], np.delete(a, [4, 9], axis=0).astype(np.float32))
    zeroed = root / "out" / "zero"
    assert prep(zeroed, *views, *labels, "--set", "nan=zero").exit_code == 0
    values, _, where = by_row(zeroed)
    assert len(where) == N and values["h"][4, 2] == 0 and values["s"][9, 1, 0] == 0


def bad_input(root: Path, case: str) -> tuple[list[object], list[str]]:
    """The arguments of a bad prep and what its message must say (file and row)."""
    a = np.random.default_rng(1).normal(size=(N, 3))
    y = root / "y.txt"
    lines = [",".join(f"{v:.6f}" for v in r) for r in a]
    csv = root / "v.csv"
    expect: list[str]
    if case == "row-count":
        csv.write_text("\n".join(lines[:-1]) + "\n")
        expect = ["v.csv has 59 rows", "y.txt has 60", "row 60"]
    elif case == "non-numeric":
        lines[2] = "1.0,abc,2.0"
        csv.write_text("a,b,c\n" + "\n".join(lines) + "\n")
        expect = ["v.csv", "row 3 (line 4), column 2 holds 'abc'"]
    elif case == "ragged":
        lines[6] += ",4.0"
        csv.write_text("\n".join(lines) + "\n")
        expect = ["v.csv", "row 7 (line 7) has 4 cells"]
    elif case == "nan":
        lines[7] = "nan,1,2"
        csv.write_text("\n\n" + "\n".join(lines) + "\n")  # blank lines are skipped, not rows
        expect = ["v.csv: row 8 (line 10), column 1 is nan", "nan=drop"]
    elif case == "inf-npy":
        a[11, 2] = -np.inf
        np.save(csv := root / "v.npy", a)
        expect = ["v.npy: row 12, column 3 is -inf"]
    elif case == "empty-view":
        csv.write_text("a,b,c\n")
        expect = ["v.csv is an empty view"]
    elif case == "no-columns":
        np.save(csv := root / "v.npy", np.zeros((N, 0)))
        expect = ["v.npy is an empty view"]
    elif case == "bad-split":
        csv.write_text("\n".join(lines) + "\n")
        names = ["train"] * N
        names[3] = "trian"
        (root / "split.csv").write_text("split\n" + "\n".join(names) + "\n")
        expect = ["split.csv: row 4 (line 5) holds 'trian'", "train, val, test"]
    elif case == "duplicate-ids":
        csv.write_text("\n".join(lines) + "\n")
        ids = [f"x{i}" for i in range(N)]
        ids[5] = "x1"
        (root / "ids.txt").write_text("\n".join(ids) + "\n")
        expect = ["ids.txt: id 'x1' is on row 2 (line 2) and row 6 (line 6)", "unique"]
    elif case == "missing-file":
        csv = root / "nowhere.csv"
        expect = ["nowhere.csv: no such file"]
    elif case == "extension":
        (csv := root / "v.xlsx").write_bytes(b"PK")
        expect = ["v.xlsx", "unknown file type '.xlsx'"]
    elif case == "label-missing":
        csv.write_text("\n".join(lines) + "\n")
        (y := root / "labels.csv").write_text("id,label\n" + "".join(f"{i},1\n" for i in range(N)))
        y.write_text(y.read_text().replace("\n7,1\n", "\n7,\n"))
        expect = ["labels.csv: row 8 (line 9) has no label value"]
    elif case == "npz-keys":
        np.savez(csv := root / "v.npz", one=a, two=a)
        expect = ["v.npz holds 2 arrays (one, two)", ":KEY"]
    elif case == "key-not-npz":
        csv.write_text("\n".join(lines) + "\n")
        csv = Path(f"{csv}:k")
        expect = ["v.csv:k: a :KEY picks an array of an .npz file only"]
    elif case == "too-few":
        csv.write_text("\n".join(lines) + "\n")
        (y := root / "few.txt").write_text("\n".join(["a"] * 57 + ["b"] * 3) + "\n")
        expect = ["class 'b' has 3 samples", "few.txt", "its val share rounds to 0"]
    else:  # parquet text column
        pq.write_table(pa.table({"x": a[:, 0], "name": ["k"] * N}), csv := root / "v.parquet")
        expect = ["v.parquet: row 1, column 'name' holds 'k', not a number"]
    args: list[object] = ["--view", f"v={csv}", "--labels", y]
    if case == "bad-split":
        args += ["--splits", root / "split.csv"]
    if case == "duplicate-ids":
        args += ["--ids", root / "ids.txt"]
    return args, expect


BAD = [
    "row-count",
    "non-numeric",
    "ragged",
    "nan",
    "inf-npy",
    "empty-view",
    "no-columns",
    "bad-split",
    "duplicate-ids",
    "missing-file",
    "extension",
    "label-missing",
    "npz-keys",
    "key-not-npz",
    "too-few",
    "parquet-text",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_naming_file_and_row(table, case):
    root = table["root"]
    args, expect = bad_input(root, case)
    out = root / "out" / case
    result = prep(out, *args)
    message = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    for part in expect:
        assert part in message, (part, message)
    assert not out.exists() or not any(out.rglob("*"))  # nothing written under --out


def test_provenance_name_and_changed_inputs(table):
    root = table["root"]
    out = root / "out" / "my-features"
    assert prep(out, *base_args(table)).exit_code == 0
    manifest = check_data_dir(out)
    assert manifest.dataset == "my-features"  # named after --out, not `table`
    inputs = manifest.extraction["settings"]["inputs"]
    assert inputs == {
        "views": {"a": {"path": str(root / "a.npy"), "sha256": sha256_file(root / "a.npy")}},
        "labels": {"path": str(root / "y.txt"), "sha256": sha256_file(root / "y.txt")},
    }
    again = prep(out, *base_args(table))
    assert again.exit_code == 0 and "already prepared" in again.output
    named = root / "out" / "named"
    assert prep(named, *base_args(table), "--set", "name=digits").exit_code == 0
    assert check_data_dir(named).dataset == "digits"
    # the same command over a changed file is refused, not answered with the old data
    np.save(root / "a.npy", table["a"] + 1)
    changed = prep(out, *base_args(table))
    assert changed.exit_code == 2 and "other settings" in changed.output
    assert prep(out, *base_args(table), "--overwrite").exit_code == 0
    new = check_data_dir(out).extraction["settings"]["inputs"]["views"]["a"]["sha256"]
    assert new == sha256_file(root / "a.npy")


def test_train_and_value_a_table_from_the_cli(table):
    root = table["root"]
    out = root / "out" / "cli"
    args = ["--view", f"s={root / 's.npy'}", *base_args(table)]
    assert prep(out, *args).exit_code == 0
    recipe = {
        "name": "tbl",
        "seeds": [0],
        "data": {"path": str(out)},
        "model": {"encoder": {"hidden": [8], "out_dim": 4}},
        "method": {"name": "concat"},
        "train": {"epochs": 2, "batch_size": 16},
        "output": str(root / "runs"),
    }
    (root / "r.yaml").write_text(yaml.safe_dump(recipe))
    trained = runner.invoke(app, ["train", "--recipe", str(root / "r.yaml")])
    assert trained.exit_code == 0, trained.output
    run = root / "runs" / "tbl" / "seed0"
    assert json.loads((run / "summary.json").read_text())["dataset"] == "cli"
    table_out = root / "values.parquet"
    valued = runner.invoke(app, ["value", str(run / "best.pt"), "--out", str(table_out)])
    assert valued.exit_code == 0, valued.output
    values = pd.read_parquet(table_out)
    assert set(values["sample_id"]) == set(read(out)["test"][0])


def test_help_shows_a_table_example():
    result = runner.invoke(app, ["prep", "table", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "mmval prep table --view a=a.csv" in text and "--labels" in text


def test_params_are_checked(tmp_path):
    with pytest.raises(UserError, match="labels"):
        prepare("table", tmp_path / "x", inputs={"views": {"a": "/a.npy"}})
    with pytest.raises(UserError, match="reserved"):
        prepare("table", tmp_path / "x", inputs={"views": {"label": "/a.npy"}, "labels": "/y"})


# the six uci-mfeat views in their manifest order, the first two written with a header row
UCI_VIEWS = ("fou", "fac", "kar", "pix", "zer", "mor")


def test_uci_mfeat_exported_to_csv_equals_the_builtin(uci_dir, tmp_path):
    """The acceptance test of `mmval prep table`: uci-mfeat's raw (unstandardized) views written
    to six CSV files, its labels, ids and built-in split written beside them, prepared as a
    table, give bit-identical tensors and the same test accuracy as `mmval prep uci-mfeat`."""
    entry, _ = load_dataset_manifest("uci-mfeat")
    args: list[object] = []
    labels = None
    for i, view in enumerate(UCI_VIEWS):
        values, labels = _read_view(entry.raw["files"][view])
        header = ",".join(f"{view}{j}" for j in range(values.shape[1])) if i < 2 else ""
        path = tmp_path / f"{view}.csv"
        np.savetxt(path, values, delimiter=",", fmt="%.17g", header=header, comments="")
        args += ["--view", f"{view}={path}"]
    assert labels is not None and entry.splits is not None
    (tmp_path / "labels.csv").write_text("label\n" + "\n".join(map(str, labels)) + "\n")
    (tmp_path / "ids.txt").write_text("\n".join(f"digit{i:04d}" for i in range(len(labels))))
    split = np.empty(len(labels), dtype=object)
    for name, rows in stratified_split(labels, entry.splits).items():
        split[rows] = name
    (tmp_path / "split.txt").write_text("\n".join(split) + "\n")
    out = tmp_path / "uci-table"
    result = prep(
        out,
        *args,
        "--labels",
        tmp_path / "labels.csv",
        "--ids",
        tmp_path / "ids.txt",
        "--splits",
        tmp_path / "split.txt",
    )
    assert result.exit_code == 0, result.output
    assert check_data_dir(out).classes == check_data_dir(uci_dir).classes
    ours, builtin = read(out), read(uci_dir)
    for split in SPLITS:
        assert ours[split][0] == builtin[split][0]  # same ids in the same stored order
        np.testing.assert_array_equal(ours[split][1], builtin[split][1])
        for view in UCI_VIEWS:
            assert torch.equal(
                torch.from_numpy(ours[split][2][view]), torch.from_numpy(builtin[split][2][view])
            ), (split, view)
    runs = {}
    for name, data in (("table", out), ("builtin", uci_dir)):
        recipe = {
            "name": name,
            "seeds": [0],
            "data": {"path": str(data)},
            "model": {"encoder": {"hidden": [32], "out_dim": 16}},
            "method": {"name": "concat"},
            "optim": {"name": "adam", "lr": 0.003},
            "train": {"epochs": 3, "batch_size": 128},
            "output": str(tmp_path / "runs"),
        }
        runs[name] = Trainer(parse_recipe(recipe, name), 0).run()
    accuracy = {name: run.summary["test_acc"] for name, run in runs.items()}
    assert accuracy["table"] == accuracy["builtin"] > 0.5  # exactly: same tensors, same seed
    curves = {name: timeless_metrics(run.run_dir) for name, run in runs.items()}
    pd.testing.assert_frame_equal(curves["table"], curves["builtin"])
