"""Locks: one command at a time writes a run folder, a data folder or an output file; a second
one stops with exit 2 naming the holder (issue 19: two `mmval train` of one run both said done
and left a folder mixing two runs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from mmval.cli.main import app
from typer.testing import CliRunner

from mmval.data.prep import prepare
from mmval.errors import UserError
from mmval.locks import LOCK_FILE, ensure_free, lock_file, locked
from mmval.recipe import load_recipe
from mmval.runner import Trainer

runner = CliRunner()
REPO = Path(__file__).parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

# `mmval train` whose every step takes 0.1 s longer: the run holds its folder for seconds
SLOW_TRAIN = """
import sys, time
import mmval.methods.base as base

step = base.Method.train_step

def slow(self, *args, **kwargs):
    time.sleep(0.1)
    return step(self, *args, **kwargs)

base.Method.train_step = slow
from mmval.cli.main import app
app(sys.argv[1:], prog_name="mmval")
"""

HOLD = """
import sys, time
from pathlib import Path
from mmval.locks import locked
with locked(Path(sys.argv[1]), folder=sys.argv[2] == "folder", what="it"):
    print("held", flush=True)
    time.sleep(120)
"""


def hold(target: Path, *, folder: bool) -> subprocess.Popen:
    """Another process holding `target`'s lock (until it is killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(target), "folder" if folder else "file"],
        env=ENV,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_held_lock_refuses_naming_the_holder_and_a_killed_holder_frees_it(tmp_path):
    folder = tmp_path / "run"
    proc = hold(folder, folder=True)
    try:
        with pytest.raises(UserError) as refused, locked(folder, folder=True, what="run x"):
            pass
        message = str(refused.value)
        assert f"pid {proc.pid} on {socket.gethostname()}" in message
        assert "run x is in use" in message and "-c" in message
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            ensure_free(folder, folder=True, what="run x")
    finally:
        stop(proc)  # kill -9: the kernel releases the lock; its file stays behind
    assert (folder / LOCK_FILE).is_file()
    with locked(folder, folder=True, what="run x"):
        record = json.loads((folder / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
        with locked(folder, folder=True, what="run x"):  # the same process: re-entrant
            pass
        assert (folder / LOCK_FILE).is_file()
    assert list(folder.iterdir()) == []  # released: the folder is as it was


def test_two_trains_of_one_run_at_once_the_second_refuses(recipe_file, tmp_path):
    """A requeued job started while the first still trains: the second (with or without
    --resume) exits 2 naming the first; the first finishes one whole run."""
    path = recipe_file(train__epochs=8)
    script = tmp_path / "slow.py"
    script.write_text(SLOW_TRAIN)
    run = tmp_path / "runs/tiny/seed0"
    first = subprocess.Popen(
        [sys.executable, str(script), "train", "--recipe", str(path)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not ((run / "train.log").is_file() and (run / "last.pt").is_file()):
            assert first.poll() is None, first.stderr.read() if first.stderr else ""
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for extra in ([], ["--resume"], ["--overwrite"]):
            second = runner.invoke(app, ["train", "--recipe", str(path), *extra])
            assert second.exit_code == 2, (extra, second.output)
            output = " ".join(second.output.split())
            assert f"pid {first.pid}" in output and "train --recipe" in output, output
            assert "--resume to continue" not in output
        assert first.poll() is None, "the first run ended before the second started"
        assert first.wait(timeout=120) == 0, first.stderr.read() if first.stderr else ""
    finally:
        if first.poll() is None:
            stop(first)
    log = [json.loads(line) for line in (run / "train.log").read_text().splitlines()]
    assert [row["epoch"] for row in log] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert pd.read_parquet(run / "metrics.parquet")["epoch"].tolist() == [1, 2, 3, 4, 5, 6, 7, 8]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["recipe"] == load_recipe(path).for_seed(0).model_dump(
        mode="json"
    )
    assert not (run / LOCK_FILE).exists()
    # the next command finds the run finished
    assert Trainer(load_recipe(path), 0).run().skipped


def test_a_prep_refuses_a_data_folder_another_command_writes(tmp_path):
    out = tmp_path / "data"
    proc = hold(out, folder=True)
    try:
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            prepare("synthetic", out, overrides=["per_class={train: 4, val: 2, test: 2}"])
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
        part = out / "part-00000-of-00002"  # a part being prepared: no merge meanwhile
        stop(proc)
        proc = hold(part, folder=True)
        result = runner.invoke(app, ["prep", "synthetic", "--out", str(out), "--merge"])
        assert result.exit_code == 2 and f"pid {proc.pid}" in " ".join(result.output.split())
    finally:
        stop(proc)


@pytest.mark.parametrize("command", ["report", "value"])
def test_value_and_report_refuse_an_output_another_command_writes(recipe_file, tmp_path, command):
    path = recipe_file(train__epochs=1)
    Trainer(load_recipe(path), 0).run()
    out = tmp_path / ("report.md" if command == "report" else "contrib.parquet")
    args = (
        ["report", str(tmp_path / "runs"), "--out", str(out)]
        if command == "report"
        else ["value", str(tmp_path / "runs/tiny/seed0/best.pt"), "--out", str(out)]
    )
    proc = hold(out, folder=False)
    try:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        assert f"pid {proc.pid}" in " ".join(result.output.split())
        assert not out.exists()
    finally:
        stop(proc)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert out.is_file() and not lock_file(out, folder=False).exists()
