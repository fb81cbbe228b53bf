"""Faults: a full disk while prep, train, value or report write (exit 2 naming the file and the
free space, nothing torn), and damaged or foreign run folders among good ones in a report (left
out with the reason, the rest reported)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.atomic import TEMP_SUFFIX, WriteError, atomic_path, write_text_atomic
from mmval.report import find_runs

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------ a full disk
class SmallDisk:
    """A tmpfs of a few hundred KiB mounted for one test: a real ENOSPC, no other way."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fill(self, leave: int = 0) -> None:
        """Take every free byte but `leave` with a filler file."""
        filler = self.path / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, b"\0" * 4096):
                pass
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        size = filler.stat().st_size
        os.truncate(filler, max(0, size - leave))


def _mount_small_disk(path: Path, size: str) -> SmallDisk:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    return SmallDisk(path)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    disk = _mount_small_disk(tmp_path / "disk", "400k")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk.path)], check=True)


def assert_disk_full_message(result, path_in: Path) -> None:
    """Exit 2, one paragraph naming a file on the full disk and its free space, no traceback."""
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    text = " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert "No space left on device" in text, text
    assert str(path_in) in text, text
    assert "free on that file system" in text, text


def assert_nothing_torn(folder: Path) -> None:
    """No temp file left behind; every file that is there is whole (it parses)."""
    for path in folder.rglob("*"):
        if not path.is_file() or path.name == "filler":
            continue
        assert not path.name.endswith(TEMP_SUFFIX), path
        if path.suffix == ".parquet":
            pq.read_table(path)
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".yaml":
            yaml.safe_load(path.read_text(encoding="utf-8"))
        elif path.suffix == ".pt":
            torch.load(path, weights_only=True)
        elif path.name == "train.log":
            for line in path.read_text(encoding="utf-8").splitlines():
                json.loads(line)
        elif path.suffix in (".html", ".md", ".csv", ".png"):
            assert path.stat().st_size > 0, path


def test_prep_on_a_full_disk_exits_2_naming_the_file(small_disk):
    # the default synthetic data set is ~540 KB: its first shards fit in 400 KiB, the rest not
    out = small_disk.path / "data"
    result = runner.invoke(app, ["prep", "synthetic", "--out", str(out)])
    assert_disk_full_message(result, out)
    assert any(out.rglob("part-*.parquet")), "the disk filled before any shard was written"
    assert_nothing_torn(small_disk.path)


def test_train_on_a_full_disk_exits_2_naming_the_file(small_disk, recipe_file):
    # a ~60 KB model (~180 KB last.pt with Adam's moments): the first epoch's files fit, the
    # second epoch's checkpoint does not
    recipe = recipe_file(
        output=str(small_disk.path / "runs"), model__encoder__hidden=[64, 64], train__epochs=4
    )
    result = runner.invoke(app, ["train", "--recipe", str(recipe)])
    assert_disk_full_message(result, small_disk.path / "runs")
    run = small_disk.path / "runs" / "tiny" / "seed0"
    assert (run / "recipe.yaml").is_file() and (run / "metrics.parquet").is_file()
    assert not (run / "summary.json").exists()
    assert_nothing_torn(small_disk.path)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """One finished run on the ordinary disk."""
    root = tmp_path_factory.mktemp("faults-run")
    recipe = {
        "name": "tiny",
        "seeds": [0],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "method": {"name": "concat"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 32},
        "output": str(root / "runs"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 0, result.output
    return root / "runs" / "tiny" / "seed0"


def test_value_on_a_full_disk_exits_2_naming_the_file(small_disk, trained_run):
    small_disk.fill()
    out = small_disk.path / "values" / "contrib.parquet"
    result = runner.invoke(app, ["value", str(trained_run / "best.pt"), "--out", str(out)])
    assert_disk_full_message(result, out)
    assert not out.exists()
    assert_nothing_torn(small_disk.path)


@pytest.mark.parametrize("what", ["report", "figures"])
def test_report_on_a_full_disk_leaves_no_empty_report(small_disk, trained_run, what):
    small_disk.fill()
    runs = trained_run.parent.parent
    out = small_disk.path / "report.html"
    args = ["--out", str(out)] if what == "report" else ["--figures", str(small_disk.path / "f")]
    result = runner.invoke(app, ["report", str(runs), *args])
    assert_disk_full_message(result, small_disk.path)
    assert not out.exists()
    assert not any((small_disk.path / "f").glob("*.png"))
    assert_nothing_torn(small_disk.path)


def test_atomic_helper_names_the_target_and_removes_its_temp_on_enospc(small_disk):
    small_disk.fill(leave=8192)
    target = small_disk.path / "big.txt"
    with pytest.raises(WriteError) as caught:
        write_text_atomic(target, "x" * 100_000)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["filler"]


def test_atomic_helper_turns_a_torch_write_failure_into_enospc(small_disk):
    """torch.save reports a full disk as a RuntimeError without the errno; the helper finds it."""
    small_disk.fill(leave=8192)
    target = small_disk.path / "weights.pt"
    with pytest.raises(WriteError) as caught, atomic_path(target) as tmp:
        torch.save({"w": torch.zeros(100_000)}, tmp)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert sorted(p.name for p in small_disk.path.iterdir()) == ["filler"]


def test_a_failure_that_is_not_the_disk_passes_through(tmp_path):
    with pytest.raises(ZeroDivisionError), atomic_path(tmp_path / "x") as tmp:
        tmp.write_text("partial")
        _ = 1 / 0
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder_exits_2(tmp_path, trained_run):
    """EROFS: a read-only mount (here a read-only bind of a tmpfs) is refused the same way."""
    disk = _mount_small_disk(tmp_path / "ro", "64k")
    try:
        done = subprocess.run(
            ["mount", "-o", "remount,ro", str(disk.path)], capture_output=True, check=False
        )
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
        out = disk.path / "report.md"
        result = runner.invoke(app, ["report", str(trained_run.parent.parent), "--out", str(out)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.stderr.split())
        assert "Read-only file system" in text and str(out) in text, text
    finally:
        subprocess.run(["umount", "--lazy", str(disk.path)], check=True)


# ----------------------------------------------------------------- damaged runs in a report
@pytest.fixture(scope="module")
def good_runs(tmp_path_factory: pytest.TempPathFactory, synthetic_dir: Path) -> Path:
    """Three finished seeds of one recipe."""
    root = tmp_path_factory.mktemp("faults-report")
    recipe = {
        "name": "concat",
        "seeds": [0, 1, 2],
        "data": {"path": str(synthetic_dir)},
        "model": {"encoder": {"hidden": [16], "out_dim": 8, "dropout": 0.1}},
        "method": {"name": "concat"},
        "optim": {"name": "adam", "lr": 0.01},
        "train": {"epochs": 2, "batch_size": 64},
        "output": str(root / "runs"),
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = runner.invoke(app, ["train", "--recipe", str(path)])
    assert result.exit_code == 0, result.output
    return root / "runs"


def _copy_run(good: Path, name: str) -> Path:
    """A copy of seed 0 under another name (its seed changed, so it is no duplicate)."""
    folder = good / "broken" / name
    shutil.copytree(good / "concat" / "seed0", folder)
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    summary["seed"] = 100 + len(list((good / "broken").iterdir()))
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    return folder


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _damage(good: Path) -> dict[str, str]:
    """One folder per kind of damage; returns folder name -> the start of its reason."""
    expected = {}
    folder = _copy_run(good, "garbled-summary")
    (folder / "summary.json").write_text('{"finished": true, "dataset": ', encoding="utf-8")
    expected["garbled-summary"] = "damaged: summary.json is not JSON"
    folder = _copy_run(good, "binary-summary")
    (folder / "summary.json").write_bytes(b"\xff\xfe\x00garbage")
    expected["binary-summary"] = "damaged: summary.json is not JSON"
    folder = _copy_run(good, "truncated-metrics")
    _truncate(folder / "metrics.parquet")
    expected["truncated-metrics"] = "damaged: metrics.parquet cannot be read"
    folder = _copy_run(good, "truncated-predictions")
    _truncate(folder / "predictions.parquet")
    expected["truncated-predictions"] = "damaged: predictions.parquet cannot be read"
    folder = _copy_run(good, "missing-keys")
    (folder / "summary.json").write_text(json.dumps({"finished": True}), encoding="utf-8")
    expected["missing-keys"] = "damaged: summary.json lacks"
    folder = _copy_run(good, "metrics-without-columns")
    pd.DataFrame({"nothing": [1]}).to_parquet(folder / "metrics.parquet")
    expected["metrics-without-columns"] = "damaged: metrics.parquet"
    folder = _copy_run(good, "unfinished-garbled")  # an unfinished run with damaged files
    (folder / "summary.json").unlink()
    (folder / "recipe.yaml").write_text("train: [unclosed", encoding="utf-8")
    _truncate(folder / "metrics.parquet")
    expected["unfinished-garbled"] = "unfinished:"
    foreign = good / "broken" / "foreign"
    foreign.mkdir()
    (foreign / "summary.json").write_text(
        json.dumps({"tool": "other-trainer", "accuracy": 0.93}), encoding="utf-8"
    )
    expected["foreign"] = "not an mmval run:"
    listing = good / "broken" / "foreign-list"
    listing.mkdir()
    (listing / "summary.json").write_text("[1, 2, 3]", encoding="utf-8")
    expected["foreign-list"] = "not an mmval run:"
    return expected


def test_damaged_and_foreign_run_folders_are_left_out_and_the_rest_reported(good_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(good_runs, root)
    expected = _damage(root)
    tree = find_runs(root)
    assert sorted(tree.runs["seed"]) == [0, 1, 2]
    reasons = {x.run.name: x.reason for x in tree.left_out}
    assert set(reasons) == set(expected), reasons
    for name, start in expected.items():
        assert reasons[name].startswith(start), (name, reasons[name])

    result = runner.invoke(app, ["report", str(root), "--format", "csv"])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    table = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert list(table["n_seeds"]) == [3], table
    stderr = " ".join(result.stderr.split())
    for name in expected:
        assert f"{name}: {reasons[name]}"[:60] in stderr, (name, stderr)
    assert "left out 6 damaged run(s)" in stderr, stderr
    assert "left out 2 foreign folder(s)" in stderr, stderr

    html = runner.invoke(app, ["report", str(root), "--out", str(tmp_path / "r.html")])
    assert html.exit_code == 0, html.output
    page = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "truncated-metrics" in page and "not an mmval run" in page


def test_test_max_selection_skips_a_damaged_run_too(good_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(good_runs, root)
    folder = _copy_run(root, "no-test-acc")
    frame = pd.read_parquet(folder / "metrics.parquet").drop(columns="test_acc")
    frame.to_parquet(folder / "metrics.parquet")
    tree = find_runs(root, "test-max")
    assert sorted(tree.runs["seed"]) == [0, 1, 2]
    (left,) = tree.left_out
    assert left.run == folder and left.reason.startswith("damaged: metrics.parquet"), left


def test_a_damaged_evaluation_table_is_left_out_of_the_robustness_report(good_runs, tmp_path):
    root = tmp_path / "runs"
    shutil.copytree(good_runs, root)
    for seed in (0, 1, 2):
        best = root / "concat" / f"seed{seed}" / "best.pt"
        out = best.parent / "subsets.parquet"
        args = ["value", str(best), "--method", "subsets", "--out", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    damaged = root / "concat" / "seed2" / "subsets.parquet"
    data = damaged.read_bytes()
    # keep the footer (the metadata says: a subsets table) and garble the data pages
    damaged.write_bytes(data[:4] + b"\x00" * (len(data) // 2 - 4) + data[len(data) // 2 :])
    result = runner.invoke(app, ["report", str(root), "--robustness", "--format", "csv"])
    assert result.exit_code == 0, result.output
    stderr = " ".join(result.stderr.split())
    assert "subsets.parquet: damaged: the evaluation table cannot be read" in stderr, stderr
    missing = pd.read_csv(pd.io.common.StringIO(result.stdout))
    assert set(missing["n_seeds"]) == {2}, missing


def test_written_files_get_the_usual_mode_not_mkstemps_0600(tmp_path):
    """As open() would: 0666 less the umask, so a shared cluster's group can read data and
    runs (mkstemp alone makes 0600)."""
    import mmval.atomic

    mmval.atomic.write_text_atomic(tmp_path / "shared.txt", "x")
    mode = (tmp_path / "shared.txt").stat().st_mode & 0o777
    assert mode == 0o666 & ~mmval.atomic._UMASK
